// Input checks of the NMS family, shared by the CPU and CUDA kernels so both accept and reject the same inputs
// (host code, ATen). The Python wrappers give the friendly messages; these keep a direct torch.ops call from reading
// out of bounds or mixing dtypes. Value checks (NaN scores) are the CPU kernel's and the Python wrappers': on CUDA
// they would need a device-to-host read.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace iouctl {
namespace nms_checks {

inline void check_boxes(const at::Tensor& boxes) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "boxes must be Tensor[N, 4] (x1, y1, x2, y2), got shape ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(boxes.scalar_type()), "boxes must be floating point, got ",
                    boxes.scalar_type());
  TORCH_CHECK_VALUE(boxes.size(0) < std::numeric_limits<int32_t>::max(), "at most 2^31 - 2 boxes are supported, got ",
                    boxes.size(0));
}

// One value per box, on the boxes' device: floating (scores, ious) or integer category ids (idxs; not bool).
inline void check_vector(const at::Tensor& t, const char* name, const at::Tensor& boxes, bool floating) {
  const int64_t n = boxes.size(0);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be Tensor[N] with N = ", n,
                    " (one per box), got shape ", t.sizes());
  if (floating) {
    TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  } else {
    TORCH_CHECK_VALUE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                      " must be an integer tensor of category ids, got ", t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.device() == boxes.device(), name, " is on ", t.device(), " but boxes are on ", boxes.device());
}

inline void check_iou_threshold(double thr) {
  TORCH_CHECK_VALUE(thr >= 0.0 && thr <= 1.0, "iou_threshold must be in [0, 1], got ", thr);
}

// The dtype the IoU is computed in: half / bfloat16 boxes in float32, as the IoU of large coordinates overflows half.
inline at::ScalarType compute_type(const at::Tensor& boxes) {
  return boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace nms_checks
}  // namespace iouctl
