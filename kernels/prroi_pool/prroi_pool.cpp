// Schema of the Precise RoI Pooling ops (Jiang et al., IoU-Net, ECCV 2018). Kernels: prroi_pool_cpu.cpp,
// prroi_pool_cuda.cu; autograd and fake kernels: iouctl/ops/prroi_pool.py.
// FRAGMENT, not TORCH_LIBRARY: other kernel libraries (kernels/nms, ...) also define ops in the iouctl namespace.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(iouctl, m) {
  // input [N, C, H, W]; rois [K, 5] = (batch index, x1, y1, x2, y2) in image coordinates -> [K, C, PH, PW]
  m.def("prroi_pool(Tensor input, Tensor rois, int pooled_height, int pooled_width, float spatial_scale) -> Tensor");
  // -> (grad_input [N, C, H, W] or [0] when not wanted, grad_rois [K, 5] or [0] when not wanted)
  m.def(
      "_prroi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor output, int pooled_height, "
      "int pooled_width, float spatial_scale, bool input_grad, bool rois_grad) -> (Tensor, Tensor)");
}
