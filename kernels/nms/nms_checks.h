// Input checks of the NMS family, shared by the CPU and CUDA kernels so both accept and reject the same inputs
// (host code, ATen). The Python wrappers give the friendly messages; these keep a direct torch.ops call from reading
// out of bounds or mixing dtypes. Value checks (NaN scores) are the CPU kernel's and the Python wrappers': on CUDA
// they would need a device-to-host read. Also the two IoU-guided entry points each backend registers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <tuple>

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

// The arguments of iou_guided_nms, and of batched_iou_guided_nms where `idxs` is given (else null).
inline void check_iou_guided(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                             const at::Tensor* idxs, double iou_threshold) {
  check_boxes(boxes);
  check_vector(scores, "scores", boxes, true);
  check_vector(ious, "ious", boxes, true);
  if (idxs != nullptr) check_vector(*idxs, "idxs", boxes, false);
  check_iou_threshold(iou_threshold);
}

// iou_guided_nms and batched_iou_guided_nms of a backend, over its one function that takes `idxs` or null:
// m.impl("iou_guided_nms", TORCH_FN(IoUGuidedOps<dispatch>::nms)), likewise ::batched_nms.
using IoUGuidedResult = std::tuple<at::Tensor, at::Tensor>;  // (keep Tensor[K] int64, cluster scores Tensor[K])
template <IoUGuidedResult (*Dispatch)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*,
                                      double)>
struct IoUGuidedOps {
  static IoUGuidedResult nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                             double iou_threshold) {
    return Dispatch(boxes, scores, ious, nullptr, iou_threshold);
  }
  static IoUGuidedResult batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                                     const at::Tensor& idxs, double iou_threshold) {
    return Dispatch(boxes, scores, ious, &idxs, iou_threshold);
  }
};

// The dtype the IoU is computed in: half / bfloat16 boxes in float32, as the IoU of large coordinates overflows half.
inline at::ScalarType compute_type(const at::Tensor& boxes) {
  return boxes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace nms_checks
}  // namespace iouctl
