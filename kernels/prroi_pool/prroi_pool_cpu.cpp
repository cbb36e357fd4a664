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
// Geometry and the thin-bin path use the shared per-element math of prroi_pool_math.h in float64.
//
// Also here: the "direct" implementation (ops _prroi_pool_direct and _prroi_pool_direct_backward): the CUDA
// kernels' element bodies (prroi_pool_math.h) run in plain loops, in the CUDA kernels' dtypes (half, bfloat16, float
// accumulate in float; double in double), so CPU tests check the math the GPU runs. Slower than the default.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_math.h"

namespace {

namespace pm = iouctl::prroi;
namespace checks = iouctl::prroi_checks;

// Thin bins (a side below pm::kThinSide = 1/64 cell): the corner formula's rounding error is ~eps64 * |P| / bin
// area, which would swamp such bins (|P| is a sum over the whole image), so they take the direct path: the exact sum
// over the few cells they touch (pm::bin_integral in float64; relative error ~eps64 at any bin size).
// Above the cut the corner formula errs by < 1e-16 * sum|x| * 64^2, i.e. < 1e-7 of the output for maps up to ~1M cells.

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
  std::vector<pm::RoiGeom> geo;          // [K]; status kNormal / kEmpty / kNaN (a bad batch index raises)
  std::vector<Line> xs, ys;              // [K, PW + 1], [K, PH + 1] (normal, not thin RoIs)
  std::vector<std::vector<int64_t>> of;  // RoI indices per image
  const Line* xline(int64_t k) const { return xs.data() + k * (PW + 1); }
  const Line* yline(int64_t k) const { return ys.data() + k * (PH + 1); }
  bool fast(int64_t k) const { return geo[k].status == pm::kNormal && !geo[k].thin; }
  bool thin(int64_t k) const { return geo[k].status == pm::kNormal && geo[k].thin; }
};

// Raises the error of a batch index that is not an integer in [0, N) (the CUDA kernels raise the same).
void check_batch_index(const pm::RoiGeom& g, const double* roi, int64_t k, int64_t N) {
  TORCH_CHECK_VALUE(g.status != pm::kBadBatch, "prroi_pool: rois[", k, ", 0] (batch index) is ", roi[0],
                    "; it must be an integer in [0, ", N, ") for an input batch of ", N);
}

Geometry make_geometry(const at::Tensor& rois, int64_t N, int64_t H, int64_t W, int64_t PH, int64_t PW,
                       double scale) {
  Geometry g;
  const at::Tensor r = rois.to(at::kDouble).contiguous();
  const double* rp = r.data_ptr<double>();
  const int64_t K = r.size(0);
  g.K = K;
  g.PH = PH;
  g.PW = PW;
  g.geo.resize(K);
  g.xs.resize(K * (PW + 1));
  g.ys.resize(K * (PH + 1));
  g.of.resize(N);
  for (int64_t k = 0; k < K; ++k) {
    g.geo[k] = pm::roi_geometry(rp + k * 5, N, PH, PW, scale);
    check_batch_index(g.geo[k], rp + k * 5, k, N);
    g.of[g.geo[k].n].push_back(k);
  }
  at::parallel_for(0, K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (!g.fast(k)) continue;
      const pm::RoiGeom& e = g.geo[k];
      Line* xl = g.xs.data() + k * (PW + 1);
      Line* yl = g.ys.data() + k * (PH + 1);
      for (int64_t q = 0; q <= PW; ++q) xl[q] = make_line(pm::bin_edge(e.x1, e.x2, e.bw, q, PW), W);
      for (int64_t p = 0; p <= PH; ++p) yl[p] = make_line(pm::bin_edge(e.y1, e.y2, e.bh, p, PH), H);
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

// The bins of a thin RoI along both axes, in float64.
struct ThinBins {
  std::vector<pm::BinAxis<double>> xs, ys;  // [PW], [PH]
  ThinBins(const pm::RoiGeom& e, int64_t PH, int64_t PW, int64_t H, int64_t W) {
    for (int64_t q = 0; q < PW; ++q) xs.push_back(pm::bin_axis<double>(e.x1, e.x2, e.bw, q, PW, W));
    for (int64_t p = 0; p < PH; ++p) ys.push_back(pm::bin_axis<double>(e.y1, e.y2, e.bh, p, PH, H));
  }
};

struct Strides {
  int64_t n, c, h, w;
};

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

// ---- thin RoIs: summed directly in float64, out of line so the prefix-sum loops stay small ----

// Outputs of thin RoI `e` for channels [0, cb) of `in` (its first channel plane; strides s) into out[cb, PH, PW].
template <typename scalar_t>
__attribute__((noinline)) void thin_forward(const pm::RoiGeom& e, int64_t PH, int64_t PW, int64_t H, int64_t W,
                                            const scalar_t* in, Strides s, int64_t cb, scalar_t* out) {
  const ThinBins tb(e, PH, PW, H, W);
  for (int64_t c = 0; c < cb; ++c) {
    const scalar_t* plane = in + c * s.c;
    for (int64_t p = 0; p < PH; ++p)
      for (int64_t q = 0; q < PW; ++q) {
        const double v = pm::bin_integral<scalar_t, double>(plane, s.h, s.w, tb.xs[q].span, tb.ys[p].span);
        out[(c * PH + p) * PW + q] = static_cast<scalar_t>(v / e.area);
      }
  }
}

// Backward of thin RoI `e` for channels [0, cb) (grad: its [cb, PH, PW] output gradient): the input gradient as
// second differences in P space into GP[(H+1), (W+1), cb] (suffix-summed by the caller; null: not wanted), the box
// gradient (feature-map coordinates) added to d[4] when rois_grad.
template <typename scalar_t>
__attribute__((noinline)) void thin_backward(const pm::RoiGeom& e, int64_t PH, int64_t PW, int64_t H, int64_t W,
                                             const scalar_t* in, Strides s, const scalar_t* grad, int64_t cb,
                                             double* GP, bool rois_grad, double d[4]) {
  const ThinBins tb(e, PH, PW, H, W);
  const double inv_area = 1.0 / e.area;
  for (int64_t c = 0; c < cb; ++c) {
    const scalar_t* plane = in + c * s.c;
    for (int64_t p = 0; p < PH; ++p) {
      for (int64_t q = 0; q < PW; ++q) {
        const double gv = static_cast<double>(grad[(c * PH + p) * PW + q]);
        if (gv == 0) continue;
        const pm::Span<double>& sy = tb.ys[p].span;
        const pm::Span<double>& sx = tb.xs[q].span;
        if (GP != nullptr) {
          // a unit at F[j, i] is a second difference in P space
          const pm::XWeights<double> wx(sx);
          for (int64_t j = sy.first; j <= sy.last; ++j) {
            const double wy = pm::weight(sy, j) * gv * inv_area;
            if (wy == 0) continue;
            double* r0 = GP + j * (W + 1) * cb + c;
            double* r1 = r0 + (W + 1) * cb;
            for (int64_t i = sx.first; i <= sx.last; ++i) {
              const double v = wy * wx(i);
              r1[(i + 1) * cb] += v;
              r1[i * cb] -= v;
              r0[(i + 1) * cb] -= v;
              r0[i * cb] += v;
            }
          }
        }
        if (rois_grad) {  // the shared element body, in float64 (it recomputes the bin average)
          pm::box_grad_element<scalar_t, double>(tb.xs[q], tb.ys[p], e.area, 1.0 / e.w, 1.0 / e.h, plane, s.h, s.w,
                                                 H, W, gv, d);
        }
      }
    }
  }
}

void check_common(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW, double scale) {
  checks::check_arguments(input, rois, PH, PW, scale, /*cuda=*/false);
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
          const pm::RoiGeom& e = g.geo[k];
          if (g.thin(k)) {
            thin_forward(e, PH, PW, H, W, in + n * s.n + c0 * s.c, s, cb, ok);
            continue;
          }
          if (!g.fast(k)) {
            const scalar_t fill = e.status == pm::kNaN ? std::numeric_limits<scalar_t>::quiet_NaN() : scalar_t(0);
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
          const double inv_area = 1.0 / e.area;
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
  checks::check_backward(grad_, output_, input, rois, PH, PW);
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
          const pm::RoiGeom& e = g.geo[k];
          if (e.status == pm::kNaN) {
            if (rois_grad)
              for (int j = 0; j < 4; ++j) partial[(blk * K + k) * 4 + j] = std::numeric_limits<double>::quiet_NaN();
            continue;
          }
          if (g.thin(k)) {
            double d[4] = {0, 0, 0, 0};  // x1, y1, x2, y2
            thin_backward(e, PH, PW, H, W, in + n * s.n + c0 * s.c, s, go + (k * C + c0) * bins, cb,
                          input_grad ? GP.get() : nullptr, rois_grad, d);
            if (rois_grad)
              for (int j = 0; j < 4; ++j) partial[(blk * K + k) * 4 + j] = d[j];
            continue;
          }
          if (!g.fast(k)) continue;
          // dL/dS at every bin corner: +-dL/dout / area over the (up to 4) bins sharing the corner
          double* gsp = GS.get();
          std::fill(gsp, gsp + grid * cb, 0.0);
          const double inv_area = 1.0 / e.area;
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
            pr[0] = dx1 + dot_out / e.w;
            pr[1] = dy1 + dot_out / e.h;
            pr[2] = dx2 - dot_out / e.w;
            pr[3] = dy2 - dot_out / e.h;
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

// ---- the direct implementation: the CUDA kernels' element bodies in plain loops ----

void check_direct(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW, double scale) {
  checks::check_arguments(input, rois, PH, PW, scale, /*cuda=*/false);
  checks::check_floating(input, rois);
}

// What the CUDA geometry kernel computes, one RoI at a time (pm::roi_tables), plus the RoIs of each image.
template <typename acc_t>
struct DirectTables {
  std::vector<pm::RoiGeom> geo;
  std::vector<pm::RoiInfo<acc_t>> info;
  std::vector<pm::BinAxis<acc_t>> xs, ys;  // [K, PW], [K, PH]
  std::vector<std::vector<int64_t>> of;
  DirectTables(const at::Tensor& rois, int64_t N, int64_t H, int64_t W, int64_t PH, int64_t PW, double scale) {
    const at::Tensor r = rois.to(at::kDouble).contiguous();
    const double* rp = r.const_data_ptr<double>();
    const int64_t K = r.size(0);
    geo.resize(K);
    info.resize(K);
    xs.resize(K * PW);
    ys.resize(K * PH);
    of.resize(N);
    for (int64_t k = 0; k < K; ++k) {
      pm::roi_tables<acc_t>(rp + k * 5, N, H, W, PH, PW, scale, &geo[k], &info[k], &xs[k * PW], &ys[k * PH]);
      check_batch_index(geo[k], rp + k * 5, k, N);
      of[geo[k].n].push_back(k);
    }
  }
};

at::Tensor prroi_pool_direct_forward_cpu(const at::Tensor& input_, const at::Tensor& rois, int64_t PH, int64_t PW,
                                         double scale) {
  check_direct(input_, rois, PH, PW, scale);
  const at::Tensor input = input_.contiguous();  // as the CUDA kernel reads it
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = rois.size(0);
  at::Tensor out = at::empty({K, C, PH, PW}, input.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_direct_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DirectTables<acc_t> t(rois, N, H, W, PH, PW, scale);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 1024, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {  // the CUDA forward's grid-stride loop body
        const int64_t q = idx % PW, p = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
        const pm::RoiInfo<acc_t>& r = t.info[k];
        o[idx] = pm::forward_element<scalar_t, acc_t>(r, t.xs[k * PW + q], t.ys[k * PH + p],
                                                      in + (r.n * C + c) * H * W, W, 1);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_direct_backward_cpu(const at::Tensor& grad_, const at::Tensor& input_,
                                                                  const at::Tensor& rois, const at::Tensor& output,
                                                                  int64_t PH, int64_t PW, double scale,
                                                                  bool input_grad, bool rois_grad) {
  check_direct(input_, rois, PH, PW, scale);
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3), K = rois.size(0);
  checks::check_backward(grad_, output, input_, rois, PH, PW);
  const at::Tensor input = input_.contiguous();
  const at::Tensor grad = grad_.contiguous();
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_rois = at::empty({0}, rois.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_direct_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DirectTables<acc_t> t(rois, N, H, W, PH, PW, scale);
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t bins = PH * PW;
    if (input_grad) {
      // accumulated in acc_t as the CUDA atomics do; each (image, channel) plane belongs to one task, so the
      // CUDA kernel's atomic add is a plain one here (and the order is fixed)
      at::Tensor acc = at::zeros({N, C, H, W}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* a = acc.data_ptr<acc_t>();
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
          const int64_t n = nc / C, c = nc % C;
          for (const int64_t k : t.of[n])
            for (int64_t p = 0; p < PH; ++p)
              for (int64_t q = 0; q < PW; ++q) {
                const acc_t g = static_cast<acc_t>(go[(k * C + c) * bins + p * PW + q]);
                pm::input_grad_element<acc_t>(t.info[k], t.xs[k * PW + q], t.ys[k * PH + p], g, a + nc * H * W, W, 1,
                                              [](acc_t* dst, acc_t v) { *dst += v; });
              }
        }
      });
      grad_input = acc.scalar_type() == input.scalar_type() ? acc : acc.to(input.scalar_type());
    }
    if (rois_grad) {
      at::Tensor gr = at::zeros({K, 5}, rois.options().dtype(at::kDouble));
      double* grp = gr.data_ptr<double>();
      at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {  // the CUDA box-gradient block of RoI k, one thread
          const pm::RoiGeom& e = t.geo[k];
          const pm::RoiInfo<acc_t>& r = t.info[k];
          double d[4] = {0, 0, 0, 0};
          if (r.status == pm::kNormal) {
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t* plane = in + (r.n * C + c) * H * W;
              for (int64_t p = 0; p < PH; ++p)
                for (int64_t q = 0; q < PW; ++q) {
                  const scalar_t gv = go[(k * C + c) * bins + p * PW + q];
                  if (r.thin) {
                    pm::box_grad_element_f64<scalar_t>(e, p, q, PH, PW, plane, W, 1, H, W,
                                                       static_cast<double>(gv), d);
                  } else {
                    pm::box_grad_element<scalar_t, acc_t>(t.xs[k * PW + q], t.ys[k * PH + p], r.area, r.inv_w,
                                                          r.inv_h, plane, W, 1, H, W, static_cast<acc_t>(gv), d);
                  }
                }
            }
          }
          // the kernel works in feature-map coordinates (x * spatial_scale); an empty RoI gets 0, a NaN one NaN
          const double fill = r.status == pm::kEmpty ? 0.0 : NAN;
          for (int j = 0; j < 4; ++j) grp[k * 5 + 1 + j] = r.status == pm::kNormal ? d[j] * scale : fill;
        }
      });
      grad_rois = gr.to(rois.scalar_type());
    }
  });
  return {grad_input, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(iouctl, CPU, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cpu);
  m.impl("_prroi_pool_backward", &prroi_pool_backward_cpu);
  m.impl("_prroi_pool_direct", &prroi_pool_direct_forward_cpu);
  m.impl("_prroi_pool_direct_backward", &prroi_pool_direct_backward_cpu);
}
