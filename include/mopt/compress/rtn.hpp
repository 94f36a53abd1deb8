#pragma once
// Round-to-nearest (RTN) weight quantisation to b bits, one asymmetric min/max grid per group of
// `group` consecutive input columns of a row (the grid GPTQ also uses, Frantar et al. 2022):
//
//   min = min(0, min w), max = max(0, max w)      (0 stays on the grid: a pruned weight stays 0)
//   scale = (max − min) / (2^b − 1)   (1 when max = min = 0)
//   zero  = clamp(round(−min / scale), 0, 2^b − 1)
//   q     = clamp(round(w / scale) + zero, 0, 2^b − 1),    ŵ = scale · (q − zero)
//
// so |w − ŵ| ≤ scale / 2 for every weight of the group.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/compress/codes.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

struct QuantSpec {
    int bits = 4;               // 2..8
    std::int64_t group = 128;   // input columns per scale/zero; 0 = one group per row
    bool act_order = false;     // GPTQ: columns in order of descending H_ii (static groups)
    double damp = 0.01;         // GPTQ: H += damp · mean(diag H) · I
    std::int64_t block = 128;   // GPTQ: columns per lazy batch update

    // The group size for rows of length `in` (group = 0 means in).
    [[nodiscard]] std::int64_t group_size(std::int64_t in) const { return group == 0 ? in : group; }

    // `what` names the layer in the error.
    void validate(const std::string& what, std::int64_t in) const {
        check(bits >= 2 && bits <= 8, what, ": ", bits, "-bit quantisation is not supported (2..8)");
        check(in > 0, what, ": cannot quantise rows of length ", in);
        check(group >= 0 && (group == 0 || in % group == 0), what, ": quantisation group size ", group,
              " does not divide the row length ", in);
        check(damp >= 0.0 && std::isfinite(damp), what, ": GPTQ damping ", damp, " must be finite and >= 0");
        check(block >= 1, what, ": GPTQ block size ", block, " must be positive");
    }
};

// The grid of one group.
struct QuantGrid {
    float scale = 1.0f, zero = 0.0f;
    int maxq = 15;

    // Fits the grid to the n values w[0..n), skipping those with skip[i] set (skip may be null).
    static QuantGrid fit(const float* w, std::int64_t n, int bits, const char* skip = nullptr) {
        float mn = 0.0f, mx = 0.0f;
        for (std::int64_t i = 0; i < n; ++i)
            if (!skip || !skip[i]) {
                mn = std::min(mn, w[i]);
                mx = std::max(mx, w[i]);
            }
        QuantGrid g;
        g.maxq = (1 << bits) - 1;
        g.scale = (mx - mn) / static_cast<float>(g.maxq);
        if (!(g.scale > 0.0f)) g.scale = 1.0f;
        g.zero = std::clamp(std::nearbyint(-mn / g.scale), 0.0f, static_cast<float>(g.maxq)) + 0.0f;  // no -0
        return g;
    }
    [[nodiscard]] std::uint8_t code(float w) const {
        return static_cast<std::uint8_t>(std::clamp(std::nearbyint(w / scale) + zero, 0.0f, static_cast<float>(maxq)));
    }
    // The same expression as IntCodes::value, so the overwritten weight equals the codes' value.
    [[nodiscard]] float value(std::uint8_t q) const { return scale * (static_cast<float>(q) - zero); }
};

namespace detail {
inline void check_weight(const Tensor& w, const std::string& what, const char* method) {
    check(w.rank() == 2 && w.dtype() == DType::f32 && w.numel() > 0, what, ": ", method,
          " quantises a non-empty f32 matrix [out, in], got ", w.shape(), " ", name(w.dtype()));
}
inline IntCodes empty_codes(std::int64_t out, std::int64_t in, int bits, std::int64_t group) {
    IntCodes codes;
    codes.out = out;
    codes.in = in;
    codes.bits = bits;
    codes.group = group;
    codes.q.assign(static_cast<std::size_t>(out * in), 0);
    codes.scale.assign(static_cast<std::size_t>(out * (in / group)), 1.0f);
    codes.zero.assign(static_cast<std::size_t>(out * (in / group)), 0.0f);
    return codes;
}
}  // namespace detail

// Quantises w [out, in] by RTN; w is overwritten with the dequantised values. `what` names the layer.
inline IntCodes quantize_rtn(Tensor& w, const QuantSpec& spec, const std::string& what = "weight") {
    detail::check_weight(w, what, "RTN");
    const std::int64_t out = w.dim(0), in = w.dim(1);
    spec.validate(what, in);
    const std::int64_t group = spec.group_size(in), groups = in / group;
    IntCodes codes = detail::empty_codes(out, in, spec.bits, group);
    float* W = w.f32();
    backend::cpu::parallel_for(out, in * 4, [&](std::int64_t r) {
        for (std::int64_t g = 0; g < groups; ++g) {
            float* wg = W + r * in + g * group;
            const QuantGrid grid = QuantGrid::fit(wg, group, spec.bits);
            const auto gi = static_cast<std::size_t>(r * groups + g);
            codes.scale[gi] = grid.scale;
            codes.zero[gi] = grid.zero;
            for (std::int64_t c = 0; c < group; ++c) {
                const std::uint8_t q = grid.code(wg[c]);
                codes.q[static_cast<std::size_t>(r * in + g * group + c)] = q;
                wg[c] = grid.value(q);
            }
        }
    });
    return codes;
}

}  // namespace mopt::compress
