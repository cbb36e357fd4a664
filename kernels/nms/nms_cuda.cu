// CUDA kernels of the NMS family.
//
// Greedy / IoU-guided NMS: sort by rank on the GPU (stable: ties by index), then one kernel fills an upper-triangular
// bit mask, mask[i][j / 64] bit j % 64 = "IoU(i, j) > threshold" for j > i in rank order (and, for the batched op,
// same category: per-class NMS exactly, with no coordinate offsets). The sequential scan over the mask runs on the
// host: a greedy NMS is inherently serial and its output size is data-dependent, so one device-to-host copy is
// needed anyway (as in torchvision). Above kMaxMaskBoxes boxes the mask (N^2 / 8 bytes) would be too large, and the
// CPU kernel runs on a host copy instead. Soft-NMS (serial and data-dependent throughout) always runs on a host copy.
//
// The IoU uses round-to-nearest intrinsics (__fmul_rn, ...): they are never contracted into FMAs nor approximated
// under --use_fast_math, so the GPU computes bit for bit what the CPU kernel (and torchvision's CPU nms) computes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int kBits = 64;                   // boxes per mask word = threads per block
constexpr int64_t kMaxMaskBoxes = 1 << 15;  // 32768 boxes: a 128 MiB mask

template <typename T>
struct Rn;
template <>
struct Rn<float> {
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ static float sub(float a, float b) { return __fsub_rn(a, b); }
  __device__ static float div(float a, float b) { return __fdiv_rn(a, b); }
};
template <>
struct Rn<double> {
  __device__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ static double add(double a, double b) { return __dadd_rn(a, b); }
  __device__ static double sub(double a, double b) { return __dsub_rn(a, b); }
  __device__ static double div(double a, double b) { return __ddiv_rn(a, b); }
};

// IoU as the CPU kernel computes it: std::max(a, b) = a < b ? b : a and std::min(a, b) = b < a ? b : a keep the
// same NaN behaviour; inter / ((area_a + area_b) - inter).
template <typename T>
__device__ __forceinline__ T iou_of(const T* a, T area_a, const T* b, T area_b) {
  using R = Rn<T>;
  const T xx1 = a[0] < b[0] ? b[0] : a[0];
  const T yy1 = a[1] < b[1] ? b[1] : a[1];
  const T xx2 = b[2] < a[2] ? b[2] : a[2];
  const T yy2 = b[3] < a[3] ? b[3] : a[3];
  const T dw = R::sub(xx2, xx1);
  const T dh = R::sub(yy2, yy1);
  const T w = T(0) < dw ? dw : T(0);
  const T h = T(0) < dh ? dh : T(0);
  const T inter = R::mul(w, h);
  return R::div(inter, R::sub(R::add(area_a, area_b), inter));
}

template <typename T>
__global__ void area_kernel(int64_t n, const T* __restrict boxes, T* __restrict area) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const T* b = boxes + 4 * i;
    area[i] = Rn<T>::mul(Rn<T>::sub(b[2], b[0]), Rn<T>::sub(b[3], b[1]));
  }
}

// Block (col_block, row_block) compares 64 rows with 64 columns; blocks below the diagonal are never read.
template <typename T>
__global__ void mask_kernel(int64_t n, int64_t words, const T* __restrict boxes, const T* __restrict area,
                            const int64_t* __restrict cat, T thr, uint64_t* __restrict mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (col_block < row_block) return;
  const int64_t row_start = row_block * kBits, col_start = col_block * kBits;
  const int rows = static_cast<int>(min(n - row_start, static_cast<int64_t>(kBits)));
  const int cols = static_cast<int>(min(n - col_start, static_cast<int64_t>(kBits)));
  __shared__ T sbox[kBits * 4];
  __shared__ T sarea[kBits];
  __shared__ int64_t scat[kBits];
  const int t = threadIdx.x;
  if (t < cols) {
    const int64_t j = col_start + t;
    for (int k = 0; k < 4; ++k) sbox[4 * t + k] = boxes[4 * j + k];
    sarea[t] = area[j];
    scat[t] = cat != nullptr ? cat[j] : 0;
  }
  __syncthreads();
  if (t < rows) {
    const int64_t i = row_start + t;
    T bi[4];
    for (int k = 0; k < 4; ++k) bi[k] = boxes[4 * i + k];
    const T ai = area[i];
    const int64_t ci = cat != nullptr ? cat[i] : 0;
    uint64_t bits = 0;
    for (int k = (row_block == col_block) ? t + 1 : 0; k < cols; ++k) {  // only j > i
      if (scat[k] == ci && iou_of<T>(bi, ai, sbox + 4 * k, sarea[k]) > thr) bits |= uint64_t(1) << k;
    }
    mask[i * words + col_block] = bits;
  }
}

// The largest T not above thr (see threshold_as in nms_cpu.cpp): x > result <=> (double)x > thr.
template <typename T>
T threshold_as(double thr) {
  T t = static_cast<T>(thr);
  if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

void check_inputs(const at::Tensor& boxes, std::initializer_list<std::pair<const at::Tensor*, const char*>> vecs) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "boxes must be Tensor[N, 4] (x1, y1, x2, y2), got shape ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(boxes.scalar_type()), "boxes must be floating point, got ",
                    boxes.scalar_type());
  for (const auto& [t, name] : vecs) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == boxes.size(0), name, " must be Tensor[N] with N = ",
                      boxes.size(0), " (one per box), got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == boxes.device(), name, " is on ", t->device(), " but boxes are on ",
                      boxes.device());
  }
}

using IouGuidedFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       double);
using BatchedIouGuidedFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&, double);

std::tuple<at::Tensor, at::Tensor> to_device(const std::tuple<at::Tensor, at::Tensor>& r, const at::Device& d) {
  return {std::get<0>(r).to(d), std::get<1>(r).to(d)};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> iou_guided_cuda_impl(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor* idxs,
    double iou_threshold) {
  const int64_t n = boxes.size(0);
  const at::Device device = boxes.device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor rank = ious.to(at::kDouble);
  const at::Tensor order = std::get<1>(rank.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor sboxes =
      boxes.to(c10::CppTypeToScalarType<T>::value).index_select(0, order).contiguous();
  at::Tensor scat;
  if (idxs != nullptr) scat = idxs->to(at::kLong).index_select(0, order).contiguous();
  at::Tensor area = at::empty({n}, sboxes.options());
  const int64_t words = (n + kBits - 1) / kBits;
  at::Tensor mask = at::empty({n, words}, boxes.options().dtype(at::kLong));
  area_kernel<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(n, sboxes.data_ptr<T>(),
                                                                               area.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(words), static_cast<unsigned>(words));
  mask_kernel<T><<<grid, kBits, 0, stream>>>(n, words, sboxes.data_ptr<T>(), area.data_ptr<T>(),
                                             idxs != nullptr ? scat.data_ptr<int64_t>() : nullptr,
                                             threshold_as<T>(iou_threshold),
                                             reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Host scan (the copies below wait for the kernels on this stream).
  const at::Tensor mask_h = mask.cpu();
  const at::Tensor cls_h = scores.to(at::kDouble).index_select(0, order).cpu();
  const uint64_t* m = reinterpret_cast<const uint64_t*>(mask_h.data_ptr<int64_t>());
  const double* cls = cls_h.data_ptr<double>();
  std::vector<uint64_t> removed(words, 0);
  std::vector<int64_t> kept;
  std::vector<double> best(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t w0 = i / kBits;
    if ((removed[w0] >> (i % kBits)) & 1) continue;
    kept.push_back(i);
    double b = cls[i];
    const uint64_t* row = m + i * words;
    for (int64_t w = w0; w < words; ++w) {
      uint64_t fresh = row[w] & ~removed[w];  // boxes this one suppresses first: its cluster (Alg. 1)
      removed[w] |= fresh;
      while (fresh != 0) {
        const int bit = __builtin_ctzll(fresh);
        b = std::max(b, cls[w * kBits + bit]);
        fresh &= fresh - 1;
      }
    }
    best[i] = b;
  }
  const int64_t k = static_cast<int64_t>(kept.size());
  at::Tensor kept_t = at::empty({k}, at::TensorOptions().dtype(at::kLong));
  at::Tensor cs_t = at::empty({k}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t q = 0; q < k; ++q) {
    kept_t.data_ptr<int64_t>()[q] = kept[q];
    cs_t.data_ptr<double>()[q] = best[kept[q]];
  }
  // Rank order with ties by index is the order of the merged output (torchvision's batched_nms order).
  return {order.index_select(0, kept_t.to(device)), cs_t.to(scores.scalar_type()).to(device)};
}

std::tuple<at::Tensor, at::Tensor> iou_guided_cuda_dispatch(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor* idxs,
    double iou_threshold) {
  if (idxs != nullptr) {
    check_inputs(boxes, {{&scores, "scores"}, {&ious, "ious"}, {idxs, "idxs"}});
  } else {
    check_inputs(boxes, {{&scores, "scores"}, {&ious, "ious"}});
  }
  TORCH_CHECK_VALUE(iou_threshold >= 0.0 && iou_threshold <= 1.0, "iou_threshold must be in [0, 1], got ",
                    iou_threshold);
  TORCH_CHECK_VALUE(!at::isnan(ious).any().item<bool>(), "ious contains NaN; NMS needs an ordering");
  TORCH_CHECK_VALUE(!at::isnan(scores).any().item<bool>(), "scores contains NaN; NMS needs an ordering");
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) {
    return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
  }
  if (n > kMaxMaskBoxes) {  // mask too large: the CPU kernel on a host copy
    if (idxs != nullptr) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("iouctl::batched_iou_guided_nms", "")
                           .typed<BatchedIouGuidedFn>();
      return to_device(op.call(boxes.cpu(), scores.cpu(), ious.cpu(), idxs->cpu(), iou_threshold), boxes.device());
    }
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("iouctl::iou_guided_nms", "").typed<IouGuidedFn>();
    return to_device(op.call(boxes.cpu(), scores.cpu(), ious.cpu(), iou_threshold), boxes.device());
  }
  if (boxes.scalar_type() == at::kDouble) return iou_guided_cuda_impl<double>(boxes, scores, ious, idxs, iou_threshold);
  return iou_guided_cuda_impl<float>(boxes, scores, ious, idxs, iou_threshold);  // half/bfloat16 in float32
}

std::tuple<at::Tensor, at::Tensor> iou_guided_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, double iou_threshold) {
  return iou_guided_cuda_dispatch(boxes, scores, ious, nullptr, iou_threshold);
}

std::tuple<at::Tensor, at::Tensor> batched_iou_guided_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor& idxs,
    double iou_threshold) {
  return iou_guided_cuda_dispatch(boxes, scores, ious, &idxs, iou_threshold);
}

// Soft-NMS: the CPU kernel on host copies (see the top of the file).
std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, c10::string_view method, double sigma, double iou_threshold,
    double score_threshold) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iouctl::soft_nms", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 c10::string_view, double, double, double)>();
  return to_device(op.call(boxes.cpu(), scores.cpu(), method, sigma, iou_threshold, score_threshold), boxes.device());
}

std::tuple<at::Tensor, at::Tensor> batched_soft_nms_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs, c10::string_view method, double sigma,
    double iou_threshold, double score_threshold) {
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
  m.impl("iou_guided_nms", TORCH_FN(iou_guided_nms_cuda));
  m.impl("batched_iou_guided_nms", TORCH_FN(batched_iou_guided_nms_cuda));
  m.impl("soft_nms", TORCH_FN(soft_nms_cuda));
  m.impl("batched_soft_nms", TORCH_FN(batched_soft_nms_cuda));
}
