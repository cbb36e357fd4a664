// Schemas of cocoeval's matching and accumulation on arrays (iouctl::coco_match, iouctl::coco_accumulate): the two
// loops of pycocotools' COCOeval.evaluateImg / accumulate, without its per-annotation dicts. Kernels:
// coco_eval_cpu.cpp; the Python face, which builds the inputs and summarizes, is iouctl/analysis/cocoeval_arrays.py.
// The references are pycocotools and faster-coco-eval themselves (tests/analysis/test_cocoeval_arrays.py).
// There is no CUDA kernel: the inputs are host arrays built from the detections table and the per-group work is a
// short sequential loop.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(iouctl, m) {
  // Greedy matching of detections to ground truth for every area range a and IoU threshold t, cocoeval's rules:
  // groups (an image and class) of detections in matching order (score descending, stable); a detection takes the
  // unused (or crowd) ground truth of best IoU >= min(t, 1 - 1e-10), ties to the later one, non-ignored ground truth
  // first; an unmatched detection outside the area range is ignored.
  //   iou float64[P], pair_gt int64[P]: candidate pairs, detection by detection, ground truth in cocoeval's order;
  //   pair_offsets int64[D+1]: the pairs of detection d are [pair_offsets[d], pair_offsets[d+1]);
  //   group_offsets int64[NG+1]: the detections of group g are [group_offsets[g], group_offsets[g+1]);
  //   gt_ignore bool[A, G], gt_crowd bool[G], det_outside bool[A, D], thresholds float64[T].
  // Returns (match int64[A, T, D]: index of the matched pair, -1 if none; ignored bool[A, T, D]).
  m.def(
      "coco_match(Tensor iou, Tensor pair_gt, Tensor pair_offsets, Tensor group_offsets, Tensor gt_ignore,"
      " Tensor gt_crowd, Tensor det_outside, Tensor thresholds) -> (Tensor, Tensor)");
  // cocoeval's accumulate: per class k, area range a, detection budget m and threshold t, the precision/recall
  // curve over the class's detections, counting those with rank < max_dets[m]; precision made monotone and sampled
  // at each recall threshold (the first detection whose recall reaches it).
  //   tp, fp bool[A, T, D]: true / false positives (neither: ignored), detections in accumulation order: by class,
  //   then score descending, then image, then rank in its image and class; class_offsets int64[K+1]: the detections
  //   of class k are [class_offsets[k], class_offsets[k+1]); rank int64[D]; num_gt int64[K, A] (ground truths not
  //   ignored); recall_thresholds float64[R] ascending; max_dets: the budgets.
  // Returns (precision float64[T, R, K, A, M], recall float64[T, K, A, M]); -1 where the class has no ground truth.
  m.def(
      "coco_accumulate(Tensor tp, Tensor fp, Tensor class_offsets, Tensor rank, Tensor num_gt,"
      " Tensor recall_thresholds, int[] max_dets) -> (Tensor, Tensor)");
}
