// Precise RoI Pooling, CUDA kernels. The math is prroi_pool_math.h, shared with the CPU "direct" implementation
// (which runs these element bodies in loops, so CPU tests cover it); this file holds what is GPU-only: launch
// configuration, the atomics of the input gradient, the block reduction of the box gradient, streams.
//
// One thread per output bin: the exact bin integral summed over the cells the bin touches (weights = integrals of
// the bilinear hat, closed form), accumulated in float32 for half/bfloat16/float32 and float64 for float64. No
// prefix sums here: they would need float64 storage to avoid cancellation, and the direct sum is already cheap for
// proposal-sized bins on a GPU. The per-RoI geometry is computed once, in float64, by a small kernel (one thread per
// RoI) into tables the element kernels read; they do no float64 arithmetic (except the box gradient of RoIs with
// bins thinner than 1/64 cell, see the header).
// Current stream and a device guard; no synchronization, except that the forward reads one flag back to raise on a
// bad batch index (skipped while a CUDA graph is captured). The input gradient uses atomicAdd: under
// torch.use_deterministic_algorithms it raises (alertNotDeterministic), as torchvision's roi_align backward does.
// Includes avoid ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers that minimal toolkits lack.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_math.h"

namespace {

namespace pm = iouctl::prroi;
namespace checks = iouctl::prroi_checks;

constexpr int kThreads = 256;
static_assert(kThreads >= 32 && (kThreads & (kThreads - 1)) == 0,
              "the box-gradient block reduction halves kThreads down to 1");

// atomicAdd on the device; the host branch only exists so the functor can be passed to a __host__ __device__ body.
struct AtomicAdd {
  template <typename T>
  __host__ __device__ void operator()(T* dst, T v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(dst, v);
#else
    *dst += v;
#endif
  }
};

// Per-RoI geometry (pm::roi_tables); `bad` gets the smallest k whose batch index is invalid (initialized to K).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    roi_tables_kernel(const double* __restrict__ rois, int64_t K, int64_t N, int64_t H, int64_t W, int64_t PH,
                      int64_t PW, double scale, pm::RoiGeom* __restrict__ geo, pm::RoiInfo<acc_t>* __restrict__ info,
                      pm::BinAxis<acc_t>* __restrict__ xs, pm::BinAxis<acc_t>* __restrict__ ys,
                      unsigned long long* __restrict__ bad) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < K;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    pm::roi_tables<acc_t>(rois + k * 5, N, H, W, PH, PW, scale, geo + k, info + k, xs + k * PW, ys + k * PH);
    if (geo[k].status == pm::kBadBatch) atomicMin(bad, static_cast<unsigned long long>(k));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    prroi_forward_kernel(const scalar_t* __restrict__ in, const pm::RoiInfo<acc_t>* __restrict__ info,
                         const pm::BinAxis<acc_t>* __restrict__ xs, const pm::BinAxis<acc_t>* __restrict__ ys,
                         scalar_t* __restrict__ out, int64_t total, int64_t C, int64_t H, int64_t W, int64_t PH,
                         int64_t PW) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % PW, p = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
    const pm::RoiInfo<acc_t> r = info[k];
    out[idx] = pm::forward_element<scalar_t, acc_t>(r, xs[k * PW + q], ys[k * PH + p], in + (r.n * C + c) * H * W,
                                                    W, 1);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    prroi_backward_input_kernel(const scalar_t* __restrict__ grad, const pm::RoiInfo<acc_t>* __restrict__ info,
                                const pm::BinAxis<acc_t>* __restrict__ xs, const pm::BinAxis<acc_t>* __restrict__ ys,
                                acc_t* __restrict__ grad_in, int64_t total, int64_t C, int64_t H, int64_t W,
                                int64_t PH, int64_t PW) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx % PW, p = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
    const pm::RoiInfo<acc_t> r = info[k];
    pm::input_grad_element<acc_t>(r, xs[k * PW + q], ys[k * PH + p], static_cast<acc_t>(grad[idx]),
                                  grad_in + (r.n * C + c) * H * W, W, 1, AtomicAdd{});
  }
}

// One block per RoI: each thread sums the box gradient over some (channel, bin)s in float64, then a block reduction
// writes the RoI's row (deterministic, no atomics).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    prroi_backward_rois_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ in,
                               const pm::RoiGeom* __restrict__ geo, const pm::RoiInfo<acc_t>* __restrict__ info,
                               const pm::BinAxis<acc_t>* __restrict__ xs, const pm::BinAxis<acc_t>* __restrict__ ys,
                               double* __restrict__ grad_rois, int64_t C, int64_t H, int64_t W, int64_t PH,
                               int64_t PW, double scale) {
  __shared__ double red[4][kThreads];
  const int64_t k = blockIdx.x;
  const int t = threadIdx.x;
  const pm::RoiInfo<acc_t> r = info[k];
  if (r.status != pm::kNormal) {  // uniform over the block: no thread reaches the __syncthreads below
    if (t < 4) grad_rois[k * 5 + 1 + t] = r.status == pm::kEmpty ? 0.0 : static_cast<double>(NAN);
    return;
  }
  double d[4] = {0, 0, 0, 0};  // x1, y1, x2, y2
  const int64_t per_roi = C * PH * PW;
  for (int64_t e = t; e < per_roi; e += kThreads) {
    const int64_t q = e % PW, p = (e / PW) % PH, c = e / (PW * PH);
    const scalar_t gv = grad[k * per_roi + e];
    const scalar_t* plane = in + (r.n * C + c) * H * W;
    if (r.thin) {  // per RoI, so uniform over the block
      pm::box_grad_element_f64<scalar_t>(geo[k], p, q, PH, PW, plane, W, 1, H, W, static_cast<double>(gv), d);
    } else {
      pm::box_grad_element<scalar_t, acc_t>(xs[k * PW + q], ys[k * PH + p], r.area, r.inv_w, r.inv_h, plane, W, 1,
                                            H, W, static_cast<acc_t>(gv), d);
    }
  }
  for (int j = 0; j < 4; ++j) red[j][t] = d[j];
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s)
      for (int j = 0; j < 4; ++j) red[j][t] += red[j][t + s];
    __syncthreads();
  }
  // the kernel works in feature-map coordinates (x * spatial_scale)
  if (t < 4) grad_rois[k * 5 + 1 + t] = red[t][0] * scale;
}

void check_cuda(const at::Tensor& input, const at::Tensor& rois, int64_t PH, int64_t PW, double scale) {
  checks::check_arguments(input, rois, PH, PW, scale, /*cuda=*/true);
  checks::check_floating(input, rois);
}

int64_t blocks_for(int64_t total) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t cap = static_cast<int64_t>(sms) * 64;  // grid-stride loops cover the rest
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, cap));
}

// The per-RoI tables in one device allocation, filled by roi_tables_kernel on the current stream.
template <typename acc_t>
struct Tables {
  at::Tensor storage, bad;
  pm::RoiGeom* geo = nullptr;
  pm::RoiInfo<acc_t>* info = nullptr;
  pm::BinAxis<acc_t>* xs = nullptr;
  pm::BinAxis<acc_t>* ys = nullptr;

  Tables(const at::Tensor& rois, int64_t N, int64_t H, int64_t W, int64_t PH, int64_t PW, double scale,
         cudaStream_t stream) {
    const int64_t K = rois.size(0);
    auto aligned = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
    const int64_t g_bytes = aligned(K * static_cast<int64_t>(sizeof(pm::RoiGeom)));
    const int64_t i_bytes = aligned(K * static_cast<int64_t>(sizeof(pm::RoiInfo<acc_t>)));
    const int64_t x_bytes = aligned(K * PW * static_cast<int64_t>(sizeof(pm::BinAxis<acc_t>)));
    const int64_t y_bytes = aligned(K * PH * static_cast<int64_t>(sizeof(pm::BinAxis<acc_t>)));
    storage = at::empty({std::max<int64_t>(g_bytes + i_bytes + x_bytes + y_bytes, 1)},
                        rois.options().dtype(at::kByte));
    uint8_t* base = storage.data_ptr<uint8_t>();
    geo = reinterpret_cast<pm::RoiGeom*>(base);
    info = reinterpret_cast<pm::RoiInfo<acc_t>*>(base + g_bytes);
    xs = reinterpret_cast<pm::BinAxis<acc_t>*>(base + g_bytes + i_bytes);
    ys = reinterpret_cast<pm::BinAxis<acc_t>*>(base + g_bytes + i_bytes + x_bytes);
    bad = at::full({1}, K, rois.options().dtype(at::kLong));
    if (K == 0) return;
    roi_tables_kernel<acc_t><<<blocks_for(K), kThreads, 0, stream>>>(
        rois.const_data_ptr<double>(), K, N, H, W, PH, PW, scale, geo, info, xs, ys,
        reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Raises the CPU kernel's error for a bad batch index: one read-back of `bad` (none while a graph is captured,
  // where the RoI's outputs are NaN instead).
  void check_batch_indices(const at::Tensor& rois, int64_t N) const {
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
    const int64_t k = bad.item<int64_t>();
    if (k >= rois.size(0)) return;
    TORCH_CHECK_VALUE(false, "prroi_pool: rois[", k, ", 0] (batch index) is ", rois[k][0].item<double>(),
                      "; it must be an integer in [0, ", N, ") for an input batch of ", N);
  }
};

at::Tensor prroi_pool_forward_cuda(const at::Tensor& input_, const at::Tensor& rois_, int64_t PH, int64_t PW,
                                   double scale) {
  check_cuda(input_, rois_, PH, PW, scale);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.to(at::kDouble).contiguous();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = rois.size(0);
  at::Tensor out = at::empty({K, C, PH, PW}, input.options().memory_format(at::MemoryFormat::Contiguous));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tables<acc_t> t(rois, N, H, W, PH, PW, scale, stream);
    t.check_batch_indices(rois, N);
    const int64_t total = out.numel();
    if (total == 0) return;
    prroi_forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), t.info, t.xs, t.ys, out.data_ptr<scalar_t>(), total, C, H, W, PH, PW);
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
  checks::check_backward(grad_, output_, input_, rois_, PH, PW);
  if (input_grad) at::globalContext().alertNotDeterministic("prroi_pool_backward_cuda (input gradient, atomicAdd)");
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.to(at::kDouble).contiguous();
  const at::Tensor grad = grad_.contiguous();
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_rois = at::empty({0}, rois_.options());
  const int64_t total = grad.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tables<acc_t> t(rois, N, H, W, PH, PW, scale, stream);  // the forward already checked batch indices
    if (input_grad) {
      // atomics accumulate in acc_t (float for half/bfloat16), converted once at the end
      at::Tensor acc = at::zeros({N, C, H, W}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (total > 0) {
        prroi_backward_input_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), t.info, t.xs, t.ys, acc.data_ptr<acc_t>(), total, C, H, W, PH, PW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_input = acc.scalar_type() == input.scalar_type() ? acc : acc.to(input.scalar_type());
    }
    if (rois_grad) {
      at::Tensor gr = at::zeros({K, 5}, rois.options());
      if (K > 0 && C > 0) {
        prroi_backward_rois_kernel<scalar_t, acc_t><<<K, kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), t.geo, t.info, t.xs, t.ys,
            gr.data_ptr<double>(), C, H, W, PH, PW, scale);
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
