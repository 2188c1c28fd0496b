// Minibatch standard deviation (official PGGAN semantics; see xrayforge/ops/minibatch_stddev.py).
// Sample n = g * M + m is member g of group m. For group m and channel slice f, the statistic
// is the mean over the slice's K = (C/F)*H*W elements of sqrt(biased var over g + 1e-8).
#include "common.cuh"
#include "ops.h"

namespace xrayforge {
namespace {

constexpr int kThreads = 256;

struct GroupGeometry {
  int G, M, F, CF, H, W;
  int64_t sn, sc, sh, sw;  // strides of x
  __device__ __forceinline__ int64_t inner(int f, int64_t k, int64_t sc_, int64_t sh_, int64_t sw_) const {
    int64_t hw = static_cast<int64_t>(H) * W;
    int64_t c = static_cast<int64_t>(f) * CF + k / hw, p = k % hw;
    return c * sc_ + (p / W) * sh_ + (p % W) * sw_;
  }
};

template <typename T, typename Acc>
__device__ __forceinline__ void group_moments(const T* x, const GroupGeometry& g, int m, int64_t inner, Acc& mean,
                                              Acc& sigma) {
  Acc s = 0;
  for (int i = 0; i < g.G; ++i) s += to_acc<Acc>(x[(static_cast<int64_t>(i) * g.M + m) * g.sn + inner]);
  mean = s / g.G;
  Acc v = 0;
  for (int i = 0; i < g.G; ++i) {
    Acc d = to_acc<Acc>(x[(static_cast<int64_t>(i) * g.M + m) * g.sn + inner]) - mean;
    v += d * d;
  }
  sigma = sqrt(v / g.G + Acc(1e-8));
}

// One block per (group, slice): copies the slice of x into out and writes the statistic.
template <typename T, typename Acc>
__global__ void mbstd_fwd(const T* __restrict__ x, T* __restrict__ out, Acc* __restrict__ stat, GroupGeometry g,
                          int64_t son, int64_t soc, int64_t soh, int64_t sow) {
  __shared__ Acc warp_sums[kThreads / 32];
  int mf = blockIdx.x, m = mf / g.F, f = mf % g.F;
  int64_t K = static_cast<int64_t>(g.CF) * g.H * g.W;
  Acc acc = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    int64_t xin = g.inner(f, k, g.sc, g.sh, g.sw), oin = g.inner(f, k, soc, soh, sow);
    Acc mean, sigma;
    group_moments<T, Acc>(x, g, m, xin, mean, sigma);
    acc += sigma;
    for (int i = 0; i < g.G; ++i) {
      int64_t n = static_cast<int64_t>(i) * g.M + m;
      out[n * son + oin] = x[n * g.sn + xin];
    }
  }
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];  // fixed order: deterministic
    stat[mf] = s / K;
  }
}

// dx = dout[:, :C] + coef[m, f] * (x - mean) / (G * sigma), coef = dstat / K.
template <typename T, typename Acc>
__global__ void mbstd_bwd(const T* __restrict__ x, const T* __restrict__ dout, const Acc* __restrict__ coef,
                          T* __restrict__ dx, GroupGeometry g, int64_t sdn, int64_t sdc, int64_t sdh, int64_t sdw) {
  int mf = blockIdx.y, m = mf / g.F, f = mf % g.F;
  int64_t K = static_cast<int64_t>(g.CF) * g.H * g.W;
  int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= K) return;
  int64_t xin = g.inner(f, k, g.sc, g.sh, g.sw), din = g.inner(f, k, sdc, sdh, sdw);
  Acc mean, sigma;
  group_moments<T, Acc>(x, g, m, xin, mean, sigma);
  Acc scale = coef[mf] / (g.G * sigma);
  for (int i = 0; i < g.G; ++i) {
    int64_t n = static_cast<int64_t>(i) * g.M + m;
    Acc d = to_acc<Acc>(x[n * g.sn + xin]) - mean;
    dx[n * g.sn + xin] = from_acc<T>(to_acc<Acc>(dout[n * sdn + din]) + scale * d);
  }
}

}  // namespace

void minibatch_stddev_forward(std::uintptr_t x, std::uintptr_t out, std::uintptr_t stat, int dtype, int G, int M,
                              int F, int CF, int H, int W, int64_t sxn, int64_t sxc, int64_t sxh, int64_t sxw,
                              int64_t son, int64_t soc, int64_t soh, int64_t sow, std::uintptr_t stream) {
  GroupGeometry g{G, M, F, CF, H, W, sxn, sxc, sxh, sxw};
  dispatch_dtype(dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    mbstd_fwd<T, Acc><<<M * F, kThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<T*>(out), reinterpret_cast<Acc*>(stat), g, son, soc, soh, sow);
  });
  check_launch("minibatch_stddev_forward");
}

void minibatch_stddev_backward(std::uintptr_t x, std::uintptr_t dout, std::uintptr_t coef, std::uintptr_t dx,
                               int dtype, int G, int M, int F, int CF, int H, int W, int64_t sxn, int64_t sxc,
                               int64_t sxh, int64_t sxw, int64_t sdn, int64_t sdc, int64_t sdh, int64_t sdw,
                               std::uintptr_t stream) {
  GroupGeometry g{G, M, F, CF, H, W, sxn, sxc, sxh, sxw};
  int64_t K = static_cast<int64_t>(CF) * H * W;
  dim3 grid(static_cast<unsigned>((K + kThreads - 1) / kThreads), static_cast<unsigned>(M * F));
  dispatch_dtype(dtype, [&](auto t_tag, auto acc_tag) {
    using T = decltype(t_tag);
    using Acc = decltype(acc_tag);
    mbstd_bwd<T, Acc><<<grid, kThreads, 0, as_stream(stream)>>>(reinterpret_cast<const T*>(x),
                                                                reinterpret_cast<const T*>(dout),
                                                                reinterpret_cast<const Acc*>(coef),
                                                                reinterpret_cast<T*>(dx), g, sdn, sdc, sdh, sdw);
  });
  check_launch("minibatch_stddev_backward");
}

}  // namespace xrayforge
