// Per-element rules of the post-processing ops (DIoU-NMS, Matrix NMS, Cluster-NMS, box voting, Weighted Boxes
// Fusion), shared by their kernels (postprocess_cpu.cpp; a CUDA kernel would include it too). The IoU itself is
// iouctl::box_iou of nms/nms_math.h (torchvision's expression in the boxes' dtype): one IoU for every op library.
// Rules built on it are computed in float64. A NaN IoU (0 / 0: two empty boxes) counts as no overlap everywhere:
// every comparison below is false for NaN, and the folds (min_ / max_) keep their running value against a NaN.
#pragma once

#include <cmath>

#include "nms/nms_math.h"

namespace iouctl {

// DIoU penalty (Zheng et al. AAAI 2020, eq. 6; darknet's box_diounms): (rho^2 / c^2)^beta, rho the distance between
// the box centres, c the diagonal of the smallest box enclosing both; 0 when c = 0 (both boxes one and the same
// point). In float64 from the boxes' coordinates; >= 0, so the DIoU never exceeds the IoU.
template <typename T>
IOUCTL_HOST_DEVICE double diou_penalty(T ax1, T ay1, T ax2, T ay2, T bx1, T by1, T bx2, T by2, double beta) {
  const double dx = 0.5 * (static_cast<double>(ax1) + static_cast<double>(ax2)) -
                    0.5 * (static_cast<double>(bx1) + static_cast<double>(bx2));
  const double dy = 0.5 * (static_cast<double>(ay1) + static_cast<double>(ay2)) -
                    0.5 * (static_cast<double>(by1) + static_cast<double>(by2));
  const double cw = static_cast<double>(max_(ax2, bx2)) - static_cast<double>(min_(ax1, bx1));
  const double ch = static_cast<double>(max_(ay2, by2)) - static_cast<double>(min_(ay1, by1));
  const double c2 = cw * cw + ch * ch;
  if (!(c2 > 0.0)) return 0.0;
  return pow((dx * dx + dy * dy) / c2, beta);
}

// DIoU-NMS suppression value: IoU - penalty, compared with the threshold by `> thr` (darknet; the paper writes >=).
// A NaN IoU (0 / 0, two empty boxes) gives NaN, which never suppresses.
template <typename T>
IOUCTL_HOST_DEVICE double diou_value(T iou, double penalty) { return static_cast<double>(iou) - penalty; }

// Matrix NMS (SOLOv2, Wang et al. 2020; PaddlePaddle's matrix_nms for boxes): box i, ranked above j with overlap iou
// and itself most overlapped (comp) by a box ranked above it, decays j by f(iou) / f(comp):
//   gaussian f(x) = exp(-sigma x^2): exp(sigma (comp^2 - iou^2)), kept as its exponent comp^2 - iou^2: exp is
//   monotone, so the min over i of the decays is exp(sigma * min of the exponents) (capped at 1: exponent 0);
//   linear f(x) = 1 - x: (1 - iou) / (1 - comp), capped at 1.
// decay_j = min over i of these. A NaN term (an empty box's 0 / 0; a linear 0 / 0 of a duplicate of a duplicate) and a
// +inf term (comp = 1) are no decay: callers fold with min_, which keeps the running value against NaN.
template <typename T>
IOUCTL_HOST_DEVICE double matrix_gaussian_exponent(T iou, T comp) {
  const double o = static_cast<double>(iou), c = static_cast<double>(comp);
  return c * c - o * o;
}
IOUCTL_HOST_DEVICE double matrix_gaussian_decay(double min_exponent, double sigma) {
  return exp(sigma * min_exponent);
}
template <typename T>
IOUCTL_HOST_DEVICE double matrix_linear_decay(T iou, T comp) {
  return (1.0 - static_cast<double>(iou)) / (1.0 - static_cast<double>(comp));
}

// Cluster-NMS score penalty (Zheng et al. 2021, SPM; the official cluster_SPM_nms / cluster_SPM_dist_nms): a kept box
// overlapping j by iou multiplies j's score by exp(-iou^2 / sigma) (sigma 0.2), with the distance term (+D) by
// min(exp(-iou^2 / sigma) + D, 1), D the DIoU penalty. No overlap (or NaN): 1.
template <typename T>
IOUCTL_HOST_DEVICE double spm_factor(T iou, double sigma, bool with_distance, double d) {
  if (!(iou > static_cast<T>(0))) return 1.0;
  const double o = static_cast<double>(iou);
  const double f = exp(-(o * o) / sigma);
  return with_distance ? min_(f + d, 1.0) : f;
}

// Box voting (Detectron's box_voting): box j votes for a kept box when their IoU >= vote_threshold (NaN: no).
template <typename T>
IOUCTL_HOST_DEVICE bool votes(T iou, double vote_threshold) { return static_cast<double>(iou) >= vote_threshold; }

// Weighted mean of boxes (box voting, Cluster-NMS +W, Weighted Boxes Fusion), accumulated in float64 in call order.
struct WeightedBox {
  double x1 = 0.0, y1 = 0.0, x2 = 0.0, y2 = 0.0, w = 0.0;
  IOUCTL_HOST_DEVICE void add(double weight, double bx1, double by1, double bx2, double by2) {
    x1 += weight * bx1; y1 += weight * by1; x2 += weight * bx2; y2 += weight * by2; w += weight;
  }
  // Writes sum(w b) / sum(w); false (nothing written) when the weights sum to 0: the caller keeps a fallback box.
  IOUCTL_HOST_DEVICE bool mean(double* out) const {
    if (!(w > 0.0)) return false;
    out[0] = x1 / w; out[1] = y1 / w; out[2] = x2 / w; out[3] = y2 / w;
    return true;
  }
};

}  // namespace iouctl
