// The coupling index maps (csrc/ops.cpp) as the CPU kernels of the additive and the affine coupling update
// see them: checks of every entry (a bad map would read out of bounds; the CUDA kernels assert on the
// device instead), and the detection of the paper's odd/even masks.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <vector>

namespace nice_ext {

// shift_col must send the updated features one-to-one onto the columns of shift (-1 marks kept ones).
// Returns the inverse map: updated_features[c] is the feature that shift column c updates.
inline std::vector<int32_t> check_shift_col_cpu(const at::Tensor& shift_col, int64_t updated) {
  std::vector<int32_t> updated_features(updated, -1);
  const int32_t* col = shift_col.const_data_ptr<int32_t>();
  int64_t count = 0;
  for (int64_t j = 0; j < shift_col.numel(); ++j) {
    const int32_t c = col[j];
    if (c == -1) continue;
    TORCH_CHECK(c >= 0 && c < updated && updated_features[c] < 0,
                "nice_ext: shift_col must map the updated features one-to-one onto the ", updated,
                " columns of shift (and -1 to kept features); entry ", j, " is ", c);
    updated_features[c] = static_cast<int32_t>(j);
    ++count;
  }
  TORCH_CHECK(count == updated, "nice_ext: the coupling mask updates ", count, " features but shift has ", updated,
              " columns");
  return updated_features;
}

inline void check_gather_index_cpu(const at::Tensor& gather_index, int64_t features) {
  std::vector<char> seen(features, 0);
  const int32_t* idx = gather_index.const_data_ptr<int32_t>();
  for (int64_t g = 0; g < gather_index.numel(); ++g) {
    const int32_t j = idx[g];
    TORCH_CHECK(j >= 0 && j < features && !seen[j], "nice_ext: gather_index must list distinct features in [0, ",
                features, "); entry ", g, " is ", j);
    seen[j] = 1;
  }
}

// The paper's odd/even masks make both index maps stride-2 progressions: the updated features are
// first, first + 2, ... (shift column k is feature first + 2k), and the next layer's kept features
// start, start + 2, ... Rows then need no index loads: each pair of features (2p, 2p + 1) is one step
// of a loop that the compiler vectorises with shuffles (benchmarks/NOTES.md); the additive and the affine
// kernels both take such a path (their CUDA version 2 kernels too, checking the same maps on the
// device: find_odd_even_maps in csrc/cuda/coupling_rows.cuh). Returns `first` (0 or 1), or -1 for any
// other mask.
inline int64_t stride2_first_updated(const int32_t* col, int64_t features, int64_t updated) {
  for (int64_t first = 0; first <= 1; ++first) {
    if ((features - first + 1) / 2 != updated) continue;
    bool match = true;
    for (int64_t j = 0; j < features && match; ++j)
      match = col[j] == ((j - first) % 2 == 0 ? static_cast<int32_t>((j - first) / 2) : -1);
    if (match) return first;
  }
  return -1;
}

// gather_index = start, start + 2, ... over every feature of that parity: returns start (0 or 1, or 0
// when nothing is gathered), else -1.
inline int64_t stride2_first_gathered(const int32_t* gidx, int64_t gathered_n, int64_t features) {
  if (gathered_n == 0) return 0;
  const int64_t start = gidx[0];
  if ((start != 0 && start != 1) || gathered_n != (features - start + 1) / 2) return -1;
  for (int64_t g = 0; g < gathered_n; ++g)
    if (gidx[g] != start + 2 * g) return -1;
  return start;
}

// The odd/even case of a call (stride2_first_updated and stride2_first_gathered both matched), as
// compile-time constants for the row loops, so that they have no branches: f(kFirst, kStart, kGather).
struct OddEven {
  int64_t first;  // the first updated feature (0 or 1)
  int64_t start;  // the first gathered feature (0 or 1)
  bool gather;    // whether the next layer's input is written
};

template <typename F>
void dispatch_odd_even(const OddEven& m, F&& f) {
  auto with_start = [&](auto first) {
    if (!m.gather) return f(first, std::integral_constant<int, 0>(), std::false_type());
    if (m.start == 0) return f(first, std::integral_constant<int, 0>(), std::true_type());
    return f(first, std::integral_constant<int, 1>(), std::true_type());
  };
  if (m.first == 0) return with_start(std::integral_constant<int, 0>());
  return with_start(std::integral_constant<int, 1>());
}

}  // namespace nice_ext
