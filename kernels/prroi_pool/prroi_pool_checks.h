// Argument checks of Precise RoI Pooling, shared by the CPU kernels (prroi_pool_cpu.cpp: the prefix-sum default and
// the direct implementation) and the CUDA kernels (prroi_pool_cuda.cu), so all accept and reject the same calls with
// the same messages (host code, ATen). Batch indices are checked where the geometry is computed.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace iouctl {
namespace prroi_checks {

// input [N, C, H, W] and rois [K, 5] on one device (a CUDA one where `cuda`), a positive output size, a finite
// positive spatial_scale.
inline void check_arguments(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW, double scale,
                            bool cuda) {
  TORCH_CHECK_VALUE(input.dim() == 4, "prroi_pool: input must be [N, C, H, W]; got shape ", input.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "prroi_pool: rois must be [K, 5] (batch index, x1, y1, x2, y2); got shape ", rois.sizes());
  TORCH_CHECK_VALUE((!cuda || input.is_cuda()) && rois.device() == input.device(), "prroi_pool: input is on ",
                    input.device(), " but rois on ", rois.device(), cuda ? "; both must be on one CUDA device" : "");
  TORCH_CHECK_VALUE(PH > 0 && PW > 0, "prroi_pool: output size must be positive; got (", PH, ", ", PW, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "prroi_pool: spatial_scale must be finite and > 0; got ",
                    scale);
}

// The direct and CUDA kernels take any floating dtype (half and bfloat16 accumulate in float).
inline void check_floating(const at::Tensor& input, const at::Tensor& rois) {
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()) && at::isFloatingType(rois.scalar_type()),
                    "prroi_pool: input and rois must be floating point; got ", input.scalar_type(), " and ",
                    rois.scalar_type());
}

// The backward's grad and saved output: [K, C, PH, PW] in the input's dtype.
inline void check_backward(const at::Tensor& grad, const at::Tensor& output, const at::Tensor& input,
                           const at::Tensor& rois, int64_t PH, int64_t PW) {
  const int64_t K = rois.size(0), C = input.size(1);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({K, C, PH, PW}) && output.sizes() == grad.sizes(),
                    "prroi_pool backward: grad and output must be [K, C, PH, PW] = [", K, ", ", C, ", ", PH, ", ",
                    PW, "]; got ", grad.sizes(), " and ", output.sizes());
  TORCH_CHECK_VALUE(grad.scalar_type() == input.scalar_type() && output.scalar_type() == input.scalar_type(),
                    "prroi_pool backward: grad and output must have the input's dtype ", input.scalar_type());
}

}  // namespace prroi_checks
}  // namespace iouctl
