// Host entry points of the xrayforge CUDA kernels. Pointers are raw device addresses, the
// stream is a cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>

namespace xrayforge {

int64_t pixel_norm_partial_rows(int64_t B, int64_t P);
void pixel_norm_forward(std::uintptr_t x, std::uintptr_t bias, int bias_dtype, std::uintptr_t y, int dtype, int64_t B,
                        int64_t C, int64_t P, int64_t sb, int64_t sc, int64_t sp, double slope, double eps,
                        std::uintptr_t stream);
void pixel_norm_backward(std::uintptr_t x, std::uintptr_t bias, int bias_dtype, std::uintptr_t dy, std::uintptr_t dx,
                         std::uintptr_t partial, int dtype, int64_t B, int64_t C, int64_t P, int64_t sb, int64_t sc,
                         int64_t sp, double slope, double eps, std::uintptr_t stream);
void minibatch_stddev_forward(std::uintptr_t x, std::uintptr_t out, std::uintptr_t stat, int dtype, int G, int M,
                              int F, int CF, int H, int W, int64_t sxn, int64_t sxc, int64_t sxh, int64_t sxw,
                              int64_t son, int64_t soc, int64_t soh, int64_t sow, std::uintptr_t stream);
void minibatch_stddev_backward(std::uintptr_t x, std::uintptr_t dout, std::uintptr_t coef, std::uintptr_t dx,
                               int dtype, int G, int M, int F, int CF, int H, int W, int64_t sxn, int64_t sxc,
                               int64_t sxh, int64_t sxw, int64_t sdn, int64_t sdc, int64_t sdh, int64_t sdw,
                               std::uintptr_t stream);

}  // namespace xrayforge
