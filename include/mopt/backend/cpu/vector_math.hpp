#pragma once
// Vectorised row kernels shared by the softmax-like ops (softmax, attention, cross-entropy).
// The exponentials go through xtensor expressions, which xsimd evaluates several lanes at a time:
// a scalar std::exp loop was the largest cost of attention's forward pass.
#include <algorithm>
#include <cstdint>

#include "mopt/tensor/xview.hpp"

namespace mopt::backend::cpu {

// row[i] = exp(row[i] - shift) for i in [0, n); returns Σ row[i].
inline float exp_shifted(float* row, std::int64_t n, float shift) {
    if (n <= 0) return 0.0f;
    auto r = flat(row, 0, n);
    xt::noalias(r) = xt::exp(r - shift);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (std::int64_t i = 0; i < n; ++i) sum += row[i];
    return sum;
}

// In-place stable softmax of row[0, n): exp(x - max) / Σ.
inline void softmax_row(float* row, std::int64_t n) {
    if (n <= 0) return;
    const float mx = *std::max_element(row, row + n);
    const float inv = 1.0f / exp_shifted(row, n, mx);
    auto r = flat(row, 0, n);
    r *= inv;
}

}  // namespace mopt::backend::cpu
