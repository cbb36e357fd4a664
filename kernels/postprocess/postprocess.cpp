// Schemas of the post-processing ops (iouctl::*) that came after greedy NMS: DIoU-NMS, Matrix NMS, Cluster-NMS, box
// voting and Weighted Boxes Fusion. Kernels: postprocess_cpu.cpp (per-element math: postprocess_math.h); fake kernels
// and the pure-PyTorch references in iouctl/ops/postprocess.py.
// Each op runs independently per value of `idxs` (None: all boxes are one group), all groups in one call. Boxes are
// xyxy; ranking is by decreasing score, ties by increasing index; lists of kept boxes of several groups are merged in
// that order (Weighted Boxes Fusion: by decreasing fused score).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(iouctl, m) {
  // DIoU-NMS (Zheng et al. AAAI 2020): greedy, suppress when IoU - (rho^2 / c^2)^beta > iou_threshold.
  // Returns keep int64[K].
  m.def("diou_nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, float beta) -> Tensor");
  // Matrix NMS (SOLOv2) for boxes, kernel "gaussian" or "linear". Returns the decayed scores [N], input order.
  m.def("matrix_nms(Tensor boxes, Tensor scores, Tensor? idxs, str kernel, float sigma) -> Tensor");
  // Cluster-NMS (Zheng et al. 2021) with its score penalty (spm), distance (+D) and weighted-coordinate (+W) variants.
  // Returns (keep int64[K], scores[K] (decayed with spm), boxes[K, 4] (weighted with +W)).
  m.def(
      "cluster_nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, bool spm, bool distance,"
      " bool weighted, float sigma, float beta, float weight_threshold, float score_threshold, int max_iterations)"
      " -> (Tensor, Tensor, Tensor)");
  // Greedy NMS, then each kept box = score-weighted mean of the group's boxes overlapping it by >= vote_threshold
  // (Gidaris & Komodakis 2015; Detectron's BBOX_VOTE). Returns (keep int64[K], boxes[K, 4]).
  m.def(
      "box_voting(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, float vote_threshold)"
      " -> (Tensor, Tensor)");
  // Weighted Boxes Fusion (Solovyev et al. 2021) of one model's boxes, conf_type "avg" or "max".
  // Returns (index int64[K]: each cluster's first (best) box, fused boxes[K, 4], fused scores[K]).
  m.def(
      "weighted_boxes_fusion(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold,"
      " float skip_box_threshold, str conf_type) -> (Tensor, Tensor, Tensor)");
}
