// CUDA kernels of the NMS family. The IoU and the suppression rule are nms_math.h (shared with the CPU kernels; on
// the device every operation is a round-to-nearest intrinsic), so the GPU keeps bit for bit what the CPU keeps.
//
// Greedy / IoU-guided NMS, per class: boxes are sorted on the GPU by (class, decreasing rank, index) with two stable
// sorts, so each class is one contiguous segment; one thread block runs the greedy scan of one segment (blocks take
// segments in turn). The scan keeps the segment's first live box i, and the block's threads test every later box j
// of the segment against it in parallel: a live j with IoU > threshold is suppressed and joins i's cluster (IoU-Net
// Alg. 1: its score raises i's cluster score); the smallest j still alive is the next kept box, found by the same
// block reduction that takes the cluster maximum. Cost: the sum over classes of kept x segment size, with no N x N
// mask, no size limit and no host round trip; the one device-to-host read is the number of kept boxes (the output
// size is data-dependent), as in torchvision. Deterministic: no atomics, fixed reduction order.
// Soft-NMS (serial and data-dependent throughout) runs the CPU kernel on host copies.
// Checks: nms_checks.h, the CPU kernels' own. NaN ranks are not looked for here (a device-to-host read): the Python
// wrappers raise on them; through torch.ops directly they sort as torch.sort sorts NaN.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "nms/nms_checks.h"
#include "nms/nms_math.h"

namespace {

namespace checks = iouctl::nms_checks;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "the block reduction works warp by warp");

// Segment starts of the sorted categories: starts[s] = first position of segment s, starts[nseg] = n; nseg[0] = the
// number of segments. seg_id is the inclusive prefix sum of the "new segment" flags (so seg_id[p] - 1 is p's segment).
__global__ void __launch_bounds__(kThreads)
    segment_starts_kernel(int64_t n, const int64_t* __restrict__ cat, const int64_t* __restrict__ seg_id,
                          int64_t* __restrict__ starts, int64_t* __restrict__ nseg) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool first = p == 0 || (cat != nullptr && cat[p] != cat[p - 1]);
    if (first) starts[seg_id[p] - 1] = p;
    if (p == n - 1) {
      starts[seg_id[p]] = n;
      nseg[0] = seg_id[p];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    first_flags_kernel(int64_t n, const int64_t* __restrict__ cat, int64_t* __restrict__ flag) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    flag[p] = (p == 0 || (cat != nullptr && cat[p] != cat[p - 1])) ? 1 : 0;
  }
}

// The greedy scan of each segment (see the top of the file). Boxes are sorted, as structure-of-arrays x1, y1, x2, y2
// (area computed here with the shared math); cls: the sorted classification scores in float64.
// Out: kept[p] = 1 for a kept position, best[p] = its cluster score (max of cls over the boxes it suppressed, itself
// included).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    greedy_segments_kernel(const T* __restrict__ box, const double* __restrict__ cls,
                           const int64_t* __restrict__ starts, const int64_t* __restrict__ nseg, T thr,
                           T* __restrict__ area, int32_t* __restrict__ owner, uint8_t* __restrict__ kept,
                           double* __restrict__ best) {
  // double-buffered per-warp partials: one __syncthreads per kept box (the buffer written next was last read before
  // the previous barrier)
  __shared__ int64_t warp_next[2][kWarps];
  __shared__ double warp_best[2][kWarps];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t count = nseg[0];
  for (int64_t s = blockIdx.x; s < count; s += gridDim.x) {
    const int64_t a = starts[s], b = starts[s + 1];
    for (int64_t j = a + t; j < b; j += kThreads) {
      area[j] = iouctl::box_area<T>(box[4 * j], box[4 * j + 1], box[4 * j + 2], box[4 * j + 3]);
      owner[j] = -1;
      kept[j] = 0;
    }
    __syncthreads();
    int buf = 0;
    int64_t i = a;  // the segment's first box has the top rank: always kept
    while (i < b) {
      const T ix1 = box[4 * i], iy1 = box[4 * i + 1], ix2 = box[4 * i + 2], iy2 = box[4 * i + 3], ia = area[i];
      int64_t next = b;  // smallest j > i still alive after this pass
      double top = cls[i];
      for (int64_t j = i + 1 + t; j < b; j += kThreads) {
        if (owner[j] >= 0) continue;
        const T o = iouctl::box_iou<T>(ix1, iy1, ix2, iy2, ia, box[4 * j], box[4 * j + 1], box[4 * j + 2],
                                       box[4 * j + 3], area[j]);
        if (iouctl::suppresses<T>(o, thr)) {
          owner[j] = static_cast<int32_t>(i - a);
          top = fmax(top, cls[j]);
        } else if (j < next) {
          next = j;
        }
      }
      for (int off = 16; off > 0; off >>= 1) {
        const int64_t on = __shfl_down_sync(0xffffffffu, next, off);
        const double ot = __shfl_down_sync(0xffffffffu, top, off);
        next = on < next ? on : next;
        top = fmax(top, ot);
      }
      if (lane == 0) {
        warp_next[buf][warp] = next;
        warp_best[buf][warp] = top;
      }
      __syncthreads();
      next = b;
      top = cls[i];
      for (int w = 0; w < kWarps; ++w) {  // every thread reduces the partials in the same order: same result
        next = warp_next[buf][w] < next ? warp_next[buf][w] : next;
        top = fmax(top, warp_best[buf][w]);
      }
      if (t == 0) {
        owner[i] = static_cast<int32_t>(i - a);
        kept[i] = 1;
        best[i] = top;
      }
      buf ^= 1;
      i = next;
    }
    __syncthreads();  // before the next segment's initialization reuses nothing shared, but keeps blocks in step
  }
}

int64_t blocks_for(int64_t work, int64_t per_sm) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(work, static_cast<int64_t>(sms) * per_sm));
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> iou_guided_cuda_impl(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor* idxs,
    double iou_threshold) {
  const int64_t n = boxes.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::TensorOptions longs = boxes.options().dtype(at::kLong);
  // positions in (category, decreasing rank, index) order: a stable sort by rank, then a stable sort by category
  const at::Tensor by_rank = std::get<1>(ious.to(at::kDouble).sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  at::Tensor order = by_rank, cat;
  if (idxs != nullptr) {
    const at::Tensor cat_by_rank = idxs->to(at::kLong).index_select(0, by_rank);
    const at::Tensor by_cat = std::get<1>(cat_by_rank.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    order = by_rank.index_select(0, by_cat);
    cat = cat_by_rank.index_select(0, by_cat).contiguous();
  }
  const at::Tensor sboxes = boxes.to(c10::CppTypeToScalarType<T>::value).index_select(0, order).contiguous();
  const at::Tensor cls = scores.to(at::kDouble).index_select(0, order).contiguous();
  const int64_t* cat_p = idxs != nullptr ? cat.const_data_ptr<int64_t>() : nullptr;

  at::Tensor flag = at::empty({n}, longs);
  first_flags_kernel<<<blocks_for((n + kThreads - 1) / kThreads, 8), kThreads, 0, stream>>>(n, cat_p,
                                                                                           flag.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor seg_id = flag.cumsum(0);
  at::Tensor starts = at::empty({n + 1}, longs), nseg = at::empty({1}, longs);
  segment_starts_kernel<<<blocks_for((n + kThreads - 1) / kThreads, 8), kThreads, 0, stream>>>(
      n, cat_p, seg_id.const_data_ptr<int64_t>(), starts.data_ptr<int64_t>(), nseg.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor area = at::empty({n}, sboxes.options());
  at::Tensor owner = at::empty({n}, boxes.options().dtype(at::kInt));
  at::Tensor kept = at::empty({n}, boxes.options().dtype(at::kByte));
  at::Tensor best = at::empty({n}, cls.options());
  // the number of segments is on the device: launch enough blocks for the busy case, idle ones exit at once
  greedy_segments_kernel<T><<<blocks_for(n, 4), kThreads, 0, stream>>>(
      sboxes.const_data_ptr<T>(), cls.const_data_ptr<double>(), starts.const_data_ptr<int64_t>(),
      nseg.const_data_ptr<int64_t>(), iouctl::threshold_as<T>(iou_threshold), area.data_ptr<T>(),
      owner.data_ptr<int32_t>(), kept.data_ptr<uint8_t>(), best.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Output in decreasing rank, ties by index, over all categories (torchvision's batched_nms order): the by_rank
  // order, filtered. The boolean index is the one device-to-host read (the number of kept boxes).
  at::Tensor kept_by_index = at::zeros({n}, kept.options()).index_put_({order}, kept);
  at::Tensor best_by_index = at::empty({n}, best.options()).index_put_({order}, best);
  const at::Tensor keep = by_rank.index({kept_by_index.index_select(0, by_rank).to(at::kBool)});
  return {keep, best_by_index.index_select(0, keep).to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> iou_guided_cuda_dispatch(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor* idxs,
    double iou_threshold) {
  checks::check_iou_guided(boxes, scores, ious, idxs, iou_threshold);
  const c10::cuda::CUDAGuard guard(boxes.device());
  if (boxes.size(0) == 0) {
    return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
  }
  if (checks::compute_type(boxes) == at::kDouble) {
    return iou_guided_cuda_impl<double>(boxes, scores, ious, idxs, iou_threshold);
  }
  return iou_guided_cuda_impl<float>(boxes, scores, ious, idxs, iou_threshold);
}

using IoUGuidedCuda = checks::IoUGuidedOps<iou_guided_cuda_dispatch>;

std::tuple<at::Tensor, at::Tensor> to_device(const std::tuple<at::Tensor, at::Tensor>& r, const at::Device& d) {
  return {std::get<0>(r).to(d), std::get<1>(r).to(d)};
}

// Soft-NMS: the CPU kernel on host copies (see the top of the file), after the same checks.
std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, c10::string_view method, double sigma, double iou_threshold,
    double score_threshold) {
  checks::check_boxes(boxes);
  checks::check_vector(scores, "scores", boxes, true);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iouctl::soft_nms", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 c10::string_view, double, double, double)>();
  return to_device(op.call(boxes.cpu(), scores.cpu(), method, sigma, iou_threshold, score_threshold), boxes.device());
}

std::tuple<at::Tensor, at::Tensor> batched_soft_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs, c10::string_view method, double sigma,
    double iou_threshold, double score_threshold) {
  checks::check_boxes(boxes);
  checks::check_vector(scores, "scores", boxes, true);
  checks::check_vector(idxs, "idxs", boxes, false);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iouctl::batched_soft_nms", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::string_view, double, double,
                                                                 double)>();
  return to_device(op.call(boxes.cpu(), scores.cpu(), idxs.cpu(), method, sigma, iou_threshold, score_threshold),
                   boxes.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(iouctl, CUDA, m) {
  m.impl("iou_guided_nms", TORCH_FN(IoUGuidedCuda::nms));
  m.impl("batched_iou_guided_nms", TORCH_FN(IoUGuidedCuda::batched_nms));
  m.impl("soft_nms", TORCH_FN(soft_nms_cuda));
  m.impl("batched_soft_nms", TORCH_FN(batched_soft_nms_cuda));
}
