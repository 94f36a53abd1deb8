#pragma once
// SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
// in One-Shot"): prune a layer so that ‖XWᵀ − XŴᵀ‖ stays small, by Optimal Brain Surgeon updates
// of the weights that remain, over the Hessian H = 2/n XᵀX (+ damping) of the calibration inputs.
//
//   U = upper Cholesky factor of H⁻¹;  for each block of B columns (lazy batch updates):
//     mask ← per row, the lowest w_c² / U_cc² in the block (unstructured: that row's share of
//            round(r · in) zeros; N:M: chosen when each group of M starts, from the current weights)
//     for each column c of the block:  err = (w_c − ŵ_c) / U_cc  (ŵ_c = 0 if masked, else w_c)
//                                      w_{c+1..} −= err · U_{c, c+1..}   (inside the block)
//     W[:, later blocks] −= Err · U[block, later blocks]                 (one GEMM)
//
// Rows are independent (they share U), so the in-block work runs one row per thread. Inputs that
// were zero in every calibration row (dead) get H_cc = 1 and their weights are set to 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/backend/cpu/gemm.hpp"
#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/compress/cholesky.hpp"
#include "mopt/compress/input_stats.hpp"
#include "mopt/compress/sparsity.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

struct SparseGptOptions {
    std::int64_t block = 128;  // columns per lazy batch update
    double damp = 0.01;        // λ: H += λ · mean(diag H) · I
};

// Prunes w [out, in] in place as described above; returns the number of weights zeroed by the mask.
inline std::int64_t prune_sparsegpt(Tensor& w, const Sparsity& sp, const InputStats& stats,
                                    const SparseGptOptions& opt, const std::string& what) {
    check(w.rank() == 2 && w.dtype() == DType::f32, what, ": SparseGPT prunes an f32 matrix [out, in], got ",
          w.shape(), " ", name(w.dtype()));
    const std::int64_t out = w.dim(0), in = w.dim(1);
    sp.validate(what, in);
    check(stats.in() == in, what, ": calibration statistics have width ", stats.in(), " but the weight has ", in,
          " input columns");
    check(opt.block >= 1, what, ": SparseGPT block size ", opt.block, " must be positive");
    // Blocks hold whole N:M groups so that a group's mask is chosen once, from its current weights.
    const std::int64_t block = sp.structured() ? std::max<std::int64_t>(opt.block / sp.nm_group, 1) * sp.nm_group
                                               : opt.block;

    const std::vector<bool> dead = stats.dead_columns();
    const std::vector<float> u = inverse_cholesky_upper(stats.hessian_f64(0.0), opt.damp, what);
    float* W = w.f32();
    for (std::int64_t c = 0; c < in; ++c)
        if (dead[static_cast<std::size_t>(c)])
            for (std::int64_t r = 0; r < out; ++r) W[r * in + c] = 0.0f;

    std::vector<float> err(static_cast<std::size_t>(out * block));
    const int level = backend::cpu::nesting_level();
    const int threads = backend::cpu::max_threads();
    std::vector<std::vector<float>> sal_scratch(static_cast<std::size_t>(threads));
    std::vector<std::vector<std::int32_t>> order_scratch(static_cast<std::size_t>(threads));
    std::vector<std::vector<char>> mask_scratch(static_cast<std::size_t>(threads));

    for (std::int64_t i1 = 0; i1 < in; i1 += block) {
        const std::int64_t i2 = std::min(i1 + block, in), count = i2 - i1;
        // Unstructured: this block's share of the row's zeros, so that the shares sum to round(r · in).
        const std::int64_t k_block = sp.structured() ? 0 : sp.zeros_per_row(i2) - sp.zeros_per_row(i1);
        backend::cpu::parallel_for(out, count * count, [&](std::int64_t r) {
            const auto t = static_cast<std::size_t>(backend::cpu::thread_slot(level));
            auto& sal = sal_scratch[t];
            auto& order = order_scratch[t];
            auto& maskc = mask_scratch[t];
            sal.resize(static_cast<std::size_t>(count));
            maskc.assign(static_cast<std::size_t>(count), 0);
            bool* mask = reinterpret_cast<bool*>(maskc.data());
            float* wr = W + r * in;
            float* er = err.data() + r * count;
            auto saliency = [&](std::int64_t c0, std::int64_t n) {
                for (std::int64_t c = c0; c < c0 + n; ++c) {
                    const float d = u[static_cast<std::size_t>(c * in + c)];
                    sal[static_cast<std::size_t>(c - i1)] = wr[c] * wr[c] / (d * d);
                }
            };
            if (!sp.structured()) {
                saliency(i1, count);
                detail::mark_least_salient(sal.data(), count, k_block, mask, order);
            }
            for (std::int64_t c = i1; c < i2; ++c) {
                if (sp.structured() && (c - i1) % sp.nm_group == 0) {
                    saliency(c, sp.nm_group);
                    detail::mark_least_salient(sal.data() + (c - i1), sp.nm_group, sp.nm_zero, mask + (c - i1), order);
                }
                const float* uc = u.data() + c * in;
                const float wc = wr[c];
                const float e = mask[c - i1] ? wc / uc[c] : 0.0f;
                if (mask[c - i1]) wr[c] = 0.0f;
                er[c - i1] = e;
                if (e != 0.0f)
                    for (std::int64_t j = c + 1; j < i2; ++j) wr[j] -= e * uc[j];
            }
        });
        if (i2 < in)
            backend::cpu::gemm({.trans_a = false, .trans_b = false, .m = out, .n = in - i2, .k = count, .alpha = -1.0f,
                                .beta = 1.0f, .a = err.data(), .lda = count, .b = u.data() + i1 * in + i2, .ldb = in,
                                .c = W + i2, .ldc = in});
    }
    return out * sp.zeros_per_row(in);
}

}  // namespace mopt::compress
