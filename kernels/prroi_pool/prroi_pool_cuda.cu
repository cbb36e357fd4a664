// Precise RoI Pooling, CUDA kernels: one thread per output bin, exact bin integral summed over the cells the bin
// touches (weights = integrals of the bilinear hat over the bin, in closed form), float32 accumulation for
// half/bfloat16/float32 and float64 for float64. No prefix sums here: they would need float64 storage to avoid
// cancellation, and the direct sum is already cheap for proposal-sized bins on a GPU.
// Geometry (box, bin edges) is computed in float64 and handed to the accumulation as offsets within a cell, so
// float32 never subtracts two large coordinates. Current stream and a device guard; no synchronization.
// Includes avoid ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers that minimal toolkits lack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int kThreads = 256;

// A RoI in feature-map coordinates. valid: 1 normal, 0 empty (zero/infinite area: outputs 0), -1 NaN/bad batch.
struct RoiGeom {
  int64_t n;
  int valid;
  double x1, y1, x2, y2, bw, bh, area;
};

__device__ __forceinline__ RoiGeom roi_geom(const double* r, int64_t N, int64_t PH, int64_t PW, double scale) {
  RoiGeom g;
  const double b = r[0];
  g.n = 0;
  g.valid = -1;
  g.x1 = r[1] * scale;
  g.y1 = r[2] * scale;
  g.x2 = r[3] * scale;
  g.y2 = r[4] * scale;
  g.bw = g.bh = g.area = 0;
  // the batch index is not checked on the host (that would synchronize): a bad one yields NaN, never a bad read
  if (!(b >= 0 && b < static_cast<double>(N) && b == floor(b))) return g;
  g.n = static_cast<int64_t>(b);
  const double w = g.x2 - g.x1, h = g.y2 - g.y1;
  if (isnan(w) || isnan(h)) return g;
  g.bw = w / PW;
  g.bh = h / PH;
  g.area = g.bw * g.bh;
  g.valid = (w > 0 && h > 0 && isfinite(g.area) && g.area > 0) ? 1 : 0;
  return g;
}

// Bin edges along one axis, clamped to [-1, size] (f is 0 beyond, so the integral is unchanged), kept as
// first/last touched cells plus the edges' offsets from cell `first` (small numbers, exact in float).
template <typename acc_t>
struct Span {
  int64_t first, last;  // cells [first, last] ∩ [0, size) may have nonzero weight
  int64_t origin;       // floor of the clamped low edge
  acc_t lo, hi;         // edges minus origin
};

template <typename acc_t>
__device__ __forceinline__ Span<acc_t> make_span(double e1, double e2, int64_t size) {
  e1 = fmin(fmax(e1, -1.0), static_cast<double>(size));
  e2 = fmin(fmax(e2, -1.0), static_cast<double>(size));
  Span<acc_t> s;
  const double o = floor(e1);
  s.origin = static_cast<int64_t>(o);
  s.first = s.origin < 0 ? 0 : s.origin;
  const int64_t top = static_cast<int64_t>(ceil(e2));
  s.last = top > size - 1 ? size - 1 : top;
  s.lo = static_cast<acc_t>(e1 - o);
  s.hi = static_cast<acc_t>(e2 - o);
  return s;
}

// Integral of the hat max(0, 1 - |t|) over [a, b] (a <= b), without subtracting two antiderivative values.
template <typename acc_t>
__device__ __forceinline__ acc_t hat_integral(acc_t a, acc_t b) {
  acc_t v = 0;
  acc_t lo = a > acc_t(-1) ? a : acc_t(-1), hi = b < acc_t(0) ? b : acc_t(0);
  if (hi > lo) v += (hi - lo) * (acc_t(1) + acc_t(0.5) * (hi + lo));
  lo = a > acc_t(0) ? a : acc_t(0);
  hi = b < acc_t(1) ? b : acc_t(1);
  if (hi > lo) v += (hi - lo) * (acc_t(1) - acc_t(0.5) * (hi + lo));
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t weight(const Span<acc_t>& s, int64_t i) {
  const acc_t d = static_cast<acc_t>(i - s.origin);
  return hat_integral<acc_t>(s.lo - d, s.hi - d);
}

// Column weights of a bin, computed once per thread instead of once per row (cached up to kCached columns;
// wider bins, rare for proposals, recompute them).
constexpr int kCached = 16;

template <typename acc_t>
struct XWeights {
  const Span<acc_t>& s;
  acc_t w[kCached];
  bool cached;
  __device__ explicit XWeights(const Span<acc_t>& span) : s(span), cached(span.last - span.first < kCached) {
    if (cached)
      for (int64_t i = s.first; i <= s.last; ++i) w[i - s.first] = weight(s, i);
  }
  __device__ __forceinline__ acc_t operator()(int64_t i) const { return cached ? w[i - s.first] : weight(s, i); }
};

// Bin edge e of bin t (0..bins) along an axis from lo with step; the last edge is the box edge itself.
__device__ __forceinline__ double edge(double lo, double hi, double step, int64_t t, int64_t bins) {
  return t == bins ? hi : lo + static_cast<double>(t) * step;
}

template <typename scalar_t>
__global__ void prroi_forward_kernel(const scalar_t* __restrict__ in, const double* __restrict__ rois,
                                     scalar_t* __restrict__ out, int64_t total, int64_t N, int64_t C, int64_t H,
                                     int64_t W, int64_t PH, int64_t PW, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % PW, p = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
    const RoiGeom g = roi_geom(rois + k * 5, N, PH, PW, scale);
    if (g.valid != 1) {
      out[idx] = static_cast<scalar_t>(g.valid == 0 ? acc_t(0) : static_cast<acc_t>(NAN));
      continue;
    }
    const Span<acc_t> sx = make_span<acc_t>(edge(g.x1, g.x2, g.bw, q, PW), edge(g.x1, g.x2, g.bw, q + 1, PW), W);
    const Span<acc_t> sy = make_span<acc_t>(edge(g.y1, g.y2, g.bh, p, PH), edge(g.y1, g.y2, g.bh, p + 1, PH), H);
    const scalar_t* plane = in + (g.n * C + c) * H * W;
    const XWeights<acc_t> wx(sx);
    acc_t sum = 0;
    for (int64_t j = sy.first; j <= sy.last; ++j) {
      const acc_t wy = weight(sy, j);
      if (wy == acc_t(0)) continue;
      acc_t row = 0;
      for (int64_t i = sx.first; i <= sx.last; ++i) row += wx(i) * static_cast<acc_t>(plane[j * W + i]);
      sum += wy * row;
    }
    out[idx] = static_cast<scalar_t>(sum / static_cast<acc_t>(g.area));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void prroi_backward_input_kernel(const scalar_t* __restrict__ grad, const double* __restrict__ rois,
                                            acc_t* __restrict__ grad_in, int64_t total, int64_t N, int64_t C,
                                            int64_t H, int64_t W, int64_t PH, int64_t PW, double scale) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % PW, p = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
    const RoiGeom g = roi_geom(rois + k * 5, N, PH, PW, scale);
    if (g.valid != 1) continue;
    const acc_t gv = static_cast<acc_t>(grad[idx]) / static_cast<acc_t>(g.area);
    if (gv == acc_t(0)) continue;
    const Span<acc_t> sx = make_span<acc_t>(edge(g.x1, g.x2, g.bw, q, PW), edge(g.x1, g.x2, g.bw, q + 1, PW), W);
    const Span<acc_t> sy = make_span<acc_t>(edge(g.y1, g.y2, g.bh, p, PH), edge(g.y1, g.y2, g.bh, p + 1, PH), H);
    acc_t* plane = grad_in + (g.n * C + c) * H * W;
    const XWeights<acc_t> wx(sx);
    for (int64_t j = sy.first; j <= sy.last; ++j) {
      const acc_t wy = weight(sy, j) * gv;
      if (wy == acc_t(0)) continue;
      for (int64_t i = sx.first; i <= sx.last; ++i) {
        const acc_t v = wy * wx(i);
        if (v != acc_t(0)) atomicAdd(plane + j * W + i, v);
      }
    }
  }
}

// Integral of f along y over the bin's rows (span sy) at the vertical line x = e: d(bin integral)/d(edge e).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t line_x(const scalar_t* plane, const Span<acc_t>& sy, double e, int64_t W) {
  e = fmin(fmax(e, -1.0), static_cast<double>(W));  // f(e, .) = 0 at and beyond -1 and W
  const double o = floor(e);
  const int64_t i0 = static_cast<int64_t>(o);
  const acc_t t = static_cast<acc_t>(e - o);  // hat weights: (1 - t) on column i0, t on column i0 + 1
  acc_t sum = 0;
  for (int64_t j = sy.first; j <= sy.last; ++j) {
    const acc_t wy = weight(sy, j);
    acc_t v = 0;
    if (i0 >= 0 && i0 < W) v += (acc_t(1) - t) * static_cast<acc_t>(plane[j * W + i0]);
    if (i0 + 1 >= 0 && i0 + 1 < W) v += t * static_cast<acc_t>(plane[j * W + i0 + 1]);
    sum += wy * v;
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t line_y(const scalar_t* plane, const Span<acc_t>& sx, double e, int64_t H,
                                        int64_t W) {
  e = fmin(fmax(e, -1.0), static_cast<double>(H));
  const double o = floor(e);
  const int64_t j0 = static_cast<int64_t>(o);
  const acc_t t = static_cast<acc_t>(e - o);
  acc_t sum = 0;
  for (int64_t i = sx.first; i <= sx.last; ++i) {
    const acc_t wx = weight(sx, i);
    acc_t v = 0;
    if (j0 >= 0 && j0 < H) v += (acc_t(1) - t) * static_cast<acc_t>(plane[j0 * W + i]);
    if (j0 + 1 >= 0 && j0 + 1 < H) v += t * static_cast<acc_t>(plane[(j0 + 1) * W + i]);
    sum += wx * v;
  }
  return sum;
}

// One block per RoI: each thread sums the box-coordinate gradient over some (channel, bin)s, then a block
// reduction writes the RoI's row (deterministic, no atomics).
template <typename scalar_t>
__global__ void prroi_backward_rois_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ in,
                                           const scalar_t* __restrict__ out, const double* __restrict__ rois,
                                           double* __restrict__ grad_rois, int64_t N, int64_t C, int64_t H,
                                           int64_t W, int64_t PH, int64_t PW, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[4][kThreads];
  const int64_t k = blockIdx.x;
  const RoiGeom g = roi_geom(rois + k * 5, N, PH, PW, scale);
  if (g.valid != 1) {  // uniform over the block: no thread reaches the __syncthreads below
    if (threadIdx.x < 4) grad_rois[k * 5 + 1 + threadIdx.x] = g.valid == 0 ? 0.0 : static_cast<double>(NAN);
    return;
  }
  const acc_t inv_area = acc_t(1) / static_cast<acc_t>(g.area);
  const acc_t inv_w = acc_t(1) / static_cast<acc_t>(g.x2 - g.x1), inv_h = acc_t(1) / static_cast<acc_t>(g.y2 - g.y1);
  acc_t d[4] = {0, 0, 0, 0};  // x1, y1, x2, y2
  const int64_t per_roi = C * PH * PW;
  for (int64_t r = threadIdx.x; r < per_roi; r += blockDim.x) {
    const int64_t q = r % PW, p = (r / PW) % PH, c = r / (PW * PH);
    const int64_t idx = k * per_roi + r;
    const acc_t gv = static_cast<acc_t>(grad[idx]);
    if (gv == acc_t(0)) continue;
    const double ex1 = edge(g.x1, g.x2, g.bw, q, PW), ex2 = edge(g.x1, g.x2, g.bw, q + 1, PW);
    const double ey1 = edge(g.y1, g.y2, g.bh, p, PH), ey2 = edge(g.y1, g.y2, g.bh, p + 1, PH);
    const Span<acc_t> sx = make_span<acc_t>(ex1, ex2, W);
    const Span<acc_t> sy = make_span<acc_t>(ey1, ey2, H);
    const scalar_t* plane = in + (g.n * C + c) * H * W;
    const acc_t lx1 = line_x(plane, sy, ex1, W), lx2 = line_x(plane, sy, ex2, W);
    const acc_t ly1 = line_y(plane, sx, ey1, H, W), ly2 = line_y(plane, sx, ey2, H, W);
    const acc_t o = static_cast<acc_t>(out[idx]);
    // edge q sits at x1 + q/PW (x2 - x1); out = integral / (w h / (PH PW)) so d out / d w = -out / w
    const acc_t fq0 = static_cast<acc_t>(q) / PW, fq1 = static_cast<acc_t>(q + 1) / PW;
    const acc_t fp0 = static_cast<acc_t>(p) / PH, fp1 = static_cast<acc_t>(p + 1) / PH;
    d[0] += gv * ((lx2 * (acc_t(1) - fq1) - lx1 * (acc_t(1) - fq0)) * inv_area + o * inv_w);
    d[2] += gv * ((lx2 * fq1 - lx1 * fq0) * inv_area - o * inv_w);
    d[1] += gv * ((ly2 * (acc_t(1) - fp1) - ly1 * (acc_t(1) - fp0)) * inv_area + o * inv_h);
    d[3] += gv * ((ly2 * fp1 - ly1 * fp0) * inv_area - o * inv_h);
  }
  for (int j = 0; j < 4; ++j) red[j][threadIdx.x] = d[j];
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s)
      for (int j = 0; j < 4; ++j) red[j][threadIdx.x] += red[j][threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x < 4) grad_rois[k * 5 + 1 + threadIdx.x] = static_cast<double>(red[threadIdx.x][0]) * scale;
}

void check_cuda(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW, double scale) {
  TORCH_CHECK_VALUE(input.dim() == 4, "prroi_pool: input must be [N, C, H, W]; got shape ", input.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "prroi_pool: rois must be [K, 5] (batch index, x1, y1, x2, y2); got shape ", rois.sizes());
  TORCH_CHECK_VALUE(input.is_cuda() && rois.device() == input.device(), "prroi_pool: input is on ", input.device(),
                    " but rois on ", rois.device(), "; both must be on one CUDA device");
  TORCH_CHECK_VALUE(PH > 0 && PW > 0, "prroi_pool: output size must be positive; got (", PH, ", ", PW, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "prroi_pool: spatial_scale must be finite and > 0; got ",
                    scale);
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()) && at::isFloatingType(rois.scalar_type()),
                    "prroi_pool: input and rois must be floating point; got ", input.scalar_type(), " and ",
                    rois.scalar_type());
}

int64_t blocks_for(int64_t total) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 64;  // grid-stride loops cover the rest
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, cap));
}

at::Tensor prroi_pool_forward_cuda(const at::Tensor& input_, const at::Tensor& rois_, int64_t PH, int64_t PW,
                                   double scale) {
  check_cuda(input_, rois_, PH, PW, scale);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.to(at::kDouble).contiguous();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = rois.size(0);
  at::Tensor out = at::empty({K, C, PH, PW}, input.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_forward_cuda", [&] {
    prroi_forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), rois.const_data_ptr<double>(), out.data_ptr<scalar_t>(), total, N, C, H,
        W, PH, PW, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_backward_cuda(const at::Tensor& grad_, const at::Tensor& input_,
                                                            const at::Tensor& rois_, const at::Tensor& output_,
                                                            int64_t PH, int64_t PW, double scale, bool input_grad,
                                                            bool rois_grad) {
  check_cuda(input_, rois_, PH, PW, scale);
  const c10::cuda::CUDAGuard guard(input_.device());
  const int64_t N = input_.size(0), C = input_.size(1), H = input_.size(2), W = input_.size(3), K = rois_.size(0);
  TORCH_CHECK_VALUE(grad_.sizes() == at::IntArrayRef({K, C, PH, PW}) && output_.sizes() == grad_.sizes(),
                    "prroi_pool backward: grad and output must be [K, C, PH, PW] = [", K, ", ", C, ", ", PH, ", ",
                    PW, "]; got ", grad_.sizes(), " and ", output_.sizes());
  TORCH_CHECK_VALUE(grad_.scalar_type() == input_.scalar_type() && output_.scalar_type() == input_.scalar_type(),
                    "prroi_pool backward: grad and output must have the input's dtype ", input_.scalar_type());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.to(at::kDouble).contiguous();
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor output = output_.contiguous();
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_rois = at::empty({0}, rois_.options());
  const int64_t total = grad.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (input_grad) {
      // atomics accumulate in acc_t (float for half/bfloat16), converted once at the end
      at::Tensor acc = at::zeros({N, C, H, W}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (total > 0) {
        prroi_backward_input_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), rois.const_data_ptr<double>(), acc.data_ptr<acc_t>(), total, N, C, H,
            W, PH, PW, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_input = acc.scalar_type() == input.scalar_type() ? acc : acc.to(input.scalar_type());
    }
    if (rois_grad) {
      at::Tensor gr = at::zeros({K, 5}, rois.options());
      if (K > 0 && C > 0) {
        prroi_backward_rois_kernel<scalar_t><<<K, kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), output.const_data_ptr<scalar_t>(),
            rois.const_data_ptr<double>(), gr.data_ptr<double>(), N, C, H, W, PH, PW, scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_rois = gr.to(rois_.scalar_type());
    }
  });
  return {grad_input, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(iouctl, CUDA, m) {
  m.impl("prroi_pool", &prroi_pool_forward_cuda);
  m.impl("_prroi_pool_backward", &prroi_pool_backward_cuda);
}
