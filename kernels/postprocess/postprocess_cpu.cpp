// CPU kernels of the post-processing ops: DIoU-NMS, Matrix NMS, Cluster-NMS (+SPM, +D, +W), box voting and Weighted
// Boxes Fusion, each per group (`idxs`) in one call.
//
// Layout (as kernels/nms): boxes are sorted once (by group, then decreasing score, ties by increasing index) into
// structure-of-arrays coordinates, so the pairwise loops read memory linearly and vectorize (an AVX2 clone is chosen
// at run time). The IoU is iouctl::box_iou (nms/nms_math.h: torchvision's expression in the boxes' dtype); the rules
// built on it are in postprocess_math.h. Coordinate averages and score decays are computed in float64.
// Determinism: every order is a total order and groups write disjoint slices, so results do not depend on the thread
// count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/cpu_vectorize.h"
#include "common/group_order.h"
#include "nms/nms_checks.h"

IOUCTL_VECTORIZE_BEGIN
#include "postprocess/postprocess_math.h"

namespace {

using iouctl::cpu_has_avx2;
using iouctl::max_;
using iouctl::min_;
using iouctl::threshold_as;
using iouctl::nms_checks::compute_type;  // half / bfloat16 boxes are computed in float32, as in kernels/nms

constexpr int64_t kChunk = 512;  // IoUs computed (vectorized) per chunk before the scalar rules read them

// ---------------------------------------------------------------------------------------------------------------
// Sorted structure-of-arrays copy of one call's boxes.
template <typename T>
struct Sorted {
  int64_t n = 0;
  std::vector<int64_t> order;  // position -> original index: by group, decreasing score, increasing index
  std::vector<int64_t> seg;    // group starts (positions), then n
  std::vector<double> score;   // by position
  std::vector<T> x1, y1, x2, y2, area;

  int64_t groups() const { return static_cast<int64_t>(seg.size()) - 1; }
};

// The NMS family's checks (kernels/nms): both libraries accept and reject the same boxes, scores and group ids.
void check_inputs(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs) {
  iouctl::nms_checks::check_boxes(boxes);
  iouctl::nms_checks::check_vector(scores, "scores", boxes, /*floating=*/true);
  if (idxs.has_value()) iouctl::nms_checks::check_vector(*idxs, "idxs", boxes, /*floating=*/false);
}

void check_unit(double v, const char* name) {
  TORCH_CHECK_VALUE(v >= 0.0 && v <= 1.0, name, " must be in [0, 1], got ", v);
}

template <typename T>
Sorted<T> prepare(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs) {
  Sorted<T> s;
  const int64_t n = s.n = boxes.size(0);
  const at::Tensor boxes_c = boxes.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
  const at::Tensor score_t = scores.to(at::kCPU, at::kDouble).contiguous();
  const double* sc = score_t.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {  // NaN would break the strict weak ordering std::sort needs
    TORCH_CHECK_VALUE(!std::isnan(sc[i]), "scores contains NaN (first at index ", i,
                      "); ranking needs an order: replace or drop NaN scores first");
  }
  at::Tensor cat_t;
  const int64_t* cat = nullptr;
  if (idxs.has_value()) {
    cat_t = idxs->to(at::kCPU, at::kLong).contiguous();
    cat = cat_t.data_ptr<int64_t>();
  }
  s.order = iouctl::group_order(cat, sc, n);
  s.score.resize(n);
  s.x1.resize(n); s.y1.resize(n); s.x2.resize(n); s.y2.resize(n); s.area.resize(n);
  const T* b = boxes_c.data_ptr<T>();
  for (int64_t p = 0; p < n; ++p) {
    const int64_t i = s.order[p];
    s.score[p] = sc[i];
    const T x1 = b[4 * i], y1 = b[4 * i + 1], x2 = b[4 * i + 2], y2 = b[4 * i + 3];
    s.x1[p] = x1; s.y1[p] = y1; s.x2[p] = x2; s.y2[p] = y2;
    s.area[p] = iouctl::box_area<T>(x1, y1, x2, y2);
  }
  s.seg.push_back(0);
  for (int64_t p = 1; p < n; ++p)
    if (cat != nullptr && cat[s.order[p]] != cat[s.order[p - 1]]) s.seg.push_back(p);
  s.seg.push_back(n);  // no boxes: one empty group
  return s;
}

// As kernels/nms: run groups in parallel only when the pairwise work sum(n_group^2) pays for waking threads.
int64_t group_grain(const std::vector<int64_t>& seg) {
  const int64_t nseg = static_cast<int64_t>(seg.size()) - 1;
  double pairs = 0.0;
  for (int64_t g = 0; g < nseg; ++g) pairs += static_cast<double>(seg[g + 1] - seg[g]) * (seg[g + 1] - seg[g]);
  return pairs > 6.4e7 ? 1 : std::max<int64_t>(nseg, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// IoUs of box i with boxes [j0, j0 + len): the vectorized inner loop of every pairwise scan.
template <typename T>
IOUCTL_ALWAYS_INLINE void iou_row_body(const T* __restrict x1, const T* __restrict y1, const T* __restrict x2,
                                   const T* __restrict y2, const T* __restrict area, int64_t i, int64_t j0,
                                   int64_t len, T* __restrict out) {
  const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], ia = area[i];
  x1 += j0; y1 += j0; x2 += j0; y2 += j0; area += j0;
  for (int64_t t = 0; t < len; ++t)
    out[t] = iouctl::box_iou<T>(ix1, iy1, ix2, iy2, ia, x1[t], y1[t], x2[t], y2[t], area[t]);
}

template <typename T>
void iou_row_default(const Sorted<T>& s, int64_t i, int64_t j0, int64_t len, T* out) {
  iou_row_body<T>(s.x1.data(), s.y1.data(), s.x2.data(), s.y2.data(), s.area.data(), i, j0, len, out);
}

#if IOUCTL_AVX2
template <typename T>
__attribute__((target("avx2"))) void iou_row_avx2(const Sorted<T>& s, int64_t i, int64_t j0, int64_t len, T* out) {
  iou_row_body<T>(s.x1.data(), s.y1.data(), s.x2.data(), s.y2.data(), s.area.data(), i, j0, len, out);
}
#endif

template <typename T>
void iou_row(const Sorted<T>& s, int64_t i, int64_t j0, int64_t len, T* out) {
#if IOUCTL_AVX2
  if (cpu_has_avx2()) return iou_row_avx2<T>(s, i, j0, len, out);
#endif
  iou_row_default<T>(s, i, j0, len, out);
}

// Calls f(j, iou) for every j in [lo, hi) whose IoU with box i is > floor (in T): the pairs a rule can act on.
template <typename T, typename F>
void scan(const Sorted<T>& s, int64_t i, int64_t lo, int64_t hi, T floor, F&& f) {
  T ov[kChunk];
  for (int64_t j0 = lo; j0 < hi; j0 += kChunk) {
    const int64_t len = std::min(kChunk, hi - j0);
    iou_row<T>(s, i, j0, len, ov);
    for (int64_t t = 0; t < len; ++t)
      if (ov[t] > floor) f(j0 + t, ov[t]);
  }
}

template <typename T>
double penalty(const Sorted<T>& s, int64_t i, int64_t j, double beta) {
  return iouctl::diou_penalty<T>(s.x1[i], s.y1[i], s.x2[i], s.y2[i], s.x1[j], s.y1[j], s.x2[j], s.y2[j], beta);
}

// Greedy suppression over positions [a, b) in rank order: the kept box i removes every alive j > i with
// value(i, j, iou) > thr, where value <= iou (so only iou > thr is visited). Appends kept positions to `kept`.
template <typename T, typename V>
void greedy_segment(const Sorted<T>& s, int64_t a, int64_t b, double thr, V&& value, uint8_t* alive,
                    std::vector<int64_t>& kept) {
  const T floor = threshold_as<T>(thr);  // (double)iou > thr  <=>  iou > floor
  int64_t hi = b;  // every position at or above hi is suppressed: scans stop there
  for (int64_t i = a; i < b; ++i) {
    if (!alive[i]) continue;
    kept.push_back(i);
    while (hi > i + 1 && !alive[hi - 1]) --hi;
    scan<T>(s, i, i + 1, hi, floor, [&](int64_t j, T iou) {
      if (alive[j] && value(i, j, iou) > thr) alive[j] = 0;
    });
  }
}

std::vector<int64_t> merge_by_score(std::vector<int64_t> pos, const std::vector<double>& key,
                                    const std::vector<int64_t>& order, bool several_groups) {
  // within one group positions are already by decreasing score, ties by index
  if (several_groups) {
    std::sort(pos.begin(), pos.end(), [&](int64_t u, int64_t v) {
      if (key[u] != key[v]) return key[u] > key[v];
      return order[u] < order[v];
    });
  }
  return pos;
}

at::Tensor index_tensor(const std::vector<int64_t>& pos, const std::vector<int64_t>& order) {
  at::Tensor out = at::empty({static_cast<int64_t>(pos.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t q = 0; q < pos.size(); ++q) o[q] = order[pos[q]];
  return out;
}

// Values per kept position (float64) as a tensor of `dtype`.
at::Tensor value_tensor(const std::vector<int64_t>& pos, const std::vector<double>& v, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(pos.size())}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t q = 0; q < pos.size(); ++q) o[q] = v[pos[q]];
  return out.to(dtype);
}

at::Tensor box_tensor(const std::vector<int64_t>& pos, const std::vector<double>& xyxy, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(pos.size()), 4}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t q = 0; q < pos.size(); ++q)
    for (int c = 0; c < 4; ++c) o[4 * q + c] = xyxy[4 * pos[q] + c];
  return out.to(dtype);
}

template <typename T>
void own_box(const Sorted<T>& s, int64_t p, double* out) {
  out[0] = s.x1[p]; out[1] = s.y1[p]; out[2] = s.x2[p]; out[3] = s.y2[p];
}

template <typename T>
void accumulate(iouctl::WeightedBox& acc, double w, const Sorted<T>& s, int64_t p) {
  acc.add(w, s.x1[p], s.y1[p], s.x2[p], s.y2[p]);
}

// ---------------------------------------------------------------------------------------------------------------
// DIoU-NMS

template <typename T>
at::Tensor diou_impl(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                     double thr, double beta) {
  const Sorted<T> s = prepare<T>(boxes, scores, idxs);
  std::vector<uint8_t> alive(s.n, 1);
  const int64_t nseg = s.groups();
  std::vector<std::vector<int64_t>> kept(nseg);
  at::parallel_for(0, nseg, group_grain(s.seg), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      auto value = [&](int64_t i, int64_t j, T iou) {
        return iouctl::diou_value<T>(iou, penalty<T>(s, i, j, beta));
      };
      greedy_segment<T>(s, s.seg[g], s.seg[g + 1], thr, value, alive.data(), kept[g]);
    }
  });
  std::vector<int64_t> all;
  for (auto& k : kept) all.insert(all.end(), k.begin(), k.end());
  return index_tensor(merge_by_score(std::move(all), s.score, s.order, nseg > 1), s.order);
}

at::Tensor diou_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                        double iou_threshold, double beta) {
  check_inputs(boxes, scores, idxs);
  check_unit(iou_threshold, "iou_threshold");
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0.0, "beta must be a finite number > 0, got ", beta);
  if (compute_type(boxes) == at::kDouble) return diou_impl<double>(boxes, scores, idxs, iou_threshold, beta);
  return diou_impl<float>(boxes, scores, idxs, iou_threshold, beta);
}

// ---------------------------------------------------------------------------------------------------------------
// Matrix NMS: decay_j = min(1, min over i ranked above j of f(iou_ij) / f(comp_i)), comp_i = max IoU of i with the
// boxes ranked above it. Dense by design: every pair of a group, one pass in rank order (comp_i is final before any
// j > i reads it); the pair loop is branch-free and vectorizes. A NaN term (0/0: two empty boxes, or a linear
// duplicate) and a +inf term are ignored by the min_ below (std::min semantics keep the running value).

template <typename T>
IOUCTL_ALWAYS_INLINE void matrix_segment_body(const T* __restrict x1, const T* __restrict y1, const T* __restrict x2,
                                          const T* __restrict y2, const T* __restrict area, T* __restrict comp,
                                          double* __restrict decay, int64_t a, int64_t b, bool gaussian,
                                          double sigma) {
  constexpr int W = 8;  // independent running max/min lanes: the folds vectorize without reassociating NaN tests
  T ov[kChunk];
  double q[kChunk];
  for (int64_t j = a; j < b; ++j) {
    const T jx1 = x1[j], jy1 = y1[j], jx2 = x2[j], jy2 = y2[j], ja = area[j];
    T cl[W];
    double ml[W];
    for (int l = 0; l < W; ++l) {
      cl[l] = static_cast<T>(0);
      ml[l] = gaussian ? 0.0 : 1.0;  // the cap: decay <= 1 (gaussian: exponent <= 0)
    }
    for (int64_t i0 = a; i0 < j; i0 += kChunk) {
      const int64_t len = std::min(kChunk, j - i0);
      const T* bx1 = x1 + i0; const T* by1 = y1 + i0; const T* bx2 = x2 + i0; const T* by2 = y2 + i0;
      const T* bar = area + i0;
      const T* ci = comp + i0;
      for (int64_t t = 0; t < len; ++t)
        ov[t] = iouctl::box_iou<T>(bx1[t], by1[t], bx2[t], by2[t], bar[t], jx1, jy1, jx2, jy2, ja);
      if (gaussian) {
        for (int64_t t = 0; t < len; ++t) q[t] = iouctl::matrix_gaussian_exponent<T>(ov[t], ci[t]);
      } else {
        for (int64_t t = 0; t < len; ++t) q[t] = iouctl::matrix_linear_decay<T>(ov[t], ci[t]);
      }
      int64_t t = 0;
      for (; t + W <= len; t += W) {
        for (int l = 0; l < W; ++l) {
          cl[l] = max_(cl[l], ov[t + l]);
          ml[l] = min_(ml[l], q[t + l]);
        }
      }
      for (; t < len; ++t) {
        cl[0] = max_(cl[0], ov[t]);
        ml[0] = min_(ml[0], q[t]);
      }
    }
    T cj = cl[0];
    double m = ml[0];
    for (int l = 1; l < W; ++l) {
      cj = max_(cj, cl[l]);
      m = min_(m, ml[l]);
    }
    comp[j] = cj;
    decay[j] = gaussian ? iouctl::matrix_gaussian_decay(m, sigma) : m;
  }
}

template <typename T>
void matrix_segment_default(const Sorted<T>& s, T* comp, double* decay, int64_t a, int64_t b, bool gaussian,
                            double sigma) {
  matrix_segment_body<T>(s.x1.data(), s.y1.data(), s.x2.data(), s.y2.data(), s.area.data(), comp, decay, a, b,
                         gaussian, sigma);
}

#if IOUCTL_AVX2
template <typename T>
__attribute__((target("avx2"))) void matrix_segment_avx2(const Sorted<T>& s, T* comp, double* decay, int64_t a,
                                                         int64_t b, bool gaussian, double sigma) {
  matrix_segment_body<T>(s.x1.data(), s.y1.data(), s.x2.data(), s.y2.data(), s.area.data(), comp, decay, a, b,
                         gaussian, sigma);
}
#endif

template <typename T>
at::Tensor matrix_impl(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                       bool gaussian, double sigma) {
  const Sorted<T> s = prepare<T>(boxes, scores, idxs);
  std::vector<T> comp(s.n);
  std::vector<double> decay(s.n);
  const int64_t nseg = s.groups();
  at::parallel_for(0, nseg, group_grain(s.seg), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
#if IOUCTL_AVX2
      if (cpu_has_avx2()) {
        matrix_segment_avx2<T>(s, comp.data(), decay.data(), s.seg[g], s.seg[g + 1], gaussian, sigma);
        continue;
      }
#endif
      matrix_segment_default<T>(s, comp.data(), decay.data(), s.seg[g], s.seg[g + 1], gaussian, sigma);
    }
  });
  at::Tensor out = at::empty({s.n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t p = 0; p < s.n; ++p) o[s.order[p]] = s.score[p] * decay[p];
  return out.to(scores.scalar_type());
}

at::Tensor matrix_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                          c10::string_view kernel, double sigma) {
  check_inputs(boxes, scores, idxs);
  TORCH_CHECK_VALUE(kernel == "gaussian" || kernel == "linear", "kernel must be 'gaussian' or 'linear', got '",
                    std::string(kernel), "'");
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0.0, "sigma must be a finite number > 0, got ", sigma);
  const bool gaussian = kernel == "gaussian";
  if (compute_type(boxes) == at::kDouble) return matrix_impl<double>(boxes, scores, idxs, gaussian, sigma);
  return matrix_impl<float>(boxes, scores, idxs, gaussian, sigma);
}

// ---------------------------------------------------------------------------------------------------------------
// Cluster-NMS. The paper's iteration: k_0 = all boxes; k_t = the boxes no member of k_(t-1) ranked above suppresses
// (value > thr); stop at a fixed point or after max_iterations. Its fixed point is greedy NMS. Rather than iterate the
// dense matrix, compute greedy NMS and, per box, the iteration from which k_t agrees with greedy NMS for good:
// L(kept j) = 1 + max L over the (suppressed) boxes above j that overlap it (0 if none), L(suppressed j) = 1 + min L
// over the kept boxes above j that suppress it. If max L <= max_iterations the iteration's result is greedy NMS;
// otherwise (long suppression chains) the iteration is run literally over the suppression graph.

struct ClusterArgs {
  double thr;
  bool spm, distance, weighted;
  double sigma, beta, weight_threshold, score_threshold;
  int64_t max_iterations;
};

template <typename T>
void cluster_segment(const Sorted<T>& s, int64_t a, int64_t b, const ClusterArgs& p, uint8_t* keep, double* reported,
                     double* fused, uint8_t* out) {
  const bool diou_matrix = p.distance && !p.spm;  // Cluster-DIoU-NMS; with spm, distance enters the penalty instead
  auto value = [&](int64_t i, int64_t j, T iou) {
    return diou_matrix ? iouctl::diou_value<T>(iou, penalty<T>(s, i, j, p.beta)) : static_cast<double>(iou);
  };
  const T floor = threshold_as<T>(p.thr);
  std::vector<int64_t> level(b - a, std::numeric_limits<int64_t>::max());
  int64_t max_level = 0;
  for (int64_t i = a; i < b; ++i) {
    if (!keep[i]) continue;  // suppressed: its level was set by the kept boxes above it
    int64_t lv = 0;
    scan<T>(s, i, a, i, floor, [&](int64_t k, T iou) {
      if (value(k, i, iou) > p.thr) lv = std::max(lv, level[k - a] + 1);
    });
    level[i - a] = lv;
    scan<T>(s, i, i + 1, b, floor, [&](int64_t j, T iou) {
      if (value(i, j, iou) > p.thr) {
        keep[j] = 0;
        level[j - a] = std::min(level[j - a], lv + 1);
      }
    });
  }
  for (int64_t q = 0; q < b - a; ++q) max_level = std::max(max_level, level[q]);

  if (max_level > p.max_iterations) {
    // The literal iteration: preds[j] = boxes above j whose value with j exceeds thr.
    std::vector<std::vector<int64_t>> preds(b - a);
    for (int64_t i = a; i < b; ++i) {
      scan<T>(s, i, i + 1, b, floor, [&](int64_t j, T iou) {
        if (value(i, j, iou) > p.thr) preds[j - a].push_back(i - a);
      });
    }
    std::vector<uint8_t> prev(b - a, 1), cur(b - a);
    for (int64_t t = 0; t < p.max_iterations; ++t) {
      for (int64_t j = 0; j < b - a; ++j) {
        uint8_t k = 1;
        for (int64_t i : preds[j]) k &= static_cast<uint8_t>(!prev[i]);
        cur[j] = k;
      }
      const bool same = cur == prev;
      prev.swap(cur);
      if (same) break;
    }
    for (int64_t j = 0; j < b - a; ++j) keep[a + j] = prev[j];
  }

  // Score penalty: every kept box i decays the boxes below it that it overlaps (the reference's prod over rows of B).
  for (int64_t j = a; j < b; ++j) reported[j] = 1.0;
  if (p.spm) {
    for (int64_t i = a; i < b; ++i) {
      if (!keep[i]) continue;
      scan<T>(s, i, i + 1, b, static_cast<T>(0), [&](int64_t j, T iou) {
        const double d = p.distance ? penalty<T>(s, i, j, p.beta) : 0.0;
        reported[j] *= iouctl::spm_factor<T>(iou, p.sigma, p.distance, d);
      });
    }
  }
  for (int64_t j = a; j < b; ++j) {
    reported[j] *= s.score[j];
    out[j] = p.spm ? static_cast<uint8_t>(reported[j] > p.score_threshold) : keep[j];
  }

  // Weighted coordinates: an output box that survived the suppression = mean of itself and the boxes below it whose
  // value exceeds weight_threshold, weighted by score * value (itself: its score).
  const T wfloor = threshold_as<T>(p.weight_threshold);
  for (int64_t r = a; r < b; ++r) {
    if (!out[r]) continue;
    if (!p.weighted || !keep[r]) {
      own_box<T>(s, r, fused + 4 * r);
      continue;
    }
    iouctl::WeightedBox acc;
    accumulate<T>(acc, s.score[r], s, r);
    scan<T>(s, r, r + 1, b, wfloor, [&](int64_t c, T iou) {
      const double v = value(r, c, iou);
      if (v > p.weight_threshold) accumulate<T>(acc, v * s.score[c], s, c);
    });
    if (!acc.mean(fused + 4 * r)) own_box<T>(s, r, fused + 4 * r);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                                            const std::optional<at::Tensor>& idxs,
                                                            const ClusterArgs& p) {
  const Sorted<T> s = prepare<T>(boxes, scores, idxs);
  if (p.weighted) {
    for (int64_t q = 0; q < s.n; ++q) {
      TORCH_CHECK_VALUE(std::isfinite(s.score[q]) && s.score[q] >= 0.0,
                        "scores are the weights of the weighted coordinates: they must be finite and >= 0, got ",
                        s.score[q], " at index ", s.order[q]);
    }
  }
  std::vector<uint8_t> keep(s.n, 1), out(s.n, 0);
  std::vector<double> reported(s.n), fused(4 * s.n);
  const int64_t nseg = s.groups();
  at::parallel_for(0, nseg, group_grain(s.seg), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      cluster_segment<T>(s, s.seg[g], s.seg[g + 1], p, keep.data(), reported.data(), fused.data(), out.data());
  });
  std::vector<int64_t> pos;
  for (int64_t q = 0; q < s.n; ++q)
    if (out[q]) pos.push_back(q);
  pos = merge_by_score(std::move(pos), s.score, s.order, nseg > 1);
  return {index_tensor(pos, s.order), value_tensor(pos, reported, scores.scalar_type()),
          box_tensor(pos, fused, boxes.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_nms_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs, double iou_threshold,
    bool spm, bool distance, bool weighted, double sigma, double beta, double weight_threshold,
    double score_threshold, int64_t max_iterations) {
  check_inputs(boxes, scores, idxs);
  check_unit(iou_threshold, "iou_threshold");
  check_unit(weight_threshold, "weight_threshold");
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0.0, "sigma must be a finite number > 0, got ", sigma);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0.0, "beta must be a finite number > 0, got ", beta);
  TORCH_CHECK_VALUE(!std::isnan(score_threshold), "score_threshold must be a number, got nan");
  TORCH_CHECK_VALUE(max_iterations >= 1, "max_iterations must be >= 1, got ", max_iterations);
  const ClusterArgs p{iou_threshold, spm,  distance,         weighted,       sigma,
                      beta,          weight_threshold, score_threshold, max_iterations};
  if (compute_type(boxes) == at::kDouble) return cluster_impl<double>(boxes, scores, idxs, p);
  return cluster_impl<float>(boxes, scores, idxs, p);
}

// ---------------------------------------------------------------------------------------------------------------
// Box voting: greedy NMS, then each kept box m = sum_j s_j b_j / sum_j s_j over the boxes j of its group with
// IoU(m, j) >= vote_threshold, m itself included (Detectron's box_voting with scoring 'ID': all of the class's
// detections vote, not only those m suppressed).

template <typename T>
std::tuple<at::Tensor, at::Tensor> voting_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                               const std::optional<at::Tensor>& idxs, double thr, double vote) {
  const Sorted<T> s = prepare<T>(boxes, scores, idxs);
  for (int64_t q = 0; q < s.n; ++q) {
    TORCH_CHECK_VALUE(std::isfinite(s.score[q]) && s.score[q] >= 0.0,
                      "scores are the voting weights: they must be finite and >= 0, got ", s.score[q], " at index ",
                      s.order[q]);
  }
  std::vector<uint8_t> alive(s.n, 1);
  std::vector<double> fused(4 * s.n);
  const int64_t nseg = s.groups();
  std::vector<std::vector<int64_t>> kept(nseg);
  // (double)iou >= vote  <=>  iou > the largest T below vote
  const T vfloor = std::nextafter(threshold_as<T>(vote), -std::numeric_limits<T>::infinity());
  at::parallel_for(0, nseg, group_grain(s.seg), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t a = s.seg[g], b = s.seg[g + 1];
      auto value = [](int64_t, int64_t, T iou) { return static_cast<double>(iou); };
      greedy_segment<T>(s, a, b, thr, value, alive.data(), kept[g]);
      for (int64_t m : kept[g]) {
        // voters in rank order, m itself at its own position (also when empty: its IoU with itself is NaN)
        iouctl::WeightedBox acc;
        bool self = false;
        scan<T>(s, m, a, b, vfloor, [&](int64_t j, T iou) {
          if (j == m || !iouctl::votes<T>(iou, vote)) return;
          if (!self && m < j) {
            accumulate<T>(acc, s.score[m], s, m);
            self = true;
          }
          accumulate<T>(acc, s.score[j], s, j);
        });
        if (!self) accumulate<T>(acc, s.score[m], s, m);
        if (!acc.mean(fused.data() + 4 * m)) own_box<T>(s, m, fused.data() + 4 * m);
      }
    }
  });
  std::vector<int64_t> all;
  for (auto& k : kept) all.insert(all.end(), k.begin(), k.end());
  all = merge_by_score(std::move(all), s.score, s.order, nseg > 1);
  return {index_tensor(all, s.order), box_tensor(all, fused, boxes.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> box_voting_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                                                  const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                  double vote_threshold) {
  check_inputs(boxes, scores, idxs);
  check_unit(iou_threshold, "iou_threshold");
  TORCH_CHECK_VALUE(vote_threshold > 0.0 && vote_threshold <= 1.0, "vote_threshold must be in (0, 1], got ",
                    vote_threshold);
  if (compute_type(boxes) == at::kDouble)
    return voting_impl<double>(boxes, scores, idxs, iou_threshold, vote_threshold);
  return voting_impl<float>(boxes, scores, idxs, iou_threshold, vote_threshold);
}

// ---------------------------------------------------------------------------------------------------------------
// Weighted Boxes Fusion of one model (ensemble_boxes.weighted_boxes_fusion with one weight of 1): boxes in rank order
// either join the cluster whose fused box they overlap most (IoU > iou_threshold; the first such cluster on ties) or
// found a new one; a cluster's fused box is the score-weighted mean of its members, its score their mean ("avg") or
// maximum ("max"). Boxes with score < skip_box_threshold or zero area are left out, as ensemble_boxes does.

struct Cluster {
  int64_t founder;
  int64_t count;
  double max_score;
  iouctl::WeightedBox weighted, plain;
};

template <typename T>
void wbf_segment(const Sorted<T>& s, int64_t a, int64_t b, double thr, double skip, bool avg,
                 std::vector<Cluster>& clusters, std::vector<double>& fx) {
  std::vector<double> fx1, fy1, fx2, fy2, farea;  // fused boxes, structure of arrays
  std::vector<double> ov;
  for (int64_t j = a; j < b; ++j) {
    const double sc = s.score[j];
    if (sc < skip) continue;
    const double bx[4] = {static_cast<double>(s.x1[j]), static_cast<double>(s.y1[j]), static_cast<double>(s.x2[j]),
                          static_cast<double>(s.y2[j])};
    if (iouctl::box_area<double>(bx[0], bx[1], bx[2], bx[3]) == 0.0) continue;
    const int64_t nc = static_cast<int64_t>(fx1.size());
    ov.resize(nc);
    const double ba = iouctl::box_area<double>(bx[0], bx[1], bx[2], bx[3]);
    for (int64_t c = 0; c < nc; ++c)
      ov[c] = iouctl::box_iou<double>(fx1[c], fy1[c], fx2[c], fy2[c], farea[c], bx[0], bx[1], bx[2], bx[3], ba);
    int64_t best = -1;
    double best_iou = thr;  // a match needs IoU > thr; the first maximum wins
    for (int64_t c = 0; c < nc; ++c) {
      if (ov[c] > best_iou) { best_iou = ov[c]; best = c; }
    }
    double f[4];
    if (best < 0) {
      Cluster cl{j, 1, sc, {}, {}};
      cl.weighted.add(sc, bx[0], bx[1], bx[2], bx[3]);
      cl.plain.add(1.0, bx[0], bx[1], bx[2], bx[3]);
      clusters.push_back(cl);
      for (int c = 0; c < 4; ++c) f[c] = bx[c];  // a new cluster's fused box is its box, as in ensemble_boxes
      fx1.push_back(f[0]); fy1.push_back(f[1]); fx2.push_back(f[2]); fy2.push_back(f[3]);
      farea.push_back(ba);
      continue;
    }
    Cluster& cl = clusters[best];
    cl.count += 1;
    cl.max_score = std::max(cl.max_score, sc);
    cl.weighted.add(sc, bx[0], bx[1], bx[2], bx[3]);
    cl.plain.add(1.0, bx[0], bx[1], bx[2], bx[3]);
    if (!cl.weighted.mean(f)) cl.plain.mean(f);  // all scores 0: the plain mean
    fx1[best] = f[0]; fy1[best] = f[1]; fx2[best] = f[2]; fy2[best] = f[3];
    farea[best] = iouctl::box_area<double>(f[0], f[1], f[2], f[3]);
  }
  for (size_t c = 0; c < clusters.size(); ++c) {
    fx.push_back(fx1[c]); fx.push_back(fy1[c]); fx.push_back(fx2[c]); fx.push_back(fy2[c]);
    fx.push_back(avg ? clusters[c].weighted.w / static_cast<double>(clusters[c].count) : clusters[c].max_score);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> wbf_impl(const at::Tensor& boxes, const at::Tensor& scores,
                                                        const std::optional<at::Tensor>& idxs, double thr,
                                                        double skip, bool avg) {
  const Sorted<T> s = prepare<T>(boxes, scores, idxs);
  const int64_t nseg = s.groups();
  std::vector<std::vector<Cluster>> clusters(nseg);
  std::vector<std::vector<double>> fused(nseg);  // per cluster: x1, y1, x2, y2, score
  at::parallel_for(0, nseg, group_grain(s.seg), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) wbf_segment<T>(s, s.seg[g], s.seg[g + 1], thr, skip, avg, clusters[g], fused[g]);
  });
  struct Out {
    double score;
    int64_t index;
    const double* xyxy;
  };
  std::vector<Out> all;
  for (int64_t g = 0; g < nseg; ++g)
    for (size_t c = 0; c < clusters[g].size(); ++c)
      all.push_back(Out{fused[g][5 * c + 4], s.order[clusters[g][c].founder], &fused[g][5 * c]});
  std::sort(all.begin(), all.end(), [](const Out& u, const Out& v) {
    if (u.score != v.score) return u.score > v.score;
    return u.index < v.index;
  });
  const int64_t k = static_cast<int64_t>(all.size());
  at::Tensor index = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor box = at::empty({k, 4}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor score = at::empty({k}, at::TensorOptions().dtype(at::kDouble));
  int64_t* ip = index.data_ptr<int64_t>();
  double* bp = box.data_ptr<double>();
  double* sp = score.data_ptr<double>();
  for (int64_t q = 0; q < k; ++q) {
    ip[q] = all[q].index;
    sp[q] = all[q].score;
    for (int c = 0; c < 4; ++c) bp[4 * q + c] = all[q].xyxy[c];
  }
  return {index, box.to(boxes.scalar_type()), score.to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_boxes_fusion_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs, double iou_threshold,
    double skip_box_threshold, c10::string_view conf_type) {
  check_inputs(boxes, scores, idxs);
  check_unit(iou_threshold, "iou_threshold");
  TORCH_CHECK_VALUE(skip_box_threshold >= 0.0, "skip_box_threshold must be >= 0, got ", skip_box_threshold);
  TORCH_CHECK_VALUE(conf_type == "avg" || conf_type == "max", "conf_type must be 'avg' or 'max', got '",
                    std::string(conf_type), "'");
  const bool avg = conf_type == "avg";
  {  // scores are weights; negative ones are skipped (skip_box_threshold >= 0), +inf would make NaN boxes
    const at::Tensor sc = scores.to(at::kCPU, at::kDouble).contiguous();
    const double* v = sc.data_ptr<double>();
    for (int64_t i = 0; i < sc.size(0); ++i) {
      TORCH_CHECK_VALUE(!std::isinf(v[i]) || v[i] < 0.0,
                        "scores are the fusion weights: they must be finite, got inf at index ", i);
    }
  }
  if (compute_type(boxes) == at::kDouble)
    return wbf_impl<double>(boxes, scores, idxs, iou_threshold, skip_box_threshold, avg);
  return wbf_impl<float>(boxes, scores, idxs, iou_threshold, skip_box_threshold, avg);
}

}  // namespace

IOUCTL_VECTORIZE_END

TORCH_LIBRARY_IMPL(iouctl, CPU, m) {
  m.impl("diou_nms", TORCH_FN(diou_nms_cpu));
  m.impl("matrix_nms", TORCH_FN(matrix_nms_cpu));
  m.impl("cluster_nms", TORCH_FN(cluster_nms_cpu));
  m.impl("box_voting", TORCH_FN(box_voting_cpu));
  m.impl("weighted_boxes_fusion", TORCH_FN(weighted_boxes_fusion_cpu));
}
