// Schema of the Precise RoI Pooling ops (Jiang et al., IoU-Net, ECCV 2018), and their autocast rule. Kernels:
// prroi_pool_cpu.cpp, prroi_pool_cuda.cu (per-element math shared in prroi_pool_math.h); autograd and fake kernels:
// iouctl/ops/prroi_pool.py.
// FRAGMENT, not TORCH_LIBRARY: other kernel libraries (kernels/nms, ...) also define ops in the iouctl namespace.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(iouctl, m) {
  // input [N, C, H, W]; rois [K, 5] = (batch index, x1, y1, x2, y2) in image coordinates -> [K, C, PH, PW]
  m.def("prroi_pool(Tensor input, Tensor rois, int pooled_height, int pooled_width, float spatial_scale) -> Tensor");
  // -> (grad_input [N, C, H, W] or [0] when not wanted, grad_rois [K, 5] or [0] when not wanted)
  m.def(
      "_prroi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor output, int pooled_height, "
      "int pooled_width, float spatial_scale, bool input_grad, bool rois_grad) -> (Tensor, Tensor)");
  // The same two ops computed by the CUDA kernels' element bodies on the CPU (prroi_pool(..., impl="direct")):
  // CPU kernels only, the oracle of the CUDA math.
  m.def(
      "_prroi_pool_direct(Tensor input, Tensor rois, int pooled_height, int pooled_width, float spatial_scale)"
      " -> Tensor");
  m.def(
      "_prroi_pool_direct_backward(Tensor grad, Tensor input, Tensor rois, Tensor output, int pooled_height, "
      "int pooled_width, float spatial_scale, bool input_grad, bool rois_grad) -> (Tensor, Tensor)");
}

namespace {

// Autocast: pool in float32 and return the input's dtype, as torchvision's roi_align does (half-precision boxes
// and bin sums would lose the small offsets the box gradient lives on).
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor prroi_pool_autocast(const at::Tensor& input, const at::Tensor& rois, int64_t pooled_height,
                               int64_t pooled_width, double spatial_scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("iouctl::prroi_pool", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>();
  return op
      .call(at::autocast::cached_cast(at::kFloat, input, device_type),
            at::autocast::cached_cast(at::kFloat, rois, device_type), pooled_height, pooled_width, spatial_scale)
      .to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(iouctl, Autocast, m) {
  m.impl("prroi_pool", prroi_pool_autocast<c10::DispatchKey::Autocast, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(iouctl, AutocastCPU, m) {
  m.impl("prroi_pool", prroi_pool_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}
