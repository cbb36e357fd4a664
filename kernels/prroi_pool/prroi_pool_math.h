// Per-element math of Precise RoI Pooling (Jiang et al., IoU-Net, ECCV 2018), shared by the CUDA kernels
// (prroi_pool_cuda.cu) and the CPU "direct" implementation (prroi_pool_cpu.cpp), which runs these same element
// bodies in plain loops, so the CPU tests cover the CUDA math. The CPU default (prefix sums) uses the geometry and,
// for thin bins, the bin and line integrals below in float64.
//
// f(x, y) = sum_ij F[j, i] hat(x - i) hat(y - j), hat(t) = max(0, 1 - |t|): cell (row j, column i) sits at (x=i, y=j),
// no half-pixel offset; f = 0 beyond one cell outside the map. A bin's value is the exact average of f over it.
//
// Precision. Geometry (box, bin edges) is computed once per RoI in float64; the element bodies then work in acc_t
// (float for half/bfloat16/float32, double for double) on small numbers only: a bin edge is a cell index plus an
// offset in [0, 1], and a bin's width is kept as its own number (`len`, rounded once from float64), never as the
// difference of two rounded edges, so a bin 1e-4 cells wide keeps float's relative precision. The box gradient
// recomputes the bin average instead of reading the saved (possibly half-precision) output: times 1/w for a thin
// box, the output's rounding would swamp the gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace iouctl {
namespace prroi {

// RoI status: normal; empty (width or height <= 0, or an infinite bin area or one below kMinBinArea: outputs 0);
// NaN coordinate (outputs NaN); batch index not an integer in [0, N) (the host raises; a kernel that meets one
// anyway outputs NaN).
constexpr int32_t kNormal = 0, kEmpty = 1, kNaN = 2, kBadBatch = 3;
// A bin side below kThinSide cells is "thin": the CPU default sums it directly instead of through prefix sums, and
// its box gradient is taken in float64 (its terms are ~1/side and cancel; float would keep ~eps / side of them).
constexpr double kThinSide = 1.0 / 64;
// A bin area below kMinBinArea (cells^2) is empty: float accumulation (half/bfloat16/float32 inputs, the CUDA kernel
// and the "direct" path) would round it and its integral to 0 and output 0/0; every path uses the same rule.
constexpr double kMinBinArea = 1e-30;  // also iouctl.ops.reference.MIN_BIN_AREA

IOUCTL_HOST_DEVICE bool is_nan(double x) { return x != x; }
IOUCTL_HOST_DEVICE bool is_finite(double x) { return x - x == 0.0; }  // inf - inf and NaN - NaN are NaN

// One RoI in feature-map coordinates (float64), computed once per RoI.
struct RoiGeom {
  int64_t n;       // image index (0 unless status is kNormal/kEmpty/kNaN)
  int32_t status;  // kNormal, kEmpty, kNaN, kBadBatch
  int32_t thin;    // a bin side < kThinSide (only meaningful for kNormal)
  double x1, y1, x2, y2, w, h;
  double bw, bh, area;  // bin sides w / PW, h / PH and bin area bw * bh
};

// roi: (batch index, x1, y1, x2, y2) in image coordinates; scale: spatial_scale.
IOUCTL_HOST_DEVICE RoiGeom roi_geometry(const double* roi, int64_t N, int64_t PH, int64_t PW, double scale) {
  RoiGeom g;
  g.n = 0;
  g.thin = 0;
  g.x1 = roi[1] * scale;
  g.y1 = roi[2] * scale;
  g.x2 = roi[3] * scale;
  g.y2 = roi[4] * scale;
  g.w = g.x2 - g.x1;
  g.h = g.y2 - g.y1;
  g.bw = g.bh = g.area = 0;
  const double b = roi[0];
  if (!(b >= 0 && b < static_cast<double>(N) && b == floor(b))) {
    g.status = kBadBatch;
    return g;
  }
  g.n = static_cast<int64_t>(b);
  if (is_nan(g.w) || is_nan(g.h)) {
    g.status = kNaN;
    return g;
  }
  // width/height clamp at 0 (empty bins give 0); an infinite bin averages a finite integral to 0
  g.bw = g.w / static_cast<double>(PW);
  g.bh = g.h / static_cast<double>(PH);
  g.area = g.bw * g.bh;
  g.status = (g.w > 0 && g.h > 0 && is_finite(g.area) && g.area >= kMinBinArea) ? kNormal : kEmpty;
  g.thin = g.status == kNormal && (g.bw < kThinSide || g.bh < kThinSide);
  return g;
}

// What the element bodies need of a RoI, in acc_t.
template <typename acc_t>
struct RoiInfo {
  int64_t n;
  int32_t status, thin;
  acc_t area, inv_w, inv_h;
};

template <typename acc_t>
IOUCTL_HOST_DEVICE RoiInfo<acc_t> roi_info(const RoiGeom& g) {
  RoiInfo<acc_t> r;
  r.n = g.n;
  r.status = g.status;
  r.thin = g.thin;
  const bool ok = g.status == kNormal;
  r.area = static_cast<acc_t>(ok ? g.area : 1.0);
  r.inv_w = static_cast<acc_t>(ok ? 1.0 / g.w : 0.0);
  r.inv_h = static_cast<acc_t>(ok ? 1.0 / g.h : 0.0);
  return r;
}

// Edge t (0..bins) of `bins` equal bins from lo to hi; the last edge is hi itself.
IOUCTL_HOST_DEVICE double bin_edge(double lo, double hi, double step, int64_t t, int64_t bins) {
  return t == bins ? hi : lo + static_cast<double>(t) * step;
}

// A bin along one axis: the cells [first, last] it may touch (clamped to [0, size); first > last when none), its low
// edge as origin + lo (origin = floor, lo in [0, 1]) and its width len. Edges are clamped to [-1, size] first: f is 0
// beyond, so the integral is unchanged.
template <typename acc_t>
struct Span {
  int64_t first, last, origin;
  acc_t lo, len;
};

template <typename acc_t>
IOUCTL_HOST_DEVICE Span<acc_t> make_span(double e0, double e1, int64_t size) {
  e0 = fmin(fmax(e0, -1.0), static_cast<double>(size));
  e1 = fmin(fmax(e1, -1.0), static_cast<double>(size));
  const double o = floor(e0);
  Span<acc_t> s;
  s.origin = static_cast<int64_t>(o);
  s.first = s.origin < 0 ? 0 : s.origin;
  const int64_t top = static_cast<int64_t>(ceil(e1));
  s.last = top > size - 1 ? size - 1 : top;
  s.lo = static_cast<acc_t>(e0 - o);
  s.len = static_cast<acc_t>(e1 - e0);  // exact in float64 for nearby edges (Sterbenz), then rounded once
  return s;
}

// A bin edge as the line integrals read it: cell i0 = floor(e) and t = e - i0 (hat weights 1 - t and t).
template <typename acc_t>
struct EdgePos {
  int64_t cell;
  acc_t t;
};

template <typename acc_t>
IOUCTL_HOST_DEVICE EdgePos<acc_t> make_edge(double e, int64_t size) {
  e = fmin(fmax(e, -1.0), static_cast<double>(size));  // f = 0 at and beyond -1 and size
  const double o = floor(e);
  EdgePos<acc_t> p;
  p.cell = static_cast<int64_t>(o);
  p.t = static_cast<acc_t>(e - o);
  return p;
}

// Bin t of `bins` along one axis: its span, its two edges, and the edges' fractions t / bins, (t + 1) / bins of the
// box side (edge t sits at lo + t / bins * (hi - lo): the weights of the box corners in its gradient).
template <typename acc_t>
struct BinAxis {
  Span<acc_t> span;
  EdgePos<acc_t> e0, e1;
  acc_t f0, f1;
};

template <typename acc_t>
IOUCTL_HOST_DEVICE BinAxis<acc_t> bin_axis(double lo, double hi, double step, int64_t t, int64_t bins,
                                           int64_t size) {
  const double a = bin_edge(lo, hi, step, t, bins), b = bin_edge(lo, hi, step, t + 1, bins);
  BinAxis<acc_t> x;
  x.span = make_span<acc_t>(a, b, size);
  x.e0 = make_edge<acc_t>(a, size);
  x.e1 = make_edge<acc_t>(b, size);
  x.f0 = static_cast<acc_t>(static_cast<double>(t) / bins);
  x.f1 = static_cast<acc_t>(static_cast<double>(t + 1) / bins);
  return x;
}

// The per-RoI tables the element bodies read, computed once per RoI: geometry (float64), info, and the PW column
// and PH row bins (xs[PW], ys[PH]; zeroed for a RoI that is not kNormal, whose elements never read them).
template <typename acc_t>
IOUCTL_HOST_DEVICE void roi_tables(const double* roi, int64_t N, int64_t H, int64_t W, int64_t PH, int64_t PW,
                                   double scale, RoiGeom* geo, RoiInfo<acc_t>* info, BinAxis<acc_t>* xs,
                                   BinAxis<acc_t>* ys) {
  const RoiGeom g = roi_geometry(roi, N, PH, PW, scale);
  *geo = g;
  *info = roi_info<acc_t>(g);
  const bool ok = g.status == kNormal;
  BinAxis<acc_t> none;
  none.span.first = 0;
  none.span.last = -1;
  none.span.origin = 0;
  none.span.lo = none.span.len = 0;
  none.e0.cell = none.e1.cell = 0;
  none.e0.t = none.e1.t = 0;
  none.f0 = none.f1 = 0;
  for (int64_t q = 0; q < PW; ++q) xs[q] = ok ? bin_axis<acc_t>(g.x1, g.x2, g.bw, q, PW, W) : none;
  for (int64_t p = 0; p < PH; ++p) ys[p] = ok ? bin_axis<acc_t>(g.y1, g.y2, g.bh, p, PH, H) : none;
}

// Integral of hat over [a, a + len], len >= 0, one linear piece at a time. A piece's length is len itself, or len
// corrected by the (exact) distance to the piece's end, never the difference of two rounded ends: a thin interval
// keeps len's relative precision.
template <typename acc_t>
IOUCTL_HOST_DEVICE acc_t hat_integral(acc_t a, acc_t len) {
  const acc_t b = a + len, one = 1, zero = 0, half = 0.5;
  acc_t v = 0;
  if (b > -one && a < zero) {  // rising piece t in [-1, 0]: integrand 1 + t
    const bool lo_in = a >= -one, hi_in = b <= zero;
    const acc_t l = lo_in ? a : -one, h = hi_in ? b : zero;
    const acc_t length = lo_in ? (hi_in ? len : -a) : (hi_in ? len + (a + one) : one);
    v += length * (one + half * (h + l));
  }
  if (b > zero && a < one) {  // falling piece t in [0, 1]: integrand 1 - t
    const bool lo_in = a >= zero, hi_in = b <= one;
    const acc_t l = lo_in ? a : zero, h = hi_in ? b : one;
    const acc_t length = lo_in ? (hi_in ? len : one - a) : (hi_in ? len + a : one);
    v += length * (one - half * (h + l));
  }
  return v;
}

// Weight of cell i in the integral over the span: integral of hat(x - i) over the bin.
template <typename acc_t>
IOUCTL_HOST_DEVICE acc_t weight(const Span<acc_t>& s, int64_t i) {
  return hat_integral<acc_t>(s.lo - static_cast<acc_t>(i - s.origin), s.len);
}

// A bin's column weights, computed once instead of once per row (cached up to kCached columns; wider bins, rare for
// proposals, recompute them).
constexpr int kCached = 16;

template <typename acc_t>
struct XWeights {
  const Span<acc_t>& s;
  acc_t w[kCached];
  bool cached;
  IOUCTL_HOST_DEVICE explicit XWeights(const Span<acc_t>& span)
      : s(span), cached(span.last - span.first < kCached) {
    if (cached)
      for (int64_t i = s.first; i <= s.last; ++i) w[i - s.first] = weight(s, i);
  }
  IOUCTL_HOST_DEVICE acc_t operator()(int64_t i) const { return cached ? w[i - s.first] : weight(s, i); }
};

// Integral of f over the bin (sx, sy) of one channel plane (strides sh along y, sw along x).
template <typename scalar_t, typename acc_t>
IOUCTL_HOST_DEVICE acc_t bin_integral(const scalar_t* plane, int64_t sh, int64_t sw, const Span<acc_t>& sx,
                                      const Span<acc_t>& sy) {
  const XWeights<acc_t> wx(sx);
  acc_t sum = 0;
  for (int64_t j = sy.first; j <= sy.last; ++j) {
    const acc_t wy = weight(sy, j);
    if (wy == acc_t(0)) continue;
    acc_t row = 0;
    for (int64_t i = sx.first; i <= sx.last; ++i) row += wx(i) * static_cast<acc_t>(plane[j * sh + i * sw]);
    sum += wy * row;
  }
  return sum;
}

// Integral of f along the line at edge e of one axis, over the cells of span sp of the other axis: the derivative
// of a bin integral with respect to edge e. `along` strides sp's axis, `across` the axis of e, of size `size`.
template <typename scalar_t, typename acc_t>
IOUCTL_HOST_DEVICE acc_t line_integral(const scalar_t* plane, int64_t along, int64_t across, const Span<acc_t>& sp,
                                       const EdgePos<acc_t>& e, int64_t size) {
  const int64_t i0 = e.cell;
  const bool in0 = i0 >= 0 && i0 < size, in1 = i0 + 1 >= 0 && i0 + 1 < size;
  acc_t sum = 0;
  for (int64_t k = sp.first; k <= sp.last; ++k) {
    acc_t v = 0;
    if (in0) v += (acc_t(1) - e.t) * static_cast<acc_t>(plane[k * along + i0 * across]);
    if (in1) v += e.t * static_cast<acc_t>(plane[k * along + (i0 + 1) * across]);
    sum += weight(sp, k) * v;
  }
  return sum;
}

// ---- element bodies: one output bin (RoI k, channel c, bin p, q) ----

// The output value of the bin.
template <typename scalar_t, typename acc_t>
IOUCTL_HOST_DEVICE scalar_t forward_element(const RoiInfo<acc_t>& r, const BinAxis<acc_t>& bx,
                                            const BinAxis<acc_t>& by, const scalar_t* plane, int64_t sh,
                                            int64_t sw) {
  if (r.status != kNormal) return static_cast<scalar_t>(r.status == kEmpty ? acc_t(0) : static_cast<acc_t>(NAN));
  return static_cast<scalar_t>(bin_integral<scalar_t, acc_t>(plane, sh, sw, bx.span, by.span) / r.area);
}

// Spreads the bin's output gradient g over the cells it averages: add(&gplane[cell], value) for each touched cell
// (an atomic add on the GPU, a plain one in the CPU loops, which give each plane to one thread).
template <typename acc_t, typename Add>
IOUCTL_HOST_DEVICE void input_grad_element(const RoiInfo<acc_t>& r, const BinAxis<acc_t>& bx,
                                           const BinAxis<acc_t>& by, acc_t g, acc_t* gplane, int64_t sh, int64_t sw,
                                           Add add) {
  if (r.status != kNormal) return;
  const acc_t gv = g / r.area;
  if (gv == acc_t(0)) return;
  const XWeights<acc_t> wx(bx.span);
  for (int64_t j = by.span.first; j <= by.span.last; ++j) {
    const acc_t wy = weight(by.span, j) * gv;
    if (wy == acc_t(0)) continue;
    for (int64_t i = bx.span.first; i <= bx.span.last; ++i) {
      const acc_t v = wy * wx(i);
      if (v != acc_t(0)) add(gplane + j * sh + i * sw, v);
    }
  }
}

// Adds the bin's contribution g * d(out)/d(x1, y1, x2, y2) (feature-map coordinates) to d[4]. out = I / area with
// I the bin integral: dI/d(edge) is a line integral, and area = w h / (PH PW) gives d(out)/dw = -out / w.
// `area`, `inv_w`, `inv_h` are the RoI's, in acc_t.
template <typename scalar_t, typename acc_t>
IOUCTL_HOST_DEVICE void box_grad_element(const BinAxis<acc_t>& bx, const BinAxis<acc_t>& by, acc_t area,
                                         acc_t inv_w, acc_t inv_h, const scalar_t* plane, int64_t sh, int64_t sw,
                                         int64_t H, int64_t W, acc_t g, double d[4]) {
  if (g == acc_t(0)) return;
  const acc_t inv_area = acc_t(1) / area;
  const acc_t ob = bin_integral<scalar_t, acc_t>(plane, sh, sw, bx.span, by.span) / area;  // recomputed: see top
  const acc_t lx0 = line_integral<scalar_t, acc_t>(plane, sh, sw, by.span, bx.e0, W);  // the column x = edge
  const acc_t lx1 = line_integral<scalar_t, acc_t>(plane, sh, sw, by.span, bx.e1, W);
  const acc_t ly0 = line_integral<scalar_t, acc_t>(plane, sw, sh, bx.span, by.e0, H);  // the row y = edge
  const acc_t ly1 = line_integral<scalar_t, acc_t>(plane, sw, sh, bx.span, by.e1, H);
  const acc_t one = 1;
  d[0] += static_cast<double>(g * ((lx1 * (one - bx.f1) - lx0 * (one - bx.f0)) * inv_area + ob * inv_w));
  d[2] += static_cast<double>(g * ((lx1 * bx.f1 - lx0 * bx.f0) * inv_area - ob * inv_w));
  d[1] += static_cast<double>(g * ((ly1 * (one - by.f1) - ly0 * (one - by.f0)) * inv_area + ob * inv_h));
  d[3] += static_cast<double>(g * ((ly1 * by.f1 - ly0 * by.f0) * inv_area - ob * inv_h));
}

// box_grad_element for a thin RoI: the bin recomputed from the float64 geometry and summed in float64 (per RoI, so
// uniform over a GPU block that serves one RoI).
template <typename scalar_t>
IOUCTL_HOST_DEVICE void box_grad_element_f64(const RoiGeom& geo, int64_t p, int64_t q, int64_t PH, int64_t PW,
                                             const scalar_t* plane, int64_t sh, int64_t sw, int64_t H, int64_t W,
                                             double g, double d[4]) {
  const BinAxis<double> bx = bin_axis<double>(geo.x1, geo.x2, geo.bw, q, PW, W);
  const BinAxis<double> by = bin_axis<double>(geo.y1, geo.y2, geo.bh, p, PH, H);
  box_grad_element<scalar_t, double>(bx, by, geo.area, 1.0 / geo.w, 1.0 / geo.h, plane, sh, sw, H, W, g, d);
}

}  // namespace prroi
}  // namespace iouctl
