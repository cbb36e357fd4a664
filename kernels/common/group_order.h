// The order every grouped kernel works in (host code): by group, then decreasing key, then increasing index. A total
// order, so results never depend on the sort's stability; the keys are sorted by value, not through indices (no
// cache misses in the comparisons).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace iouctl {

// Positions -> original indices of n items with group ids `group` (null: one group) and ranking keys `key`.
inline std::vector<int64_t> group_order(const int64_t* group, const double* key, int64_t n) {
  struct Key {
    int64_t group;
    double key;
    int64_t index;
  };
  std::vector<Key> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = Key{group != nullptr ? group[i] : 0, key[i], i};
  std::sort(keys.begin(), keys.end(), [](const Key& a, const Key& b) {
    if (a.group != b.group) return a.group < b.group;
    if (a.key != b.key) return a.key > b.key;
    return a.index < b.index;
  });
  std::vector<int64_t> order(n);
  for (int64_t p = 0; p < n; ++p) order[p] = keys[p].index;
  return order;
}

}  // namespace iouctl
