// Precise RoI Pooling, CPU kernel: constant cost per bin through a 2-D antiderivative.
//
// f(x, y) = sum_ij F[j, i] hat(x - i) hat(y - j) (cell (row j, column i) at (x=i, y=j); 0 beyond one cell outside).
// Its antiderivative S(x, y) = integral of f over (-inf, x] x (-inf, y] is, with the exclusive integral image
// P[Y][X] = sum_{j<Y, i<X} F[j, i] (indices clamped to [0, H] x [0, W]), exactly a 3x3 quadratic B-spline read-out:
//   S(x, y) = sum_{a,b in 0..2} v_a(ty) v_b(tx) P[ky + a][kx + b],  k = floor(x), t = x - k,
//   v = ((1-t)^2/2, 1/2 + t - t^2, t^2/2),
// because the antiderivative of the hat is piecewise quadratic. A bin integral is then 4 corner values of S,
// and dS/dx (the line integral of f along y, needed for the box gradient) uses the derivatives of v.
// P is accumulated in float64: bin integrals are differences of large prefix sums, and float32 would cancel.
//
// Work is split in (image, channel block) items: each item builds the integral image of its channels once, in
// (y, x, channel) order so every read-out is a contiguous run of channels, and serves all RoIs of that image.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace {

// kThin: a bin side below kThinSide cells. The corner formula's rounding error is ~eps64 * |P| / bin area, which
// would swamp such bins (|P| is a sum over the whole image), so they take the direct path: the exact sum over the
// few cells they touch, with hat integrals taken over in-cell offsets (relative error ~eps64 at any bin size).
// Above the cut the corner formula errs by < 1e-16 * sum|x| * 64^2, i.e. < 1e-7 of the output for maps up to ~1M cells.
constexpr int8_t kNormal = 0, kEmpty = 1, kNaN = 2, kThin = 3;
constexpr double kThinSide = 1.0 / 64;

// One bin edge along one axis: where it reads the integral image and with which weights.
struct Line {
  int64_t idx[3];  // rows (or columns) of P, clamped to [0, size]
  double val[3];   // S weights
  double der[3];   // d(weights)/d(coordinate)
};

Line make_line(double x, int64_t size) {
  // Beyond [-1, size] f is 0, so S is flat there: clamping is exact (and its derivative weights sum to 0).
  x = std::min(std::max(x, -1.0), static_cast<double>(size));
  const double k = std::floor(x), t = x - k, u = 1.0 - t;
  const int64_t ki = static_cast<int64_t>(k);
  Line l;
  for (int a = 0; a < 3; ++a) l.idx[a] = std::min(std::max(ki + a, int64_t(0)), size);
  l.val[0] = 0.5 * u * u;
  l.val[1] = 0.5 + t - t * t;
  l.val[2] = 0.5 * t * t;
  l.der[0] = -u;
  l.der[1] = u - t;
  l.der[2] = t;
  return l;
}

struct Geometry {
  int64_t K = 0, PH = 0, PW = 0;
  std::vector<int64_t> batch;
  std::vector<int8_t> status;
  std::vector<double> w, h, area, x1, y1, x2, y2;
  std::vector<Line> xs, ys;              // [K, PW + 1], [K, PH + 1]
  std::vector<std::vector<int64_t>> of;  // RoI indices per image
  const Line* xline(int64_t k) const { return xs.data() + k * (PW + 1); }
  const Line* yline(int64_t k) const { return ys.data() + k * (PH + 1); }
};

Geometry make_geometry(const at::Tensor& rois, int64_t N, int64_t H, int64_t W, int64_t PH, int64_t PW,
                       double scale) {
  Geometry g;
  const at::Tensor r = rois.to(at::kDouble).contiguous();
  const double* rp = r.data_ptr<double>();
  const int64_t K = r.size(0);
  g.K = K;
  g.PH = PH;
  g.PW = PW;
  g.batch.resize(K);
  g.status.resize(K);
  g.w.resize(K);
  g.h.resize(K);
  g.area.resize(K);
  g.x1.resize(K);
  g.y1.resize(K);
  g.x2.resize(K);
  g.y2.resize(K);
  g.xs.resize(K * (PW + 1));
  g.ys.resize(K * (PH + 1));
  g.of.resize(N);
  for (int64_t k = 0; k < K; ++k) {
    const double b = rp[k * 5];
    TORCH_CHECK_VALUE(std::isfinite(b) && b == std::floor(b) && b >= 0 && b < static_cast<double>(N),
                      "prroi_pool: rois[", k, ", 0] (batch index) is ", b, "; it must be an integer in [0, ", N,
                      ") for an input batch of ", N);
    g.batch[k] = static_cast<int64_t>(b);
    g.of[g.batch[k]].push_back(k);
  }
  at::parallel_for(0, K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const double x1 = rp[k * 5 + 1] * scale, y1 = rp[k * 5 + 2] * scale;
      const double x2 = rp[k * 5 + 3] * scale, y2 = rp[k * 5 + 4] * scale;
      const double w = x2 - x1, h = y2 - y1;
      g.w[k] = w;
      g.h[k] = h;
      g.area[k] = 0;
      if (std::isnan(w) || std::isnan(h)) {
        g.status[k] = kNaN;
        continue;
      }
      // Width/height clamp at 0 (empty bins give 0); an infinite bin averages a finite integral to 0.
      const double bw = w / PW, bh = h / PH, area = bw * bh;
      if (!(w > 0 && h > 0) || !std::isfinite(area) || !(area > 0)) {
        g.status[k] = kEmpty;
        continue;
      }
      g.area[k] = area;
      g.x1[k] = x1;
      g.y1[k] = y1;
      g.x2[k] = x2;
      g.y2[k] = y2;
      if (bw < kThinSide || bh < kThinSide) {
        g.status[k] = kThin;
        continue;
      }
      g.status[k] = kNormal;
      Line* xl = g.xs.data() + k * (PW + 1);
      Line* yl = g.ys.data() + k * (PH + 1);
      for (int64_t q = 0; q <= PW; ++q) xl[q] = make_line(q == PW ? x2 : x1 + q * bw, W);
      for (int64_t p = 0; p <= PH; ++p) yl[p] = make_line(p == PH ? y2 : y1 + p * bh, H);
    }
  });
  return g;
}

// Channel block size: one block's integral image ((H+1)(W+1) x block doubles) should stay near 2 MB so RoI reads
// hit cache (measured on a 2-core EPYC at [2, 256, 100, 152]: 8-16 channels 2-3x faster than 64), with enough
// (image, block) items to keep every thread busy.
int64_t channel_block(int64_t N, int64_t C, int64_t H, int64_t W) {
  const double plane = static_cast<double>((H + 1) * (W + 1)) * sizeof(double);
  int64_t cb = 32;
  while (cb > 8 && cb * plane > 2.0 * (1 << 20)) cb /= 2;
  const int64_t threads = at::get_num_threads();
  while (cb > 1 && N * ((C + cb - 1) / cb) < 2 * threads) cb /= 2;
  return std::max<int64_t>(std::min(cb, C), 1);
}

// Items per task for at::parallel_for: everything in one task (serial) when the whole call is cheap, since waking
// a thread pool costs more than ~0.1 ms of work (and far more when the cores are shared with other processes).
int64_t grain(int64_t items, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t PH, int64_t PW) {
  const double work = static_cast<double>(N) * C * (H + 1) * (W + 1) + 9.0 * K * C * (PH + 1) * (PW + 1);
  return work < 2e5 ? std::max<int64_t>(items, 1) : 1;
}

// ---- direct path (thin bins): exact sums over the touched cells, as the CUDA kernel does ----

// Bin edges along one axis clamped to [-1, size] (f is 0 beyond), as cells [first, last] plus the edges' offsets
// from cell `origin`: small numbers, so the hat integrals below never subtract two large coordinates.
struct Span {
  int64_t first, last, origin;
  double lo, hi;
};

Span make_span(double e1, double e2, int64_t size) {
  e1 = std::min(std::max(e1, -1.0), static_cast<double>(size));
  e2 = std::min(std::max(e2, -1.0), static_cast<double>(size));
  const double o = std::floor(e1);
  Span s;
  s.origin = static_cast<int64_t>(o);
  s.first = std::max<int64_t>(s.origin, 0);
  s.last = std::min<int64_t>(static_cast<int64_t>(std::ceil(e2)), size - 1);
  s.lo = e1 - o;
  s.hi = e2 - o;
  return s;
}

// Integral of max(0, 1 - |t|) over [a, b], piece by piece (no difference of two antiderivative values).
double hat_integral(double a, double b) {
  double v = 0;
  double lo = std::max(a, -1.0), hi = std::min(b, 0.0);
  if (hi > lo) v += (hi - lo) * (1 + 0.5 * (hi + lo));
  lo = std::max(a, 0.0);
  hi = std::min(b, 1.0);
  if (hi > lo) v += (hi - lo) * (1 - 0.5 * (hi + lo));
  return v;
}

double weight(const Span& s, int64_t i) {
  const double d = static_cast<double>(i - s.origin);
  return hat_integral(s.lo - d, s.hi - d);
}

// edge t of `bins` equal bins from lo to hi (the last edge is hi itself, as in make_geometry)
double edge(double lo, double hi, double step, int64_t t, int64_t bins) {
  return t == bins ? hi : lo + static_cast<double>(t) * step;
}

struct ThinBins {
  std::vector<Span> xs, ys;            // [PW], [PH]
  std::vector<double> ex, ey;          // edges [PW + 1], [PH + 1]
  std::vector<std::vector<double>> wx;  // per column bin: weights of cells first..last
  ThinBins(const Geometry& g, int64_t k, int64_t H, int64_t W) {
    const int64_t PH = g.PH, PW = g.PW;
    const double bw = g.w[k] / PW, bh = g.h[k] / PH;
    for (int64_t q = 0; q <= PW; ++q) ex.push_back(edge(g.x1[k], g.x2[k], bw, q, PW));
    for (int64_t p = 0; p <= PH; ++p) ey.push_back(edge(g.y1[k], g.y2[k], bh, p, PH));
    for (int64_t q = 0; q < PW; ++q) {
      xs.push_back(make_span(ex[q], ex[q + 1], W));
      std::vector<double> w;
      for (int64_t i = xs.back().first; i <= xs.back().last; ++i) w.push_back(weight(xs.back(), i));
      wx.push_back(std::move(w));
    }
    for (int64_t p = 0; p < PH; ++p) ys.push_back(make_span(ey[p], ey[p + 1], H));
  }
};

struct Strides {
  int64_t n, c, h, w;
};

// Exact integral of f over thin bin (p, q) of channel plane `plane` (strides s.h, s.w).
template <typename scalar_t>
double thin_bin_integral(const scalar_t* plane, Strides s, const ThinBins& tb, int64_t p, int64_t q) {
  const Span& sy = tb.ys[p];
  const Span& sx = tb.xs[q];
  const std::vector<double>& wx = tb.wx[q];
  double sum = 0;
  for (int64_t j = sy.first; j <= sy.last; ++j) {
    const double wy = weight(sy, j);
    if (wy == 0) continue;
    double row = 0;
    for (int64_t i = sx.first; i <= sx.last; ++i)
      row += wx[i - sx.first] * static_cast<double>(plane[j * s.h + i * s.w]);
    sum += wy * row;
  }
  return sum;
}

// Integral of f along the line at coordinate e of one axis, over the cells of span sp on the other axis:
// d(bin integral) / d(edge e). `along` strides the span's axis, `across` the axis of e, whose size is `size`.
template <typename scalar_t>
double line(const scalar_t* plane, int64_t along, int64_t across, const Span& sp, double e, int64_t size) {
  e = std::min(std::max(e, -1.0), static_cast<double>(size));  // f = 0 at and beyond -1 and size
  const double o = std::floor(e), t = e - o;
  const int64_t i0 = static_cast<int64_t>(o);
  double sum = 0;
  for (int64_t k = sp.first; k <= sp.last; ++k) {
    double v = 0;
    if (i0 >= 0 && i0 < size) v += (1 - t) * static_cast<double>(plane[k * along + i0 * across]);
    if (i0 + 1 >= 0 && i0 + 1 < size) v += t * static_cast<double>(plane[k * along + (i0 + 1) * across]);
    sum += weight(sp, k) * v;
  }
  return sum;
}

// P for channels [c0, c0 + cb) of image n into P[(H+1) * (W+1) * cb], layout (Y, X, channel).
template <typename scalar_t>
void integral_image(const scalar_t* in, Strides s, int64_t n, int64_t c0, int64_t cb, int64_t H, int64_t W,
                    double* P) {
  const int64_t row = (W + 1) * cb;
  std::fill(P, P + row, 0.0);
  std::vector<double> acc(cb);
  const scalar_t* base = in + n * s.n + c0 * s.c;
  for (int64_t y = 0; y < H; ++y) {
    const double* prev = P + y * row;
    double* cur = P + (y + 1) * row;
    std::fill(cur, cur + cb, 0.0);
    std::fill(acc.begin(), acc.end(), 0.0);
    // one pass: running row sums per channel plus the row above; the inner loop walks channels, so the input is
    // read as cb parallel streams along x (NCHW) or contiguously (channels-last)
    const scalar_t* src = base + y * s.h;
    for (int64_t x = 1; x <= W; ++x, src += s.w) {
      double* d = cur + x * cb;
      const double* up = prev + x * cb;
      for (int64_t c = 0; c < cb; ++c) {
        acc[c] += static_cast<double>(src[c * s.c]);
        d[c] = acc[c] + up[c];
      }
    }
  }
}

void check_common(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW, double scale) {
  TORCH_CHECK_VALUE(input.dim() == 4, "prroi_pool: input must be [N, C, H, W]; got shape ", input.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "prroi_pool: rois must be [K, 5] (batch index, x1, y1, x2, y2); got shape ", rois.sizes());
  TORCH_CHECK_VALUE(input.device() == rois.device(), "prroi_pool: input is on ", input.device(), " but rois on ",
                    rois.device());
  TORCH_CHECK_VALUE(PH > 0 && PW > 0, "prroi_pool: output size must be positive; got (", PH, ", ", PW, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "prroi_pool: spatial_scale must be finite and > 0; got ",
                    scale);
  TORCH_CHECK_VALUE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                    "prroi_pool (CPU kernel): input must be float32 or float64; got ", input.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(rois.scalar_type()), "prroi_pool: rois must be floating point; got ",
                    rois.scalar_type());
}

at::Tensor prroi_pool_forward_cpu(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW,
                                  double scale) {
  check_common(input, rois, PH, PW, scale);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = rois.size(0);
  at::Tensor out = at::empty({K, C, PH, PW}, input.options().memory_format(at::MemoryFormat::Contiguous));
  const Geometry g = make_geometry(rois, N, H, W, PH, PW, scale);
  if (K == 0 || C == 0) return out;
  const int64_t CB = channel_block(N, C, H, W), nblocks = (C + CB - 1) / CB;
  const Strides s{input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const int64_t bins = PH * PW, grid = (PH + 1) * (PW + 1);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_forward_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t items = N * nblocks;
    at::parallel_for(0, items, grain(items, N, C, H, W, K, PH, PW), [&](int64_t begin, int64_t end) {
      std::unique_ptr<double[]> P, S;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / nblocks, c0 = (item % nblocks) * CB, cb = std::min(CB, C - c0);
        if (g.of[n].empty()) continue;
        if (!P) {
          P.reset(new double[(H + 1) * (W + 1) * CB]);
          S.reset(new double[grid * CB]);
        }
        integral_image(in, s, n, c0, cb, H, W, P.get());
        for (const int64_t k : g.of[n]) {
          scalar_t* ok = o + (k * C + c0) * bins;
          if (g.status[k] == kThin) {
            const ThinBins tb(g, k, H, W);
            for (int64_t c = 0; c < cb; ++c) {
              const scalar_t* plane = in + n * s.n + (c0 + c) * s.c;
              for (int64_t p = 0; p < PH; ++p)
                for (int64_t q = 0; q < PW; ++q)
                  ok[c * bins + p * PW + q] = static_cast<scalar_t>(thin_bin_integral(plane, s, tb, p, q) / g.area[k]);
            }
            continue;
          }
          if (g.status[k] != kNormal) {
            const scalar_t fill = g.status[k] == kNaN ? std::numeric_limits<scalar_t>::quiet_NaN() : scalar_t(0);
            std::fill(ok, ok + cb * bins, fill);
            continue;
          }
          const Line* xl = g.xline(k);
          const Line* yl = g.yline(k);
          for (int64_t p = 0; p <= PH; ++p) {
            const Line& ly = yl[p];
            for (int64_t q = 0; q <= PW; ++q) {
              const Line& lx = xl[q];
              const double* src[9];
              double wt[9];
              for (int a = 0; a < 3; ++a)
                for (int b = 0; b < 3; ++b) {
                  src[a * 3 + b] = P.get() + (ly.idx[a] * (W + 1) + lx.idx[b]) * cb;
                  wt[a * 3 + b] = ly.val[a] * lx.val[b];
                }
              double* sp = S.get() + (p * (PW + 1) + q) * cb;
              for (int64_t c = 0; c < cb; ++c) {
                sp[c] = wt[0] * src[0][c] + wt[1] * src[1][c] + wt[2] * src[2][c] + wt[3] * src[3][c] +
                        wt[4] * src[4][c] + wt[5] * src[5][c] + wt[6] * src[6][c] + wt[7] * src[7][c] +
                        wt[8] * src[8][c];
              }
            }
          }
          const double inv_area = 1.0 / g.area[k];
          const double* Sp = S.get();
          for (int64_t c = 0; c < cb; ++c) {
            for (int64_t p = 0; p < PH; ++p) {
              for (int64_t q = 0; q < PW; ++q) {
                const int64_t i00 = (p * (PW + 1) + q) * cb + c, i10 = i00 + (PW + 1) * cb;
                const double v = Sp[i10 + cb] - Sp[i00 + cb] - Sp[i10] + Sp[i00];
                ok[c * bins + p * PW + q] = static_cast<scalar_t>(v * inv_area);
              }
            }
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_backward_cpu(const at::Tensor& grad_, const at::Tensor& input,
                                                           const at::Tensor& rois, const at::Tensor& output_,
                                                           int64_t PH, int64_t PW, double scale, bool input_grad,
                                                           bool rois_grad) {
  check_common(input, rois, PH, PW, scale);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = rois.size(0);
  TORCH_CHECK_VALUE(grad_.sizes() == at::IntArrayRef({K, C, PH, PW}) && output_.sizes() == grad_.sizes(),
                    "prroi_pool backward: grad and output must be [K, C, PH, PW] = [", K, ", ", C, ", ", PH, ", ",
                    PW, "]; got ", grad_.sizes(), " and ", output_.sizes());
  TORCH_CHECK_VALUE(grad_.scalar_type() == input.scalar_type() && output_.scalar_type() == input.scalar_type(),
                    "prroi_pool backward: grad and output must have the input's dtype ", input.scalar_type());
  at::Tensor grad_input = input_grad ? at::empty_like(input) : at::empty({0}, input.options());
  at::Tensor grad_rois = rois_grad ? at::zeros({K, 5}, rois.options()) : at::empty({0}, rois.options());
  if (!input_grad && !rois_grad) return {grad_input, grad_rois};
  if (input_grad && (K == 0 || C == 0)) grad_input.zero_();
  const Geometry g = make_geometry(rois, N, H, W, PH, PW, scale);
  if (K == 0 || C == 0) return {grad_input, grad_rois};

  const at::Tensor grad = grad_.contiguous();
  const at::Tensor output = output_.contiguous();
  const int64_t CB = channel_block(N, C, H, W), nblocks = (C + CB - 1) / CB;
  const Strides s{input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const Strides gs = input_grad ? Strides{grad_input.stride(0), grad_input.stride(1), grad_input.stride(2),
                                          grad_input.stride(3)}
                                : Strides{0, 0, 0, 0};
  const int64_t bins = PH * PW, grid = (PH + 1) * (PW + 1), plane = (H + 1) * (W + 1);
  // per (channel block, RoI) box-gradient partial sums (x1, y1, x2, y2): each is written by one item only
  std::vector<double> partial(rois_grad ? nblocks * K * 4 : 0, 0.0);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_backward_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const scalar_t* out = output.const_data_ptr<scalar_t>();
    scalar_t* gi = input_grad ? grad_input.data_ptr<scalar_t>() : nullptr;
    const int64_t items = N * nblocks;
    at::parallel_for(0, items, grain(items, N, C, H, W, K, PH, PW), [&](int64_t begin, int64_t end) {
      std::unique_ptr<double[]> P, GP, GS;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / nblocks, blk = item % nblocks, c0 = blk * CB, cb = std::min(CB, C - c0);
        if (g.of[n].empty()) {
          if (input_grad)
            for (int64_t c = 0; c < cb; ++c)
              for (int64_t y = 0; y < H; ++y)
                for (int64_t x = 0; x < W; ++x) gi[n * gs.n + (c0 + c) * gs.c + y * gs.h + x * gs.w] = 0;
          continue;
        }
        if (!GS) {
          GS.reset(new double[grid * CB]);
          if (rois_grad) P.reset(new double[plane * CB]);
          if (input_grad) GP.reset(new double[plane * CB]);
        }
        if (rois_grad) integral_image(in, s, n, c0, cb, H, W, P.get());
        if (input_grad) std::fill(GP.get(), GP.get() + plane * cb, 0.0);
        for (const int64_t k : g.of[n]) {
          if (g.status[k] == kNaN) {
            if (rois_grad)
              for (int j = 0; j < 4; ++j) partial[(blk * K + k) * 4 + j] = std::numeric_limits<double>::quiet_NaN();
            continue;
          }
          if (g.status[k] == kThin) {
            const ThinBins tb(g, k, H, W);
            const double inv_area = 1.0 / g.area[k], inv_w = 1.0 / g.w[k], inv_h = 1.0 / g.h[k];
            double d[4] = {0, 0, 0, 0};  // x1, y1, x2, y2
            for (int64_t c = 0; c < cb; ++c) {
              const scalar_t* plane = in + n * s.n + (c0 + c) * s.c;
              for (int64_t p = 0; p < PH; ++p) {
                for (int64_t q = 0; q < PW; ++q) {
                  const double gv = static_cast<double>(go[(k * C + c0 + c) * bins + p * PW + q]);
                  if (gv == 0) continue;
                  const Span& sy = tb.ys[p];
                  const Span& sx = tb.xs[q];
                  if (input_grad) {
                    // a unit at F[j, i] is a second difference in P space (GP is suffix-summed below)
                    for (int64_t j = sy.first; j <= sy.last; ++j) {
                      const double wy = weight(sy, j) * gv * inv_area;
                      if (wy == 0) continue;
                      double* r0 = GP.get() + j * (W + 1) * cb + c;
                      double* r1 = r0 + (W + 1) * cb;
                      for (int64_t i = sx.first; i <= sx.last; ++i) {
                        const double v = wy * tb.wx[q][i - sx.first];
                        r1[(i + 1) * cb] += v;
                        r1[i * cb] -= v;
                        r0[(i + 1) * cb] -= v;
                        r0[i * cb] += v;
                      }
                    }
                  }
                  if (rois_grad) {
                    // as the CUDA kernel; the bin average is recomputed in float64 because the saved (possibly
                    // float32) output, divided by a thin width, would swamp the gradient with its rounding
                    const double ob = thin_bin_integral(plane, s, tb, p, q) * inv_area;
                    const double lx1 = line(plane, s.h, s.w, sy, tb.ex[q], W);  // columns x = edge
                    const double lx2 = line(plane, s.h, s.w, sy, tb.ex[q + 1], W);
                    const double ly1 = line(plane, s.w, s.h, sx, tb.ey[p], H);  // rows y = edge
                    const double ly2 = line(plane, s.w, s.h, sx, tb.ey[p + 1], H);
                    const double fq0 = static_cast<double>(q) / PW, fq1 = static_cast<double>(q + 1) / PW;
                    const double fp0 = static_cast<double>(p) / PH, fp1 = static_cast<double>(p + 1) / PH;
                    d[0] += gv * ((lx2 * (1 - fq1) - lx1 * (1 - fq0)) * inv_area + ob * inv_w);
                    d[2] += gv * ((lx2 * fq1 - lx1 * fq0) * inv_area - ob * inv_w);
                    d[1] += gv * ((ly2 * (1 - fp1) - ly1 * (1 - fp0)) * inv_area + ob * inv_h);
                    d[3] += gv * ((ly2 * fp1 - ly1 * fp0) * inv_area - ob * inv_h);
                  }
                }
              }
            }
            if (rois_grad)
              for (int j = 0; j < 4; ++j) partial[(blk * K + k) * 4 + j] = d[j];
            continue;
          }
          if (g.status[k] != kNormal) continue;
          // dL/dS at every bin corner: +-dL/dout / area over the (up to 4) bins sharing the corner
          double* gsp = GS.get();
          std::fill(gsp, gsp + grid * cb, 0.0);
          const double inv_area = 1.0 / g.area[k];
          double dot_out = 0;  // sum over bins and channels of dL/dout * out: the area term of the box gradient
          const scalar_t* gk = go + (k * C + c0) * bins;
          const scalar_t* ok = out + (k * C + c0) * bins;
          for (int64_t c = 0; c < cb; ++c) {
            for (int64_t p = 0; p < PH; ++p) {
              for (int64_t q = 0; q < PW; ++q) {
                const double gv = static_cast<double>(gk[c * bins + p * PW + q]);
                const double ga = gv * inv_area;
                const int64_t i00 = (p * (PW + 1) + q) * cb + c, i10 = i00 + (PW + 1) * cb;
                gsp[i00] += ga;
                gsp[i00 + cb] -= ga;
                gsp[i10] -= ga;
                gsp[i10 + cb] += ga;
                if (rois_grad) dot_out += gv * static_cast<double>(ok[c * bins + p * PW + q]);
              }
            }
          }
          const Line* xl = g.xline(k);
          const Line* yl = g.yline(k);
          double dx1 = 0, dy1 = 0, dx2 = 0, dy2 = 0;
          for (int64_t p = 0; p <= PH; ++p) {
            const Line& ly = yl[p];
            for (int64_t q = 0; q <= PW; ++q) {
              const Line& lx = xl[q];
              const double* gc = gsp + (p * (PW + 1) + q) * cb;
              if (input_grad) {
                for (int a = 0; a < 3; ++a)
                  for (int b = 0; b < 3; ++b) {
                    const double wt = ly.val[a] * lx.val[b];
                    double* dst = GP.get() + (ly.idx[a] * (W + 1) + lx.idx[b]) * cb;
                    for (int64_t c = 0; c < cb; ++c) dst[c] += wt * gc[c];
                  }
              }
              if (rois_grad) {
                // dL/dx at this corner = sum_c dL/dS * dS/dx, dS/dx from the derivative weights
                double sx = 0, sy = 0;
                for (int a = 0; a < 3; ++a)
                  for (int b = 0; b < 3; ++b) {
                    const double* src = P.get() + (ly.idx[a] * (W + 1) + lx.idx[b]) * cb;
                    double d = 0;
                    for (int64_t c = 0; c < cb; ++c) d += gc[c] * src[c];
                    sx += ly.val[a] * lx.der[b] * d;
                    sy += ly.der[a] * lx.val[b] * d;
                  }
                // corner q sits at x1 + q/PW (x2 - x1)
                const double fx = static_cast<double>(q) / PW, fy = static_cast<double>(p) / PH;
                dx1 += sx * (1 - fx);
                dx2 += sx * fx;
                dy1 += sy * (1 - fy);
                dy2 += sy * fy;
              }
            }
          }
          if (rois_grad) {
            // out = integral / (w h / (PH PW)): d out / d w = -out / w
            double* pr = partial.data() + (blk * K + k) * 4;
            pr[0] = dx1 + dot_out / g.w[k];
            pr[1] = dy1 + dot_out / g.h[k];
            pr[2] = dx2 - dot_out / g.w[k];
            pr[3] = dy2 - dot_out / g.h[k];
          }
        }
        if (input_grad) {
          // dL/dF[j, i] = sum_{Y > j, X > i} dL/dP[Y][X]: suffix sums along both axes, in place, bottom row
          // first, each finished row written straight out as input row Y - 1 (cb parallel streams along x)
          const int64_t row = (W + 1) * cb;
          std::vector<double> acc(cb);
          scalar_t* dst = gi + n * gs.n + c0 * gs.c;
          for (int64_t Y = H; Y >= 1; --Y) {
            double* r = GP.get() + Y * row;
            const double* below = Y < H ? r + row : nullptr;
            std::fill(acc.begin(), acc.end(), 0.0);
            scalar_t* out_row = dst + (Y - 1) * gs.h;
            for (int64_t X = W; X >= 1; --X) {
              double* d = r + X * cb;
              const double* b = below ? below + X * cb : nullptr;
              scalar_t* o = out_row + (X - 1) * gs.w;
              for (int64_t c = 0; c < cb; ++c) {
                acc[c] += d[c];
                d[c] = acc[c] + (b ? b[c] : 0.0);
                o[c * gs.c] = static_cast<scalar_t>(d[c]);
              }
            }
          }
        }
      }
    });
  });

  if (rois_grad) {
    at::Tensor gr = at::zeros({K, 5}, rois.options().dtype(at::kDouble));
    double* grp = gr.data_ptr<double>();
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < 4; ++j) {
        double v = 0;
        for (int64_t blk = 0; blk < nblocks; ++blk) v += partial[(blk * K + k) * 4 + j];
        grp[k * 5 + 1 + j] = v * scale;  // the kernel worked in feature-map coordinates (x * spatial_scale)
      }
    grad_rois.copy_(gr);
  }
  return {grad_input, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(iouctl, CPU, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cpu);
  m.impl("_prroi_pool_backward", &prroi_pool_backward_cpu);
}
