// Schemas of the NMS family (iouctl::*). Kernels: nms_cpu.cpp, nms_cuda.cu; fake kernels in iouctl/ops/nms.py.
// FRAGMENT, not TORCH_LIBRARY: several separately built libraries share the `iouctl` namespace.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(iouctl, m) {
  // Greedy NMS ranked by `ious` (IoU-Net Algorithm 1). Returns (keep int64[K] in decreasing `ious`,
  // cluster_scores[K] = max of `scores` over the boxes each kept box suppressed, itself included).
  // Greedy NMS is this op with scores == ious.
  m.def("iou_guided_nms(Tensor boxes, Tensor scores, Tensor ious, float iou_threshold) -> (Tensor, Tensor)");
  // Same, independently per value of `idxs`; kept boxes of all classes merged in decreasing `ious`.
  m.def(
      "batched_iou_guided_nms(Tensor boxes, Tensor scores, Tensor ious, Tensor idxs, float iou_threshold)"
      " -> (Tensor, Tensor)");
  // Soft-NMS (Bodla et al. 2017), method "linear" or "gaussian". Returns (keep, decayed scores) in selection order.
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, str method, float sigma, float iou_threshold, float score_threshold)"
      " -> (Tensor, Tensor)");
  m.def(
      "batched_soft_nms(Tensor boxes, Tensor scores, Tensor idxs, str method, float sigma, float iou_threshold,"
      " float score_threshold) -> (Tensor, Tensor)");
}
