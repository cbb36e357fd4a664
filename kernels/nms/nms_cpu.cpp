// CPU kernels of the NMS family: greedy / IoU-guided NMS (IoU-Net Alg. 1) and Soft-NMS, single and per class.
//
// Layout: boxes are sorted once (per class, then by rank, ties by index) and gathered into contiguous
// structure-of-arrays coordinates, so the O(K*N) inner loops read memory linearly and vectorize (an AVX2 clone is
// chosen at run time). The per-element math (IoU, suppression rule, Soft-NMS factor) is nms_math.h, shared with the
// CUDA kernels: torchvision's CPU nms expression in the boxes' dtype, so keep sets agree bit for bit.
// Determinism: every order is a total order (ties broken by index) and per-class work writes disjoint slices,
// so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_vectorize.h"
#include "common/group_order.h"
#include "nms/nms_checks.h"

IOUCTL_VECTORIZE_BEGIN
#include "nms/nms_math.h"

namespace {

using iouctl::cpu_has_avx2;
using iouctl::max_;
using iouctl::min_;
using iouctl::threshold_as;

// Owner ids share the lane width of T so the compare-and-select vectorizes (int32 with float, int64 with double).
template <typename T>
using owner_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
struct Boxes {  // sorted structure-of-arrays copy of the boxes
  std::vector<T> x1, y1, x2, y2, area;
  explicit Boxes(int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n) {}
};

// ---------------------------------------------------------------------------------------------------------------
// Greedy NMS over positions [a, b) already in rank order. owner[j] = -1 (alive) on entry; on exit owner[j] is the
// position of the kept box that suppressed j (a kept box owns itself).
template <typename T>
IOUCTL_ALWAYS_INLINE void greedy_segment_body(
    const T* __restrict x1, const T* __restrict y1, const T* __restrict x2, const T* __restrict y2,
    const T* __restrict area, owner_t<T>* __restrict owner, int64_t a, int64_t b, T thr) {
  using O = owner_t<T>;
  int64_t hi = b - 1;  // every position above hi is suppressed: the scan stops there
  for (int64_t i = a; i < b; ++i) {
    if (owner[i] >= 0) continue;
    const O oi = static_cast<O>(i);
    owner[i] = oi;
    while (hi > i && owner[hi] >= 0) --hi;
    const T ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], ia = area[i];
    for (int64_t j = i + 1; j <= hi; ++j) {
      const T ovr = iouctl::box_iou<T>(ix1, iy1, ix2, iy2, ia, x1[j], y1[j], x2[j], y2[j], area[j]);
      const O o = owner[j];
      owner[j] = ((o < 0) & iouctl::suppresses<T>(ovr, thr)) ? oi : o;
    }
  }
}

template <typename T>
void greedy_segment_default(const Boxes<T>& bx, owner_t<T>* owner, int64_t a, int64_t b, T thr) {
  greedy_segment_body<T>(bx.x1.data(), bx.y1.data(), bx.x2.data(), bx.y2.data(), bx.area.data(), owner, a, b, thr);
}

#if IOUCTL_AVX2
template <typename T>
__attribute__((target("avx2"))) void greedy_segment_avx2(
    const Boxes<T>& bx, owner_t<T>* owner, int64_t a, int64_t b, T thr) {
  greedy_segment_body<T>(bx.x1.data(), bx.y1.data(), bx.x2.data(), bx.y2.data(), bx.area.data(), owner, a, b, thr);
}
#endif

template <typename T>
void greedy_segment(const Boxes<T>& bx, owner_t<T>* owner, int64_t a, int64_t b, T thr) {
#if IOUCTL_AVX2
  if (cpu_has_avx2()) return greedy_segment_avx2<T>(bx, owner, a, b, thr);
#endif
  greedy_segment_default<T>(bx, owner, a, b, thr);
}

// ---------------------------------------------------------------------------------------------------------------
constexpr double kDead = -std::numeric_limits<double>::infinity();
constexpr int64_t kBlock = 64;

// Soft-NMS over one segment (one class) of n entries in spatial (Morton) order. Entries are grouped in blocks of
// kBlock, each with a bounding rectangle and its best live (score, index). A selection scans the block maxima; the
// decay visits only blocks whose rectangle overlaps the selected box m. Skipping is exact: for every entry j of a
// skipped block x2_j <= x1_m (or x1_j >= x2_m, or the same in y), so the intersection width (or height) is
// max(0, <= 0) = 0, the IoU is 0, -0 or NaN, and neither Soft-NMS rule changes a score. A block holding a non-finite
// coordinate gets an infinite rectangle (never skipped); a selected box with one visits every block.
// s: float64 scores, dead entries hold -inf (live ones are finite and >= score_threshold).
// Selection: highest score, ties by lowest original index. Appends (original index, score) in selection order.
template <typename T>
IOUCTL_ALWAYS_INLINE void soft_segment_body(
    const T* __restrict x1, const T* __restrict y1, const T* __restrict x2, const T* __restrict y2,
    const T* __restrict area, double* __restrict s, const int64_t* __restrict idx, int64_t n, bool gaussian,
    double sigma, T thr, double score_threshold, std::vector<int64_t>& keep, std::vector<double>& kept_scores) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<T> rx1(nb), ry1(nb), rx2(nb), ry2(nb);
  std::vector<double> bmax(nb);
  std::vector<int64_t> bidx(nb), bpos(nb);
  T ov[kBlock];

  auto refresh = [&](int64_t b) {  // the block's best live entry: highest score, then lowest index
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    double mx = kDead;
    int64_t mi = std::numeric_limits<int64_t>::max(), mp = lo;
    for (int64_t j = lo; j < hi; ++j) {
      if (s[j] > mx || (s[j] == mx && idx[j] < mi)) { mx = s[j]; mi = idx[j]; mp = j; }
    }
    bmax[b] = mx; bidx[b] = mi; bpos[b] = mp;
  };
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    T a1 = kInf, b1 = kInf, a2 = -kInf, b2 = -kInf;
    bool finite = true;
    for (int64_t j = lo; j < hi; ++j) {
      finite = finite && std::isfinite(x1[j]) && std::isfinite(y1[j]) && std::isfinite(x2[j]) && std::isfinite(y2[j]);
      a1 = min_(a1, x1[j]); b1 = min_(b1, y1[j]); a2 = max_(a2, x2[j]); b2 = max_(b2, y2[j]);
    }
    if (!finite) { a1 = -kInf; b1 = -kInf; a2 = kInf; b2 = kInf; }
    rx1[b] = a1; ry1[b] = b1; rx2[b] = a2; ry2[b] = b2;
    refresh(b);
  }

  while (true) {
    int64_t bb = -1, bi = std::numeric_limits<int64_t>::max();
    double best = kDead;
    for (int64_t b = 0; b < nb; ++b) {
      if (bmax[b] > best || (bmax[b] == best && bidx[b] < bi)) { best = bmax[b]; bi = bidx[b]; bb = b; }
    }
    if (best == kDead) break;
    const int64_t m = bpos[bb];
    keep.push_back(idx[m]);
    kept_scores.push_back(best);
    s[m] = kDead;

    const T ix1 = x1[m], iy1 = y1[m], ix2 = x2[m], iy2 = y2[m], ia = area[m];
    const bool cull = std::isfinite(ix1) && std::isfinite(iy1) && std::isfinite(ix2) && std::isfinite(iy2);
    for (int64_t b = 0; b < nb; ++b) {
      if (cull && (rx2[b] <= ix1 || rx1[b] >= ix2 || ry2[b] <= iy1 || ry1[b] >= iy2)) continue;
      const int64_t lo = b * kBlock, len = std::min(n, lo + kBlock) - lo;
      const T* bx1 = x1 + lo; const T* by1 = y1 + lo; const T* bx2 = x2 + lo; const T* by2 = y2 + lo;
      const T* bar = area + lo;
      double* bs = s + lo;
      for (int64_t j = 0; j < len; ++j) {
        ov[j] = iouctl::box_iou<T>(ix1, iy1, ix2, iy2, ia, bx1[j], by1[j], bx2[j], by2[j], bar[j]);
      }
      // A NaN overlap (NaN coordinates) counts as no overlap: the factor is 1. One loop per method.
      if (gaussian) {
        for (int64_t j = 0; j < len; ++j) {
          if (ov[j] > static_cast<T>(0)) {  // the factor is 1 elsewhere: only overlapping boxes change (no exp)
            const double ns = bs[j] * iouctl::soft_nms_weight<T>(ov[j], true, sigma, thr);
            bs[j] = ns >= score_threshold ? ns : kDead;
          }
        }
      } else {  // a dead entry (-inf) stays -inf, or becomes -inf * 0 = NaN, which the test turns back into dead
        for (int64_t j = 0; j < len; ++j) {
          const double ns = bs[j] * iouctl::soft_nms_weight<T>(ov[j], false, sigma, thr);
          bs[j] = ns >= score_threshold ? ns : kDead;
        }
      }
      // Scores only decrease: a block's best entry stays best unless its own score changed.
      if (s[bpos[b]] != bmax[b]) refresh(b);
    }
    if (s[bpos[bb]] != bmax[bb]) refresh(bb);  // m's block, when an inverted or zero-size m skipped it
  }
}

struct SoftArgs {
  bool gaussian;
  double sigma;
  double iou_threshold;
  double score_threshold;
};

template <typename T>
void soft_segment_default(
    const Boxes<T>& bx, double* s, const int64_t* idx, int64_t a, int64_t n, const SoftArgs& p,
    std::vector<int64_t>& keep, std::vector<double>& kept_scores) {
  soft_segment_body<T>(bx.x1.data() + a, bx.y1.data() + a, bx.x2.data() + a, bx.y2.data() + a, bx.area.data() + a,
                       s + a, idx + a, n, p.gaussian, p.sigma, threshold_as<T>(p.iou_threshold), p.score_threshold,
                       keep, kept_scores);
}

#if IOUCTL_AVX2
template <typename T>
__attribute__((target("avx2"))) void soft_segment_avx2(
    const Boxes<T>& bx, double* s, const int64_t* idx, int64_t a, int64_t n, const SoftArgs& p,
    std::vector<int64_t>& keep, std::vector<double>& kept_scores) {
  soft_segment_body<T>(bx.x1.data() + a, bx.y1.data() + a, bx.x2.data() + a, bx.y2.data() + a, bx.area.data() + a,
                       s + a, idx + a, n, p.gaussian, p.sigma, threshold_as<T>(p.iou_threshold), p.score_threshold,
                       keep, kept_scores);
}
#endif

template <typename T>
void soft_segment(
    const Boxes<T>& bx, double* s, const int64_t* idx, int64_t a, int64_t n, const SoftArgs& p,
    std::vector<int64_t>& keep, std::vector<double>& kept_scores) {
#if IOUCTL_AVX2
  if (cpu_has_avx2()) return soft_segment_avx2<T>(bx, s, idx, a, n, p, keep, kept_scores);
#endif
  soft_segment_default<T>(bx, s, idx, a, n, p, keep, kept_scores);
}

// Interleaves the low 16 bits of x and y: nearby centres get nearby codes (a Z-order curve).
uint32_t morton16(uint32_t x, uint32_t y) {
  auto spread = [](uint32_t v) {
    v &= 0xFFFF;
    v = (v | (v << 8)) & 0x00FF00FF;
    v = (v | (v << 4)) & 0x0F0F0F0F;
    v = (v | (v << 2)) & 0x33333333;
    v = (v | (v << 1)) & 0x55555555;
    return v;
  };
  return spread(x) | (spread(y) << 1);
}

// Classes are independent, so they may run in parallel; but waking threads costs more than a typical detector's
// per-class NMS (80 classes x ~250 boxes took 2.4 ms on one thread and longer on two, on a loaded 2-core machine).
// Parallel only when the pairwise work sum(n_class^2) is large. Returns the grain for at::parallel_for.
int64_t class_grain(const std::vector<int64_t>& seg) {
  const int64_t nseg = static_cast<int64_t>(seg.size()) - 1;
  double pairs = 0.0;
  for (int64_t g = 0; g < nseg; ++g) pairs += static_cast<double>(seg[g + 1] - seg[g]) * (seg[g + 1] - seg[g]);
  return pairs > 6.4e7 ? 1 : std::max<int64_t>(nseg, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Input checks: nms_checks.h (shared with the CUDA kernels), plus the value checks only the CPU makes for free.
using iouctl::nms_checks::check_boxes;
using iouctl::nms_checks::check_iou_guided;
using iouctl::nms_checks::check_iou_threshold;
using iouctl::nms_checks::check_vector;
using iouctl::nms_checks::compute_type;

// NaN ranks would hand std::sort a non-strict ordering (undefined behaviour).
void check_no_nan(const double* v, int64_t n, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(!std::isnan(v[i]), name, " contains NaN (first at index ", i,
                      "); NMS needs an ordering: replace or drop NaN scores first");
  }
}

at::Tensor to_cpu_double(const at::Tensor& t) {
  return t.to(at::kCPU, at::kDouble).contiguous();
}

// Fill the structure-of-arrays copy of boxes in the order given by `order` (positions -> original index).
template <typename T>
void gather_boxes(const at::Tensor& boxes_c, const std::vector<int64_t>& order, Boxes<T>& bx) {
  const T* b = boxes_c.data_ptr<T>();
  const int64_t n = static_cast<int64_t>(order.size());
  for (int64_t p = 0; p < n; ++p) {
    const int64_t i = order[p];
    const T x1 = b[4 * i], y1 = b[4 * i + 1], x2 = b[4 * i + 2], y2 = b[4 * i + 3];
    bx.x1[p] = x1; bx.y1[p] = y1; bx.x2[p] = x2; bx.y2[p] = y2;
    bx.area[p] = iouctl::box_area<T>(x1, y1, x2, y2);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// IoU-guided (and greedy) NMS, optionally per class.

template <typename T>
std::tuple<at::Tensor, at::Tensor> iou_guided_impl(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor* idxs,
    double iou_threshold) {
  const int64_t n = boxes.size(0);
  const at::Tensor boxes_c = boxes.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
  const at::Tensor rank_t = to_cpu_double(ious);
  const at::Tensor cls_t = to_cpu_double(scores);
  const double* rank = rank_t.data_ptr<double>();
  const double* cls = cls_t.data_ptr<double>();
  check_no_nan(rank, n, "ious");
  check_no_nan(cls, n, "scores");
  at::Tensor cat_t;
  const int64_t* cat = nullptr;
  if (idxs != nullptr) {
    cat_t = idxs->to(at::kCPU, at::kLong).contiguous();
    cat = cat_t.data_ptr<int64_t>();
  }

  // Positions: by class, then decreasing rank, then increasing index.
  const std::vector<int64_t> order = iouctl::group_order(cat, rank, n);
  Boxes<T> bx(n);
  gather_boxes<T>(boxes_c, order, bx);

  std::vector<int64_t> seg{0};  // segment starts (one per class present), then n
  if (cat != nullptr) {
    for (int64_t p = 1; p < n; ++p)
      if (cat[order[p]] != cat[order[p - 1]]) seg.push_back(p);
  }
  seg.push_back(n);
  const int64_t nseg = static_cast<int64_t>(seg.size()) - 1;

  std::vector<owner_t<T>> owner(n, -1);
  const T thr = threshold_as<T>(iou_threshold);
  at::parallel_for(0, nseg, class_grain(seg), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) greedy_segment<T>(bx, owner.data(), seg[s], seg[s + 1], thr);
  });

  // Cluster score of each kept box: max of `scores` over the boxes it suppressed, itself included (Alg. 1).
  std::vector<double> best(n);
  std::vector<int64_t> kept;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t o = static_cast<int64_t>(owner[p]);
    if (o == p) {
      kept.push_back(p);
      best[p] = cls[order[p]];
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    const int64_t o = static_cast<int64_t>(owner[p]);
    if (o != p) best[o] = std::max(best[o], cls[order[p]]);
  }
  if (nseg > 1) {
    // Merge the classes as torchvision's batched_nms returns them: decreasing rank (ties: increasing index).
    std::sort(kept.begin(), kept.end(), [&](int64_t a, int64_t b) {
      const double ra = rank[order[a]], rb = rank[order[b]];
      if (ra != rb) return ra > rb;
      return order[a] < order[b];
    });
  }
  const int64_t k = static_cast<int64_t>(kept.size());
  at::Tensor keep_t = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor cs_t = at::empty({k}, at::TensorOptions().dtype(at::kDouble));
  int64_t* keep = keep_t.data_ptr<int64_t>();
  double* cs = cs_t.data_ptr<double>();
  for (int64_t q = 0; q < k; ++q) {
    keep[q] = order[kept[q]];
    cs[q] = best[kept[q]];
  }
  return {keep_t, cs_t.to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> iou_guided_dispatch(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor* idxs,
    double iou_threshold) {
  check_iou_guided(boxes, scores, ious, idxs, iou_threshold);
  if (compute_type(boxes) == at::kDouble) return iou_guided_impl<double>(boxes, scores, ious, idxs, iou_threshold);
  return iou_guided_impl<float>(boxes, scores, ious, idxs, iou_threshold);
}

using IoUGuidedCpu = iouctl::nms_checks::IoUGuidedOps<iou_guided_dispatch>;

// ---------------------------------------------------------------------------------------------------------------
// Soft-NMS, optionally per class.

SoftArgs soft_args(const std::string& method, double sigma, double iou_threshold, double score_threshold) {
  TORCH_CHECK_VALUE(method == "linear" || method == "gaussian", "method must be 'linear' or 'gaussian', got '",
                    method, "'");
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma > 0.0, "sigma must be a finite number > 0, got ", sigma);
  check_iou_threshold(iou_threshold);
  TORCH_CHECK_VALUE(!std::isnan(score_threshold), "score_threshold must be a number, got nan");
  return SoftArgs{method == "gaussian", sigma, iou_threshold, score_threshold};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> soft_impl(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs, const SoftArgs& p) {
  const int64_t n = boxes.size(0);
  const at::Tensor boxes_c = boxes.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
  const at::Tensor score_t = to_cpu_double(scores);
  const double* score = score_t.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(score[i]), "scores must be finite for Soft-NMS (it multiplies them), got ",
                      score[i], " at index ", i);
  }
  at::Tensor cat_t;
  const int64_t* cat = nullptr;
  if (idxs != nullptr) {
    cat_t = idxs->to(at::kCPU, at::kLong).contiguous();
    cat = cat_t.data_ptr<int64_t>();
  }
  // Boxes already under the threshold can never be kept nor decay others: drop them up front.
  std::vector<int64_t> order;
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (score[i] >= p.score_threshold) order.push_back(i);

  // Spatial order inside each class (Morton code of the box centre, boxes with a non-finite coordinate last) so that
  // the blocks of soft_segment_body are compact rectangles. Only speed depends on it: ties are broken by index.
  const T* b = boxes_c.data_ptr<T>();
  auto finite_box = [&](int64_t i) {
    return std::isfinite(b[4 * i]) && std::isfinite(b[4 * i + 1]) && std::isfinite(b[4 * i + 2]) &&
           std::isfinite(b[4 * i + 3]);
  };
  double lo_x = std::numeric_limits<double>::infinity(), lo_y = lo_x, hi_x = -lo_x, hi_y = -lo_x;
  for (int64_t i : order) {
    if (!finite_box(i)) continue;
    const double cx = 0.5 * (static_cast<double>(b[4 * i]) + b[4 * i + 2]);
    const double cy = 0.5 * (static_cast<double>(b[4 * i + 1]) + b[4 * i + 3]);
    lo_x = std::min(lo_x, cx); hi_x = std::max(hi_x, cx); lo_y = std::min(lo_y, cy); hi_y = std::max(hi_y, cy);
  }
  const double sx = hi_x > lo_x ? 65535.0 / (hi_x - lo_x) : 0.0;
  const double sy = hi_y > lo_y ? 65535.0 / (hi_y - lo_y) : 0.0;
  std::vector<uint64_t> key(n, std::numeric_limits<uint64_t>::max());
  for (int64_t i : order) {
    if (!finite_box(i)) continue;
    const double cx = 0.5 * (static_cast<double>(b[4 * i]) + b[4 * i + 2]);
    const double cy = 0.5 * (static_cast<double>(b[4 * i + 1]) + b[4 * i + 3]);
    // min() guards the quantization against a centre that rounds just past the top of the range
    const uint32_t qx = static_cast<uint32_t>(std::min(65535.0, std::max(0.0, (cx - lo_x) * sx)));
    const uint32_t qy = static_cast<uint32_t>(std::min(65535.0, std::max(0.0, (cy - lo_y) * sy)));
    key[i] = morton16(qx, qy);
  }
  std::sort(order.begin(), order.end(), [&](int64_t u, int64_t v) {
    if (cat != nullptr && cat[u] != cat[v]) return cat[u] < cat[v];
    if (key[u] != key[v]) return key[u] < key[v];
    return u < v;
  });
  const int64_t m = static_cast<int64_t>(order.size());
  Boxes<T> bx(m);
  gather_boxes<T>(boxes_c, order, bx);
  std::vector<double> s(m);
  for (int64_t q = 0; q < m; ++q) s[q] = score[order[q]];

  std::vector<int64_t> seg{0};
  if (cat != nullptr) {
    for (int64_t q = 1; q < m; ++q)
      if (cat[order[q]] != cat[order[q - 1]]) seg.push_back(q);
  }
  seg.push_back(m);
  const int64_t nseg = static_cast<int64_t>(seg.size()) - 1;
  std::vector<std::vector<int64_t>> keeps(nseg);
  std::vector<std::vector<double>> kept_scores(nseg);
  at::parallel_for(0, nseg, class_grain(seg), [&](int64_t s0, int64_t s1) {
    for (int64_t g = s0; g < s1; ++g) {
      soft_segment<T>(bx, s.data(), order.data(), seg[g], seg[g + 1] - seg[g], p, keeps[g], kept_scores[g]);
    }
  });

  std::vector<std::pair<double, int64_t>> out;  // (decayed score, original index)
  for (int64_t g = 0; g < nseg; ++g)
    for (size_t q = 0; q < keeps[g].size(); ++q) out.emplace_back(kept_scores[g][q], keeps[g][q]);
  if (nseg > 1) {
    // Selection order within a class is decreasing decayed score with ties by index; merge classes the same way.
    std::sort(out.begin(), out.end(), [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) {
      if (a.first != b.first) return a.first > b.first;
      return a.second < b.second;
    });
  }
  const int64_t k = static_cast<int64_t>(out.size());
  at::Tensor keep_t = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor ns_t = at::empty({k}, at::TensorOptions().dtype(at::kDouble));
  int64_t* keep = keep_t.data_ptr<int64_t>();
  double* ns = ns_t.data_ptr<double>();
  for (int64_t q = 0; q < k; ++q) {
    ns[q] = out[q].first;
    keep[q] = out[q].second;
  }
  return {keep_t, ns_t.to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> soft_dispatch(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs, const SoftArgs& p) {
  check_boxes(boxes);
  check_vector(scores, "scores", boxes, true);
  if (idxs != nullptr) check_vector(*idxs, "idxs", boxes, false);
  if (compute_type(boxes) == at::kDouble) return soft_impl<double>(boxes, scores, idxs, p);
  return soft_impl<float>(boxes, scores, idxs, p);
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, c10::string_view method, double sigma, double iou_threshold,
    double score_threshold) {
  const SoftArgs p = soft_args(std::string(method), sigma, iou_threshold, score_threshold);
  return soft_dispatch(boxes, scores, nullptr, p);
}

std::tuple<at::Tensor, at::Tensor> batched_soft_nms_cpu(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs, c10::string_view method, double sigma,
    double iou_threshold, double score_threshold) {
  const SoftArgs p = soft_args(std::string(method), sigma, iou_threshold, score_threshold);
  return soft_dispatch(boxes, scores, &idxs, p);
}

}  // namespace

IOUCTL_VECTORIZE_END

TORCH_LIBRARY_IMPL(iouctl, CPU, m) {
  m.impl("iou_guided_nms", TORCH_FN(IoUGuidedCpu::nms));
  m.impl("batched_iou_guided_nms", TORCH_FN(IoUGuidedCpu::batched_nms));
  m.impl("soft_nms", TORCH_FN(soft_nms_cpu));
  m.impl("batched_soft_nms", TORCH_FN(batched_soft_nms_cpu));
}
