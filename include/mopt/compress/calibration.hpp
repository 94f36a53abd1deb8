#pragma once
// Calibration windows for compression: n windows drawn without replacement (seeded) from the
// windows of a split (data/batches.hpp) — SparseGPT and GPTQ use 128 random windows of the
// training text. Fewer windows than asked is an error that names both counts.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "mopt/data/batches.hpp"
#include "mopt/error.hpp"

namespace mopt::compress {

// ids of n windows: i32 [n, seq_len].
[[nodiscard]] inline Tensor calibration_windows(const data::Batches& split, std::int64_t n, std::uint64_t seed = 0) {
    check(n >= 1, "calibration: the number of windows must be >= 1, got ", n);
    check(split.num_windows() >= n, "calibration: too few calibration windows: ", n, " asked, the split has ",
          split.num_windows(), " windows of ", split.options().seq_len, " tokens; ask for fewer or use more text");
    std::vector<std::int64_t> order(static_cast<std::size_t>(split.num_windows()));
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);
    const std::int64_t T = split.options().seq_len;
    Tensor ids = Tensor::empty({n, T}, DType::i32);
    std::vector<std::int32_t> targets(static_cast<std::size_t>(T));
    for (std::int64_t i = 0; i < n; ++i)
        split.fill_window(order[static_cast<std::size_t>(i)], ids.data<std::int32_t>() + i * T, targets.data());
    return ids;
}

}  // namespace mopt::compress
