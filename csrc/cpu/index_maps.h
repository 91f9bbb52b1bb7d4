// Checks of the coupling index maps (csrc/ops.cpp) shared by the CPU kernels of the additive and the
// affine coupling update. The CPU kernels check every entry (a bad map would read out of bounds); the
// CUDA kernels assert on the device instead.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace nice_ext
