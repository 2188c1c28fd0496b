// Shared helpers for the xrayforge CUDA kernels: dtype codes, conversions, launch checks.
// Kernels take raw device pointers and the caller's stream, so nothing here depends on libtorch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace xrayforge {

// Must match _dtype_code() in xrayforge/ops: float32, float16, bfloat16, float64.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

template <typename Acc> __device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) {
  return static_cast<Acc>(__bfloat162float(v));
}

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }

// Load element i of a buffer whose dtype is only known at run time (used for small vectors
// such as biases, whose dtype may differ from the activations' under autocast).
template <typename Acc>
__device__ __forceinline__ Acc load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return to_acc<Acc>(static_cast<const __half*>(p)[i]);
    case kBFloat16: return to_acc<Acc>(static_cast<const __nv_bfloat16*>(p)[i]);
    case kFloat64: return static_cast<Acc>(static_cast<const double*>(p)[i]);
    default: return static_cast<Acc>(static_cast<const float*>(p)[i]);
  }
}

template <typename Acc> __device__ __forceinline__ Acc inv_sqrt(Acc v) { return Acc(1) / sqrt(v); }

// Products rounded on their own (no contraction into a following add), so that a compensated
// sum sees exactly the term it adds.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Neumaier's compensated sum: one thread summing many terms (a pixel's channels) stays within
// a few units in the last place, like the tree reductions of eager PyTorch; a plain running sum
// of 512 float32 terms drifts several times further.
template <typename Acc> struct CompensatedSum {
  Acc sum = 0, comp = 0;
  __device__ __forceinline__ void add(Acc v) {
    Acc t = add_rn(sum, v);
    // once the sum is inf or NaN that is the answer: its correction would be inf - inf = NaN, and an
    // infinite sum of squares (one inf, or squares past the float range) would give NaN, not the
    // reference's x / inf = 0 in the pixel's finite channels
    if (isfinite(t)) comp += fabs(sum) >= fabs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  __device__ __forceinline__ Acc value() const { return sum + comp; }
};

template <typename Acc> __device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Calls f(T{}, Acc{}) for the activation dtype code: T is the storage type, Acc the type the
// kernel computes in (float, or double for float64 tensors).
template <typename F> void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}, float{}); break;
    case kFloat16: f(__half{}, float{}); break;
    case kBFloat16: f(__nv_bfloat16{}, float{}); break;
    case kFloat64: f(double{}, double{}); break;
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
  }
}

}  // namespace xrayforge
