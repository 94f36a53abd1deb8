#pragma once
// IntCodes: a weight matrix quantised to b-bit integer codes with a scale and a zero point per group
// of consecutive input columns of a row — what the quantisers (rtn.hpp, gptq.hpp, int8.hpp) produce
// and what the packed storage (packed_quant.hpp) stores.
//
//   ŵ[r, c] = scale[r, g] · (q[r, c] − zero[r, g]),   g = c / group
//
// int8 absmax (LLM.int8() vector-wise) is the symmetric case: bits = 8, one group per row
// (group = in), zero = 128, q = round(w / scale) + 128 with scale = absmax / 127. int2–int4 are
// asymmetric (GPTQ's min/max grid, 0 kept inside [min, max] so that a pruned weight stays exactly 0).
// LLM.int8()'s outlier decomposition keeps whole input columns in f32 beside the codes; their codes
// are the zero point (they contribute 0 through the quantised part).
#include <cstdint>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

struct IntCodes {
    std::int64_t out = 0, in = 0;  // the matrix is [out, in]
    int bits = 4;                  // 2..8
    std::int64_t group = 0;        // input columns sharing one scale/zero; divides `in`
    std::vector<std::uint8_t> q;   // [out * in] codes in [0, 2^bits)
    std::vector<float> scale;      // [out * in / group]
    std::vector<float> zero;       // [out * in / group] integer-valued zero points in [0, 2^bits)
    std::vector<std::int32_t> outlier_cols;  // ascending input columns kept in f32 (LLM.int8())
    Tensor outliers;                         // [out, outlier_cols.size()] f32, or empty

    [[nodiscard]] std::int64_t groups_per_row() const { return group > 0 ? in / group : 0; }

    // The value the codes stand for (outlier columns included).
    [[nodiscard]] float value(std::int64_t r, std::int64_t c) const {
        const std::int64_t g = r * groups_per_row() + c / group;
        float v = scale[static_cast<std::size_t>(g)] *
                  (static_cast<float>(q[static_cast<std::size_t>(r * in + c)]) - zero[static_cast<std::size_t>(g)]);
        for (std::size_t k = 0; k < outlier_cols.size(); ++k)
            if (outlier_cols[k] == c) v += outliers.f32()[r * static_cast<std::int64_t>(outlier_cols.size()) +
                                                          static_cast<std::int64_t>(k)];
        return v;
    }

    // Checks the invariants the packers and kernels rely on; `what` names the layer.
    void validate(const std::string& what) const {
        check(bits >= 2 && bits <= 8, what, ": ", bits, "-bit codes are not supported (2..8)");
        check(out > 0 && in > 0, what, ": empty matrix [", out, ", ", in, "]");
        check(group > 0 && in % group == 0, what, ": group size ", group, " does not divide the row length ", in);
        const auto n = static_cast<std::size_t>(out * in), ng = static_cast<std::size_t>(out * (in / group));
        check(q.size() == n && scale.size() == ng && zero.size() == ng, what, ": codes/scales/zeros have sizes ",
              q.size(), "/", scale.size(), "/", zero.size(), ", expected ", n, "/", ng, "/", ng);
        const int levels = 1 << bits;
        for (std::uint8_t v : q) check(v < levels, what, ": code ", int(v), " does not fit in ", bits, " bits");
        check(outlier_cols.empty() || (outliers.rank() == 2 && outliers.dim(0) == out &&
                                       outliers.dim(1) == static_cast<std::int64_t>(outlier_cols.size())),
              what, ": outlier matrix does not match its ", outlier_cols.size(), " columns");
    }
};

}  // namespace mopt::compress
