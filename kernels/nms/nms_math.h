// Per-element math of the NMS family, shared by the CPU kernels (nms_cpu.cpp), the CUDA kernels (nms_cuda.cu) and
// other op libraries (`#include "nms/nms_math.h"`; kernels/ is on every library's include path).
//
// The IoU is torchvision's CPU nms expression, in the boxes' dtype:
//   inter / (area_i + area_j - inter), area = (x2 - x1) * (y2 - y1), w = max(0, min(x2) - max(x1)), same for h,
// with max(a, b) = a < b ? b : a and min(a, b) = b < a ? b : a (std::max / std::min: the argument order fixes which
// operand a NaN comparison returns). Zero-union rule: none -- two empty boxes give 0 / 0 = NaN, and a NaN overlap
// never suppresses (`suppresses` is `iou > thr`, false for NaN). That keeps keep sets equal to torchvision's bit for
// bit. On the device every operation is a round-to-nearest intrinsic (__fmul_rn, ...): nvcc may neither contract
// them into an FMA nor approximate them, so a GPU computes exactly what the CPU computes, whatever the flags.
#pragma once

#include <cmath>
#include <limits>

#include "common/host_device.h"

namespace iouctl {

// std::max / std::min semantics (the first argument unless the comparison holds), usable on the device.
template <typename T>
IOUCTL_HOST_DEVICE T max_(T a, T b) { return a < b ? b : a; }
template <typename T>
IOUCTL_HOST_DEVICE T min_(T a, T b) { return b < a ? b : a; }

// IEEE round-to-nearest arithmetic, add_rn / sub_rn / mul_rn / div_rn for float and double: plain operators on the
// host (GCC contracts into FMA only with -mfma, which the builds do not pass), the _rn intrinsics on the device (nvcc
// contracts a * b + c into an FMA by default). Each pass of nvcc preprocesses this file with its own __CUDA_ARCH__.
#ifdef __CUDA_ARCH__
#define IOUCTL_RN(name, op, float_rn, double_rn)                                \
  IOUCTL_HOST_DEVICE float name(float a, float b) { return float_rn(a, b); }   \
  IOUCTL_HOST_DEVICE double name(double a, double b) { return double_rn(a, b); }
#else
#define IOUCTL_RN(name, op, float_rn, double_rn)                       \
  IOUCTL_HOST_DEVICE float name(float a, float b) { return a op b; } \
  IOUCTL_HOST_DEVICE double name(double a, double b) { return a op b; }
#endif
IOUCTL_RN(add_rn, +, __fadd_rn, __dadd_rn)
IOUCTL_RN(sub_rn, -, __fsub_rn, __dsub_rn)
IOUCTL_RN(mul_rn, *, __fmul_rn, __dmul_rn)
IOUCTL_RN(div_rn, /, __fdiv_rn, __ddiv_rn)
#undef IOUCTL_RN

// Area of an xyxy box: (x2 - x1) * (y2 - y1); negative for an inverted box, as in torchvision.
template <typename T>
IOUCTL_HOST_DEVICE T box_area(T x1, T y1, T x2, T y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// IoU of box i (corners and precomputed area) with box j: the structure-of-arrays form the hot loops use.
template <typename T>
IOUCTL_HOST_DEVICE T box_iou(T ix1, T iy1, T ix2, T iy2, T ia, T jx1, T jy1, T jx2, T jy2, T ja) {
  const T w = max_(static_cast<T>(0), sub_rn(min_(ix2, jx2), max_(ix1, jx1)));
  const T h = max_(static_cast<T>(0), sub_rn(min_(iy2, jy2), max_(iy1, jy1)));
  const T inter = mul_rn(w, h);
  return div_rn(inter, sub_rn(add_rn(ia, ja), inter));
}

// IoU of two xyxy boxes given as 4 contiguous coordinates (a[0..3], b[0..3]); same value as the form above.
template <typename T>
IOUCTL_HOST_DEVICE T box_iou(const T* a, const T* b) {
  return box_iou<T>(a[0], a[1], a[2], a[3], box_area<T>(a[0], a[1], a[2], a[3]),
                    b[0], b[1], b[2], b[3], box_area<T>(b[0], b[1], b[2], b[3]));
}

// Greedy / IoU-guided suppression rule (IoU-Net Alg. 1): a lower-ranked box goes when its overlap with a kept box
// exceeds the threshold; a NaN overlap never suppresses. `thr` comes from threshold_as (below).
template <typename T>
IOUCTL_HOST_DEVICE bool suppresses(T iou, T thr) { return iou > thr; }

// Soft-NMS score factor (Bodla et al. 2017) for a box overlapping the selected one by `iou`:
// linear: 1 - iou above the threshold, else 1; gaussian: exp(-iou^2 / sigma) for iou > 0, else 1 (exp(0) = 1, so
// only overlapping boxes change). A NaN overlap gives 1 (both tests are false for NaN). Computed in float64.
template <typename T>
IOUCTL_HOST_DEVICE double soft_nms_weight(T iou, bool gaussian, double sigma, T thr) {
  if (gaussian) {
    if (!(iou > static_cast<T>(0))) return 1.0;
    const double o = static_cast<double>(iou);
    return exp(-(o * o) / sigma);
  }
  return iou > thr ? 1.0 - static_cast<double>(iou) : 1.0;
}

// The largest T not above thr, so that for every T x: (double)x > thr  <=>  x > threshold_as<T>(thr).
// torchvision compares the T overlap with the double threshold; this keeps the comparison in T lanes. Host only.
template <typename T>
inline T threshold_as(double thr) {
  T t = static_cast<T>(thr);
  if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

}  // namespace iouctl
