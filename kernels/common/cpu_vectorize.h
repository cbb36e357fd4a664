// What the CPU kernels share to vectorize their pairwise loops (`#include "common/cpu_vectorize.h"`):
// - an AVX2 clone of each hot loop, chosen at run time (IOUCTL_AVX2, iouctl::cpu_has_avx2()), GCC/clang on x86-64;
// - IOUCTL_VECTORIZE_BEGIN / _END around the loops and the math inlined into them: GCC vectorizes compare-and-select
//   only when it may assume comparisons do not trap. Values are unaffected (IEEE results, NaN and signed zeros kept);
//   not -ffast-math, so keep sets still match torchvision's. Put BEGIN before including the shared math header, so
//   that the math gets the options of the loops it is inlined into (GCC does not inline across differing options).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define IOUCTL_AVX2 1
#define IOUCTL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define IOUCTL_AVX2 0
#define IOUCTL_ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__)
#define IOUCTL_VECTORIZE_BEGIN _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-trapping-math\")")
#define IOUCTL_VECTORIZE_END _Pragma("GCC pop_options")
#else
#define IOUCTL_VECTORIZE_BEGIN
#define IOUCTL_VECTORIZE_END
#endif

namespace iouctl {

inline bool cpu_has_avx2() {
#if IOUCTL_AVX2
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

}  // namespace iouctl
