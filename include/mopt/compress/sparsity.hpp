#pragma once
// Sparsity: how many weights a pruner zeroes, and by which saliency it picks them.
//
//   unstructured   ratio r ∈ [0, 1): exactly round(r · in) weights are zeroed in EVERY output row
//                  (per-output comparison groups, as Wanda does; Sun et al. 2023, §3)
//   N:M            nm_group = M > 0: in each group of M consecutive inputs of a row, the N = nm_zero
//                  least salient weights are zeroed (2:4 is the pattern sparse tensor cores run)
//
// Saliency: magnitude |W_ij|; Wanda |W_ij| · ‖X_j‖₂; SparseGPT the OBS error w²/[H⁻¹]_jj with
// the remaining weights updated (Frantar & Alistarh 2023).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "mopt/error.hpp"

namespace mopt::compress {

struct Sparsity {
    double ratio = 0.5;  // unstructured: fraction of each row zeroed
    int nm_zero = 0;     // N: weights zeroed per group (N:M when nm_group > 0)
    int nm_group = 0;    // M: consecutive inputs per group

    [[nodiscard]] bool structured() const { return nm_group > 0; }

    // Weights zeroed per row of length `in` (unstructured or N:M).
    [[nodiscard]] std::int64_t zeros_per_row(std::int64_t in) const {
        return structured() ? in / nm_group * nm_zero : std::llround(ratio * static_cast<double>(in));
    }

    // `what` names the layer in the error.
    void validate(const std::string& what, std::int64_t in) const {
        check(in > 0, what, ": cannot prune rows of length ", in);
        if (structured()) {
            check(nm_zero >= 1 && nm_zero < nm_group, what, ": ", nm_zero, ":", nm_group,
                  " sparsity needs 1 <= N < M (N weights zeroed in each group of M)");
            check(in % nm_group == 0, what, ": ", nm_zero, ":", nm_group, " sparsity needs M = ", nm_group,
                  " to divide the row length ", in);
        } else {
            check(nm_zero == 0 && nm_group == 0, what, ": N:M sparsity needs a positive group size M, got ",
                  nm_zero, ":", nm_group);
            check(ratio >= 0.0 && ratio < 1.0, what, ": sparsity ratio ", ratio, " is outside [0, 1)");
        }
    }
};

enum class Saliency { magnitude, wanda, sparsegpt };

[[nodiscard]] inline const char* name(Saliency s) {
    switch (s) {
        case Saliency::magnitude: return "magnitude";
        case Saliency::wanda: return "wanda";
        case Saliency::sparsegpt: return "sparsegpt";
    }
    return "?";
}

[[nodiscard]] inline Saliency parse_saliency(std::string_view s) {
    for (Saliency v : {Saliency::magnitude, Saliency::wanda, Saliency::sparsegpt})
        if (s == name(v)) return v;
    throw Error(mopt::detail::concat("unknown pruning saliency '", s, "' (magnitude, wanda, sparsegpt)"));
}

namespace detail {
// Writes into `mask[0..n)` true for the k entries of lowest saliency (ties broken by lower index,
// so exactly k are chosen). `order` is scratch.
inline void mark_least_salient(const float* saliency, std::int64_t n, std::int64_t k, bool* mask,
                               std::vector<std::int32_t>& order) {
    std::fill_n(mask, n, false);
    if (k <= 0) return;
    order.resize(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    auto less = [&](std::int32_t a, std::int32_t b) {
        return saliency[a] < saliency[b] || (saliency[a] == saliency[b] && a < b);
    };
    if (k < n) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), less);
    for (std::int64_t i = 0; i < std::min(k, n); ++i) mask[order[static_cast<std::size_t>(i)]] = true;
}

// The mask of one row of length `in` from its saliency: k lowest per row, or N lowest per group of M.
inline void row_mask(const float* saliency, std::int64_t in, const Sparsity& sp, bool* mask,
                     std::vector<std::int32_t>& order) {
    if (sp.structured()) {
        for (std::int64_t g = 0; g < in; g += sp.nm_group)
            mark_least_salient(saliency + g, sp.nm_group, sp.nm_zero, mask + g, order);
    } else {
        mark_least_salient(saliency, in, sp.zeros_per_row(in), mask, order);
    }
}
}  // namespace detail

}  // namespace mopt::compress
