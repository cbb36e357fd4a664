// CPU kernels of iouctl::coco_match and iouctl::coco_accumulate (schemas and conventions: coco_eval.cpp). The loops
// follow faster-coco-eval's C++ port of pycocotools (MatchDetectionsToGroundTruth, ComputePrecisionRecallCurve)
// operation for operation, so that the results are equal bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

// `t` checked (a CPU tensor of `dtype` with `dim` dimensions), contiguous
at::Tensor checked(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "coco_eval: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "coco_eval: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "coco_eval: ", name, " must have ", dim, " dimension(s), got ", t.dim());
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> coco_match_cpu(const at::Tensor& iou_, const at::Tensor& pair_gt_,
                                                  const at::Tensor& pair_offsets_, const at::Tensor& group_offsets_,
                                                  const at::Tensor& gt_ignore_, const at::Tensor& gt_crowd_,
                                                  const at::Tensor& det_outside_, const at::Tensor& thresholds_) {
  const auto iou = checked(iou_, at::kDouble, 1, "iou");
  const auto pair_gt = checked(pair_gt_, at::kLong, 1, "pair_gt");
  const auto pair_offsets = checked(pair_offsets_, at::kLong, 1, "pair_offsets");
  const auto group_offsets = checked(group_offsets_, at::kLong, 1, "group_offsets");
  const auto gt_ignore = checked(gt_ignore_, at::kBool, 2, "gt_ignore");
  const auto gt_crowd = checked(gt_crowd_, at::kBool, 1, "gt_crowd");
  const auto det_outside = checked(det_outside_, at::kBool, 2, "det_outside");
  const auto thresholds = checked(thresholds_, at::kDouble, 1, "thresholds");
  const int64_t P = iou.size(0), D = pair_offsets.size(0) - 1, NG = group_offsets.size(0) - 1;
  const int64_t A = gt_ignore.size(0), G = gt_ignore.size(1), T = thresholds.size(0);
  TORCH_CHECK(pair_gt.size(0) == P, "coco_match: pair_gt and iou differ in length");
  TORCH_CHECK(D >= 0 && NG >= 0, "coco_match: offsets need at least one entry");
  TORCH_CHECK(gt_crowd.size(0) == G, "coco_match: gt_crowd must have one entry per ground truth");
  TORCH_CHECK(det_outside.size(0) == A && det_outside.size(1) == D, "coco_match: det_outside must be [A, D]");
  const int64_t* po = pair_offsets.data_ptr<int64_t>();
  const int64_t* go = group_offsets.data_ptr<int64_t>();
  TORCH_CHECK(po[0] == 0 && po[D] == P, "coco_match: pair_offsets must run from 0 to the number of pairs");
  TORCH_CHECK(go[0] == 0 && go[NG] == D, "coco_match: group_offsets must run from 0 to the number of detections");
  for (int64_t d = 0; d < D; ++d) TORCH_CHECK(po[d] <= po[d + 1], "coco_match: pair_offsets must not decrease");
  for (int64_t g = 0; g < NG; ++g) TORCH_CHECK(go[g] <= go[g + 1], "coco_match: group_offsets must not decrease");
  const int64_t* pg = pair_gt.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(pg[p] >= 0 && pg[p] < G, "coco_match: pair_gt out of range");

  auto match = at::full({A, T, D}, -1, pair_gt.options());
  auto ignored = at::zeros({A, T, D}, gt_ignore.options());
  const double* v = iou.data_ptr<double>();
  const bool* gig = gt_ignore.data_ptr<bool>();
  const bool* crowd = gt_crowd.data_ptr<bool>();
  const bool* out = det_outside.data_ptr<bool>();
  const double* thr = thresholds.data_ptr<double>();
  int64_t* mt = match.data_ptr<int64_t>();
  bool* ig = ignored.data_ptr<bool>();
  // a ground truth is used by at most one detection per (area range, threshold); groups never share ground truth,
  // so the groups may run in parallel
  std::vector<char> used(static_cast<size_t>(A * T * G), 0);
  at::parallel_for(0, NG, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t a = 0; a < A; ++a) {
        const bool* ign = gig + a * G;
        for (int64_t t = 0; t < T; ++t) {
          char* u = used.data() + (a * T + t) * G;
          const int64_t row = (a * T + t) * D;
          for (int64_t d = go[g]; d < go[g + 1]; ++d) {
            double best = std::min(thr[t], 1 - 1e-10);
            int64_t m = -1;
            // ground truth sorted by the ignore flag (stable): the regular ones, then, only when none matched,
            // the ignored ones (cocoeval's `break` on the first ignored one after a regular match)
            for (int pass = 0; pass < 2 && m < 0; ++pass) {
              for (int64_t p = po[d]; p < po[d + 1]; ++p) {
                const int64_t gt = pg[p];
                if (ign[gt] != (pass == 1)) continue;
                if (u[gt] && !crowd[gt]) continue;
                if (v[p] >= best) {  // >=: on equal IoU the later ground truth wins
                  best = v[p];
                  m = p;
                }
              }
            }
            if (m >= 0) {
              mt[row + d] = m;
              ig[row + d] = ign[pg[m]];
              u[pg[m]] = 1;
            } else if (out[a * D + d]) {
              ig[row + d] = true;
            }
          }
        }
      }
    }
  });
  return {match, ignored};
}

std::tuple<at::Tensor, at::Tensor> coco_accumulate_cpu(const at::Tensor& tp_, const at::Tensor& fp_,
                                                       const at::Tensor& class_offsets_, const at::Tensor& rank_,
                                                       const at::Tensor& num_gt_,
                                                       const at::Tensor& recall_thresholds_,
                                                       at::IntArrayRef max_dets) {
  const auto tp = checked(tp_, at::kBool, 3, "tp");
  const auto fp = checked(fp_, at::kBool, 3, "fp");
  const auto class_offsets = checked(class_offsets_, at::kLong, 1, "class_offsets");
  const auto rank = checked(rank_, at::kLong, 1, "rank");
  const auto num_gt = checked(num_gt_, at::kLong, 2, "num_gt");
  const auto rec = checked(recall_thresholds_, at::kDouble, 1, "recall_thresholds");
  const int64_t A = tp.size(0), T = tp.size(1), D = tp.size(2);
  const int64_t K = class_offsets.size(0) - 1, R = rec.size(0), M = static_cast<int64_t>(max_dets.size());
  TORCH_CHECK(fp.sizes() == tp.sizes(), "coco_accumulate: tp and fp differ in shape");
  TORCH_CHECK(rank.size(0) == D, "coco_accumulate: rank needs one entry per detection");
  TORCH_CHECK(K >= 0 && num_gt.size(0) == K && num_gt.size(1) == A, "coco_accumulate: num_gt must be [K, A]");
  const int64_t* co = class_offsets.data_ptr<int64_t>();
  TORCH_CHECK(co[0] == 0 && co[K] == D, "coco_accumulate: class_offsets must run from 0 to the number of detections");
  for (int64_t k = 0; k < K; ++k) TORCH_CHECK(co[k] <= co[k + 1], "coco_accumulate: class_offsets must not decrease");

  auto precision = at::full({T, R, K, A, M}, -1.0, rec.options());
  auto recall = at::full({T, K, A, M}, -1.0, rec.options());
  const bool* tps = tp.data_ptr<bool>();
  const bool* fps = fp.data_ptr<bool>();
  const int64_t* rk = rank.data_ptr<int64_t>();
  const int64_t* ngt = num_gt.data_ptr<int64_t>();
  const double* rt = rec.data_ptr<double>();
  double* pr_out = precision.data_ptr<double>();
  double* rc_out = recall.data_ptr<double>();
  const std::vector<int64_t> budgets(max_dets.begin(), max_dets.end());
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<double> precisions, recalls;
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t a = 0; a < A; ++a) {
        const int64_t n_gt = ngt[k * A + a];
        if (n_gt == 0) continue;
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t t = 0; t < T; ++t) {
            const bool* tpr = tps + (a * T + t) * D;
            const bool* fpr = fps + (a * T + t) * D;
            int64_t n_tp = 0, n_fp = 0;
            precisions.clear();
            recalls.clear();
            for (int64_t d = co[k]; d < co[k + 1]; ++d) {
              if (rk[d] >= budgets[m]) continue;
              n_tp += tpr[d];
              n_fp += fpr[d];
              recalls.push_back(static_cast<double>(n_tp) / n_gt);
              const int64_t valid = n_tp + n_fp;
              precisions.push_back(valid > 0 ? static_cast<double>(n_tp) / valid : 0.0);
            }
            const int64_t n = static_cast<int64_t>(precisions.size());
            rc_out[((t * K + k) * A + a) * M + m] = n ? recalls.back() : 0;
            for (int64_t i = n - 1; i > 0; --i) {
              if (precisions[i] > precisions[i - 1]) precisions[i - 1] = precisions[i];
            }
            // recalls never decrease and the thresholds ascend: one walk finds each first index with recall >= r
            // (std::lower_bound's answer)
            int64_t j = 0;
            for (int64_t r = 0; r < R; ++r) {
              while (j < n && recalls[j] < rt[r]) ++j;
              pr_out[(((t * R + r) * K + k) * A + a) * M + m] = j < n ? precisions[j] : 0.0;
            }
          }
        }
      }
    }
  });
  return {precision, recall};
}

}  // namespace

TORCH_LIBRARY_IMPL(iouctl, CPU, m) {
  m.impl("coco_match", TORCH_FN(coco_match_cpu));
  m.impl("coco_accumulate", TORCH_FN(coco_accumulate_cpu));
}
