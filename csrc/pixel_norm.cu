// Pixel norm with an optional bias + leaky-ReLU prologue (the PGGAN generator's conv epilogue).
// Tensors are described as (B, C, P) with strides: element (b, c, p) at b*sb + c*sc + p*sp.
// Every block covers kPixelsPerBlock pixels of one batch row, which fixes the number of
// bias-gradient partial rows: B * ceil(P / kPixelsPerBlock).
#include "common.cuh"
#include "ops.h"

namespace xrayforge {
namespace {

constexpr int kPixelsPerBlock = 128;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBiasGradChannels = 1024;

template <typename T, typename Acc>
__device__ __forceinline__ Acc activation(const T* x, const void* bias, int bias_dtype, int64_t off,
                                          int c, Acc slope) {
  Acc v = to_acc<Acc>(x[off]);
  if (bias != nullptr) {
    v += load_any<Acc>(bias, bias_dtype, c);
    v = v > Acc(0) ? v : v * slope;
  }
  return v;
}

// One thread per pixel: coalesced when pixels are contiguous (NCHW, stride_p == 1).
template <typename T, typename Acc>
__global__ void fwd_pixel_per_thread(const T* __restrict__ x, const void* bias, int bias_dtype, T* __restrict__ y,
                                     int C, int64_t P, int64_t sb, int64_t sc, int64_t sp, Acc slope, Acc eps) {
  int64_t p = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock + threadIdx.x;
  if (p >= P) return;
  int64_t base = blockIdx.y * sb + p * sp;
  CompensatedSum<Acc> ss;
  for (int c = 0; c < C; ++c) {
    Acc v = activation<T, Acc>(x, bias, bias_dtype, base + c * sc, c, slope);
    ss.add(mul_rn(v, v));
  }
  Acc r = inv_sqrt(ss.value() / C + eps);
  for (int c = 0; c < C; ++c) {
    int64_t off = base + c * sc;
    y[off] = from_acc<T>(activation<T, Acc>(x, bias, bias_dtype, off, c, slope) * r);
  }
}

// One warp per pixel, lanes across channels: coalesced when channels are contiguous
// (channels_last, or (N, C) matrices).
template <typename T, typename Acc>
__global__ void fwd_warp_per_pixel(const T* __restrict__ x, const void* bias, int bias_dtype, T* __restrict__ y,
                                   int C, int64_t P, int64_t sb, int64_t sc, int64_t sp, Acc slope, Acc eps) {
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t first = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock;
  for (int64_t p = first + warp; p < min(first + kPixelsPerBlock, P); p += kWarps) {
    int64_t base = blockIdx.y * sb + p * sp;
    Acc ss = 0;
    for (int c = lane; c < C; c += 32) {
      Acc v = activation<T, Acc>(x, bias, bias_dtype, base + c * sc, c, slope);
      ss += v * v;
    }
    ss = __shfl_sync(0xffffffffu, warp_sum(ss), 0);
    Acc r = inv_sqrt(ss / C + eps);
    for (int c = lane; c < C; c += 32) {
      int64_t off = base + c * sc;
      y[off] = from_acc<T>(activation<T, Acc>(x, bias, bias_dtype, off, c, slope) * r);
    }
  }
}

// Sums the per-warp bias-gradient slots of this block, in a fixed order, into partial[row, c].
template <typename Acc>
__device__ __forceinline__ void write_bias_partials(const Acc* warp_bias, Acc* partial, int C) {
  __syncthreads();
  int64_t row = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    Acc s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_bias[w * C + c];
    partial[row * C + c] = s;
  }
}

// y = h * r, r = (mean_c h^2 + eps)^-1/2  =>  dh = r * dy - h * r^3 * mean_c(dy * h);
// with a bias the leaky ReLU's slope is applied and per-channel sums go to partial[row, c].
template <typename T, typename Acc>
__global__ void bwd_pixel_per_thread(const T* __restrict__ x, const void* bias, int bias_dtype,
                                     const T* __restrict__ dy, T* __restrict__ dx, Acc* __restrict__ partial,
                                     int C, int64_t P, int64_t sb, int64_t sc, int64_t sp, Acc slope, Acc eps) {
  extern __shared__ unsigned char smem_raw[];
  Acc* warp_bias = reinterpret_cast<Acc*>(smem_raw);  // [kWarps, C]
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t p = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock + threadIdx.x;
  bool live = p < P;
  int64_t base = blockIdx.y * sb + (live ? p : 0) * sp;
  CompensatedSum<Acc> ss, proj;
  if (live) {
    for (int c = 0; c < C; ++c) {
      int64_t off = base + c * sc;
      Acc h = activation<T, Acc>(x, bias, bias_dtype, off, c, slope);
      ss.add(mul_rn(h, h));
      proj.add(mul_rn(to_acc<Acc>(dy[off]), h));
    }
  }
  Acc r = inv_sqrt(ss.value() / C + eps);
  Acc k = r * r * r * proj.value() / C;
  for (int c = 0; c < C; ++c) {
    Acc dh = 0;
    if (live) {
      int64_t off = base + c * sc;
      Acc h = activation<T, Acc>(x, bias, bias_dtype, off, c, slope);
      dh = r * to_acc<Acc>(dy[off]) - h * k;
      if (bias != nullptr) {
        Acc a = to_acc<Acc>(x[off]) + load_any<Acc>(bias, bias_dtype, c);
        dh = a > Acc(0) ? dh : dh * slope;
      }
      dx[off] = from_acc<T>(dh);
    }
    if (partial != nullptr) {
      Acc s = warp_sum(dh);
      if (lane == 0) warp_bias[warp * C + c] = s;
    }
  }
  if (partial != nullptr) write_bias_partials(warp_bias, partial, C);
}

template <typename T, typename Acc>
__global__ void bwd_warp_per_pixel(const T* __restrict__ x, const void* bias, int bias_dtype,
                                   const T* __restrict__ dy, T* __restrict__ dx, Acc* __restrict__ partial,
                                   int C, int64_t P, int64_t sb, int64_t sc, int64_t sp, Acc slope, Acc eps) {
  extern __shared__ unsigned char smem_raw[];
  Acc* warp_bias = reinterpret_cast<Acc*>(smem_raw);  // [kWarps, C]; lanes own distinct channels
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (partial != nullptr)
    for (int c = lane; c < C; c += 32) warp_bias[warp * C + c] = 0;
  int64_t first = static_cast<int64_t>(blockIdx.x) * kPixelsPerBlock;
  for (int64_t p = first + warp; p < min(first + kPixelsPerBlock, P); p += kWarps) {
    int64_t base = blockIdx.y * sb + p * sp;
    Acc ss = 0, proj = 0;
    for (int c = lane; c < C; c += 32) {
      int64_t off = base + c * sc;
      Acc h = activation<T, Acc>(x, bias, bias_dtype, off, c, slope);
      ss += h * h;
      proj += to_acc<Acc>(dy[off]) * h;
    }
    ss = __shfl_sync(0xffffffffu, warp_sum(ss), 0);
    proj = __shfl_sync(0xffffffffu, warp_sum(proj), 0);
    Acc r = inv_sqrt(ss / C + eps);
    Acc k = r * r * r * proj / C;
    for (int c = lane; c < C; c += 32) {
      int64_t off = base + c * sc;
      Acc h = activation<T, Acc>(x, bias, bias_dtype, off, c, slope);
      Acc dh = r * to_acc<Acc>(dy[off]) - h * k;
      if (bias != nullptr) {
        Acc a = to_acc<Acc>(x[off]) + load_any<Acc>(bias, bias_dtype, c);
        dh = a > Acc(0) ? dh : dh * slope;
        if (partial != nullptr) warp_bias[warp * C + c] += dh;
      }
      dx[off] = from_acc<T>(dh);
    }
  }
  if (partial != nullptr) write_bias_partials(warp_bias, partial, C);
}

dim3 grid_for(int64_t B, int64_t P) {
  if (B > 65535) throw std::invalid_argument("pixel_norm (cuda): batch larger than 65535");
  return dim3(static_cast<unsigned>((P + kPixelsPerBlock - 1) / kPixelsPerBlock), static_cast<unsigned>(B));
}

}  // namespace

int64_t pixel_norm_partial_rows(int64_t B, int64_t P) { return B * ((P + kPixelsPerBlock - 1) / kPixelsPerBlock); }

void pixel_norm_forward(std::uintptr_t x, std::uintptr_t bias, int bias_dtype, std::uintptr_t y, int dtype,
                        int64_t B, int64_t C, int64_t P, int64_t sb, int64_t sc, int64_t sp,
                        double slope, double eps, std::uintptr_t stream) {
  dim3 grid = grid_for(B, P);
  const void* b = reinterpret_cast<const void*>(bias);
  dispatch_dtype(dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    auto xp = reinterpret_cast<const T*>(x);
    auto yp = reinterpret_cast<T*>(y);
    if (sp == 1)
      fwd_pixel_per_thread<T, Acc><<<grid, kThreads, 0, as_stream(stream)>>>(xp, b, bias_dtype, yp, int(C), P, sb, sc, sp,
                                                                               Acc(slope), Acc(eps));
    else
      fwd_warp_per_pixel<T, Acc><<<grid, kThreads, 0, as_stream(stream)>>>(xp, b, bias_dtype, yp, int(C), P, sb, sc, sp,
                                                                             Acc(slope), Acc(eps));
  });
  check_launch("pixel_norm_forward");
}

void pixel_norm_backward(std::uintptr_t x, std::uintptr_t bias, int bias_dtype, std::uintptr_t dy, std::uintptr_t dx,
                         std::uintptr_t partial, int dtype, int64_t B, int64_t C, int64_t P, int64_t sb, int64_t sc,
                         int64_t sp, double slope, double eps, std::uintptr_t stream) {
  if (partial != 0 && C > kMaxBiasGradChannels)
    throw std::invalid_argument("pixel_norm_backward (cuda): the bias gradient supports up to 1024 channels");
  dim3 grid = grid_for(B, P);
  const void* b = reinterpret_cast<const void*>(bias);
  dispatch_dtype(dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    auto xp = reinterpret_cast<const T*>(x);
    auto dyp = reinterpret_cast<const T*>(dy);
    auto dxp = reinterpret_cast<T*>(dx);
    auto pp = reinterpret_cast<Acc*>(partial);
    size_t smem = partial ? sizeof(Acc) * kWarps * C : 0;
    if (sp == 1)
      bwd_pixel_per_thread<T, Acc><<<grid, kThreads, smem, as_stream(stream)>>>(xp, b, bias_dtype, dyp, dxp, pp, int(C),
                                                                                  P, sb, sc, sp, Acc(slope), Acc(eps));
    else
      bwd_warp_per_pixel<T, Acc><<<grid, kThreads, smem, as_stream(stream)>>>(xp, b, bias_dtype, dyp, dxp, pp, int(C), P,
                                                                                sb, sc, sp, Acc(slope), Acc(eps));
  });
  check_launch("pixel_norm_backward");
}

}  // namespace xrayforge
