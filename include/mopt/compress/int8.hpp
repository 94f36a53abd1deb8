#pragma once
// int8 absmax weight quantisation with LLM.int8()'s outlier decomposition (Dettmers et al. 2022,
// "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"):
//
//   per output row r:  scale_r = max_c |W_rc| / 127 (1 for an all-zero row),
//                      q = round(W_rc / scale_r) + 128,   ŵ = scale_r · (q − 128)
//   so |w − ŵ| ≤ max|W_r| / 254.
//
// Outliers: with a threshold > 0 and calibration statistics, the input columns whose activations
// reached max|x| >= threshold (LLM.int8() uses 6.0) stay f32 in IntCodes::outliers, their codes are
// the zero point, and the row scales are taken over the other columns only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/compress/codes.hpp"
#include "mopt/compress/input_stats.hpp"
#include "mopt/compress/rtn.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

// Quantises w [out, in] to int8 codes; w is overwritten with the values the codes stand for
// (outlier columns keep their exact weights). `what` names the layer.
inline IntCodes quantize_int8(Tensor& w, const InputStats* stats = nullptr, float outlier_threshold = 0.f,
                              const std::string& what = "weight") {
    detail::check_weight(w, what, "int8");
    const std::int64_t out = w.dim(0), in = w.dim(1);
    check(outlier_threshold >= 0.0f && std::isfinite(outlier_threshold), what, ": int8 outlier threshold ",
          outlier_threshold, " must be finite and >= 0 (0 = no outliers)");
    std::vector<char> outlier(static_cast<std::size_t>(in), 0);
    IntCodes codes = detail::empty_codes(out, in, 8, in);
    if (outlier_threshold > 0.0f) {
        const std::vector<float> amax = require_stats(stats, in, what, "int8 outlier detection").column_absmax();
        for (std::int64_t c = 0; c < in; ++c)
            if (amax[static_cast<std::size_t>(c)] >= outlier_threshold) {
                outlier[static_cast<std::size_t>(c)] = 1;
                codes.outlier_cols.push_back(static_cast<std::int32_t>(c));
            }
    }
    const auto n_out = static_cast<std::int64_t>(codes.outlier_cols.size());
    if (n_out > 0) codes.outliers = Tensor::empty({out, n_out});

    float* W = w.f32();
    for (std::int64_t r = 0; r < out; ++r) {
        float* wr = W + r * in;
        float amax = 0.0f;
        for (std::int64_t c = 0; c < in; ++c)
            if (!outlier[static_cast<std::size_t>(c)]) amax = std::max(amax, std::fabs(wr[c]));
        QuantGrid grid;
        grid.maxq = 255;
        grid.zero = 128.0f;
        grid.scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        codes.scale[static_cast<std::size_t>(r)] = grid.scale;
        codes.zero[static_cast<std::size_t>(r)] = grid.zero;
        std::int64_t k = 0;
        for (std::int64_t c = 0; c < in; ++c) {
            std::uint8_t q = 128;
            if (outlier[static_cast<std::size_t>(c)]) codes.outliers.f32()[r * n_out + k++] = wr[c];
            else {
                q = grid.code(wr[c]);
                wr[c] = grid.value(q);
            }
            codes.q[static_cast<std::size_t>(r * in + c)] = q;
        }
    }
    return codes;
}

}  // namespace mopt::compress
