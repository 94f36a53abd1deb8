#pragma once
// prune(): one-shot pruning of a linear weight W [out, in] (y = x Wᵀ) by one of three saliencies,
// unstructured or N:M (sparsity.hpp). Weights chosen are set to exactly 0.
//
//   magnitude  |W_ij|                    — no data needed
//   wanda      |W_ij| · ‖X_j‖₂           — Sun et al. 2023, "A Simple and Effective Pruning Approach
//                                          for Large Language Models"; no weight update
//   sparsegpt  w²/[H⁻¹]_jj with OBS updates of the remaining weights (sparsegpt.hpp)
//
// Comparison groups are per output row: every row loses exactly round(ratio · in) weights
// (or N of every M consecutive inputs).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/compress/input_stats.hpp"
#include "mopt/compress/sparsegpt.hpp"
#include "mopt/compress/sparsity.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

namespace detail {
// Zeroes, row by row, the weights of lowest |W_ij| · column_scale[j] (column_scale empty = 1).
inline std::int64_t prune_by_score(Tensor& w, const Sparsity& sp, const std::vector<float>& column_scale) {
    const std::int64_t out = w.dim(0), in = w.dim(1);
    float* W = w.f32();
    backend::cpu::parallel_for(out, in * 8, [&](std::int64_t r) {
        std::vector<float> sal(static_cast<std::size_t>(in));
        std::vector<char> maskc(static_cast<std::size_t>(in));
        std::vector<std::int32_t> order;
        float* wr = W + r * in;
        for (std::int64_t c = 0; c < in; ++c)
            sal[static_cast<std::size_t>(c)] =
                std::fabs(wr[c]) * (column_scale.empty() ? 1.0f : column_scale[static_cast<std::size_t>(c)]);
        bool* mask = reinterpret_cast<bool*>(maskc.data());
        row_mask(sal.data(), in, sp, mask, order);
        for (std::int64_t c = 0; c < in; ++c)
            if (mask[c]) wr[c] = 0.0f;
    });
    return out * sp.zeros_per_row(in);
}
}  // namespace detail

// Prunes w [out, in] in place; returns the number of weights the mask zeroed. magnitude needs no
// statistics; wanda and sparsegpt need `stats` of the layer inputs (width in). `what` names the layer.
inline std::int64_t prune(Tensor& w, Saliency s, const Sparsity& sp, const InputStats* stats,
                          const SparseGptOptions& opt = {}, const std::string& what = "weight") {
    check(w.rank() == 2 && w.dtype() == DType::f32, what, ": pruning needs an f32 matrix [out, in], got ",
          w.shape(), " ", name(w.dtype()));
    const std::int64_t in = w.dim(1);
    sp.validate(what, in);
    switch (s) {
        case Saliency::magnitude: return detail::prune_by_score(w, sp, {});
        case Saliency::wanda: return detail::prune_by_score(w, sp, require_stats(stats, in, what, "Wanda").column_norms());
        case Saliency::sparsegpt: return prune_sparsegpt(w, sp, require_stats(stats, in, what, "SparseGPT"), opt, what);
    }
    throw Error(mopt::detail::concat(what, ": unknown saliency"));
}

}  // namespace mopt::compress
