#pragma once
// GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
// Transformers"): quantise a layer column by column on the RTN grid (rtn.hpp) and push each
// column's rounding error onto the columns not yet quantised, weighted by the inverse Hessian of
// the calibration inputs, so that ‖XWᵀ − XŴᵀ‖ stays small.
//
//   H = 2/n XᵀX (dead inputs: H_ii = 1, W[:, i] = 0) + λ · mean(diag H) · I;  U = chol(H⁻¹) upper
//   for each block of B columns (lazy batch updates):
//     for each column c:  (when a group starts: fit its grid to the current, updated weights)
//                         ŵ_c = grid(w_c);  err = (w_c − ŵ_c) / U_cc
//                         w_{c+1..block end} −= err · U_{c, c+1..}
//     W[:, later blocks] −= Err · U[block, later blocks]           (one GEMM)
//
// act_order: columns are visited by descending H_ii and restored at the end; the grids are then
// fitted up-front ("static groups") so that column c keeps group c / group in IntCodes.
// Weights that are exactly 0 on entry (pruned) are fixed at 0: their code is the zero point, their
// current value is fed back as error like any rounding error, and they do not shape the grids.
// Rows are independent (they share U): the in-block work runs one row per thread.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "mopt/backend/cpu/gemm.hpp"
#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/compress/cholesky.hpp"
#include "mopt/compress/codes.hpp"
#include "mopt/compress/input_stats.hpp"
#include "mopt/compress/rtn.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

// Quantises w [out, in] by GPTQ over the statistics of its inputs; w is overwritten with the
// dequantised values. `what` names the layer.
inline IntCodes quantize_gptq(Tensor& w, const InputStats& stats, const QuantSpec& spec,
                              const std::string& what = "weight") {
    detail::check_weight(w, what, "GPTQ");
    const std::int64_t out = w.dim(0), in = w.dim(1);
    spec.validate(what, in);
    require_stats(&stats, in, what, "GPTQ");
    const std::int64_t group = spec.group_size(in), groups = in / group;

    // Blocks start where groups start (a group's grid is fitted from fully updated weights): a
    // multiple of the group, or a divisor of it when groups are longer than a block.
    std::int64_t block = std::min(spec.block, in);
    if (!spec.act_order) {
        if (group <= block) block = block / group * group;
        else
            while (group % block != 0) --block;
    }

    const Eigen::MatrixXd h = stats.hessian_f64(0.0);
    const std::vector<bool> dead = stats.dead_columns();
    std::vector<std::int64_t> perm(static_cast<std::size_t>(in));
    std::iota(perm.begin(), perm.end(), 0);
    if (spec.act_order)
        std::stable_sort(perm.begin(), perm.end(), [&](std::int64_t a, std::int64_t b) { return h(a, a) > h(b, b); });

    // Permuted working copy, its fixed-zero mask, and the permuted Hessian.
    const float* W0 = w.f32();
    std::vector<float> wp(static_cast<std::size_t>(out * in));
    std::vector<char> fixed(static_cast<std::size_t>(out * in));
    for (std::int64_t r = 0; r < out; ++r)
        for (std::int64_t i = 0; i < in; ++i) {
            const std::int64_t c = perm[static_cast<std::size_t>(i)];
            const float v = dead[static_cast<std::size_t>(c)] ? 0.0f : W0[r * in + c];
            wp[static_cast<std::size_t>(r * in + i)] = v;
            fixed[static_cast<std::size_t>(r * in + i)] = v == 0.0f;
        }
    Eigen::MatrixXd hp(in, in);
    for (std::int64_t i = 0; i < in; ++i)
        for (std::int64_t j = 0; j < in; ++j) hp(i, j) = h(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
    const std::vector<float> u = inverse_cholesky_upper(hp, spec.damp, what);

    std::vector<QuantGrid> grids(static_cast<std::size_t>(out * groups));
    if (spec.act_order) {  // static groups over the original column order
        for (std::int64_t r = 0; r < out; ++r)
            for (std::int64_t g = 0; g < groups; ++g) {
                std::vector<float> vals;
                for (std::int64_t c = g * group; c < (g + 1) * group; ++c)
                    if (!dead[static_cast<std::size_t>(c)] && W0[r * in + c] != 0.0f) vals.push_back(W0[r * in + c]);
                grids[static_cast<std::size_t>(r * groups + g)] =
                    QuantGrid::fit(vals.data(), static_cast<std::int64_t>(vals.size()), spec.bits);
            }
    }

    std::vector<std::uint8_t> qp(static_cast<std::size_t>(out * in));
    std::vector<float> err(static_cast<std::size_t>(out * block));
    for (std::int64_t i1 = 0; i1 < in; i1 += block) {
        const std::int64_t i2 = std::min(i1 + block, in), count = i2 - i1;
        backend::cpu::parallel_for(out, count * count, [&](std::int64_t r) {
            float* wr = wp.data() + r * in;
            const char* fr = fixed.data() + r * in;
            float* er = err.data() + r * count;
            for (std::int64_t i = i1; i < i2; ++i) {
                const std::int64_t c = perm[static_cast<std::size_t>(i)];
                QuantGrid& grid = grids[static_cast<std::size_t>(r * groups + c / group)];
                if (!spec.act_order && c % group == 0) grid = QuantGrid::fit(wr + i, group, spec.bits, fr + i);
                const float* ui = u.data() + i * in;
                const std::uint8_t q = fr[i] ? static_cast<std::uint8_t>(grid.zero) : grid.code(wr[i]);
                const float v = grid.value(q);  // exactly 0 for a fixed zero
                const float e = (wr[i] - v) / ui[i];
                wr[i] = v;
                qp[static_cast<std::size_t>(r * in + i)] = q;
                er[i - i1] = e;
                if (e != 0.0f)
                    for (std::int64_t j = i + 1; j < i2; ++j) wr[j] -= e * ui[j];
            }
        });
        if (i2 < in)
            backend::cpu::gemm({.trans_a = false, .trans_b = false, .m = out, .n = in - i2, .k = count, .alpha = -1.0f,
                                .beta = 1.0f, .a = err.data(), .lda = count, .b = u.data() + i1 * in + i2, .ldb = in,
                                .c = wp.data() + i2, .ldc = in});
    }

    IntCodes codes = detail::empty_codes(out, in, spec.bits, group);
    float* W = w.f32();
    for (std::int64_t r = 0; r < out; ++r) {
        for (std::int64_t i = 0; i < in; ++i) {
            const std::int64_t c = perm[static_cast<std::size_t>(i)];
            codes.q[static_cast<std::size_t>(r * in + c)] = qp[static_cast<std::size_t>(r * in + i)];
            W[r * in + c] = wp[static_cast<std::size_t>(r * in + i)];
        }
        for (std::int64_t g = 0; g < groups; ++g) {
            const auto gi = static_cast<std::size_t>(r * groups + g);
            codes.scale[gi] = grids[gi].scale;
            codes.zero[gi] = grids[gi].zero;
        }
    }
    return codes;
}

}  // namespace mopt::compress
