#pragma once
// PackedQuant: IntCodes (codes.hpp) stored the way a kernel reads them. The b-bit codes of a row
// are bit-packed into 32-bit words, floor(32 / b) codes a word, lowest bits first, each row padded
// to whole words (int8: 4 a word, int4: 8, int3: 10, int2: 16 — the GPTQ "qweight" layout, per row
// instead of per column). Beside them one f32 scale and zero per group of `group` input columns,
// and the optional f32 outlier columns of LLM.int8():
//
//   ŵ[r, c] = scale[r, c / group] · (q[r, c] − zero[r, c / group])  (+ outliers[r, k] if c = cols[k])
//
// int4 at group 128 costs 0.5 + 8/128 bytes a weight (0.14× f32). dequantize_rows() expands a
// block of rows into f32 — the tile the kernels of packed_weight.hpp hand to GEMM.
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/compress/codes.hpp"
#include "mopt/error.hpp"

namespace mopt::compress {

namespace detail {

// Fields of `bits` bits packed floor(32 / bits) to a uint32 word, lowest bits first.
[[nodiscard]] constexpr int fields_per_word(int bits) { return 32 / bits; }
[[nodiscard]] constexpr std::int64_t words_for(std::int64_t fields, int bits) {
    return (fields + fields_per_word(bits) - 1) / fields_per_word(bits);
}

// Packs n fields (each < 2^bits) into words_for(n, bits) words; unused high fields stay 0.
template <class T>
void pack_fields(const T* src, std::int64_t n, int bits, std::uint32_t* words) {
    const int per = fields_per_word(bits);
    for (std::int64_t w = 0; w < words_for(n, bits); ++w) {
        std::uint32_t v = 0;
        for (int j = 0; j < per && w * per + j < n; ++j)
            v |= static_cast<std::uint32_t>(src[w * per + j]) << (j * bits);
        words[w] = v;
    }
}

// Unpacks n fields into dst (converted to T). B is a compile-time width so the inner loop unrolls.
template <int B, class T>
void unpack_fields(const std::uint32_t* words, std::int64_t n, T* dst) {
    constexpr int per = 32 / B;
    constexpr std::uint32_t mask = (1u << B) - 1u;
    const std::int64_t full = n / per;
    for (std::int64_t w = 0; w < full; ++w) {
        const std::uint32_t v = words[w];
        T* d = dst + w * per;
        for (int j = 0; j < per; ++j) d[j] = static_cast<T>((v >> (j * B)) & mask);
    }
    for (std::int64_t i = full * per; i < n; ++i) dst[i] = static_cast<T>((words[full] >> ((i - full * per) * B)) & mask);
}
template <class T>
void unpack_fields(const std::uint32_t* words, std::int64_t n, int bits, T* dst) {
    switch (bits) {
        case 1: return unpack_fields<1>(words, n, dst);
        case 2: return unpack_fields<2>(words, n, dst);
        case 3: return unpack_fields<3>(words, n, dst);
        case 4: return unpack_fields<4>(words, n, dst);
        case 5: return unpack_fields<5>(words, n, dst);
        case 6: return unpack_fields<6>(words, n, dst);
        case 7: return unpack_fields<7>(words, n, dst);
        case 8: return unpack_fields<8>(words, n, dst);
        default: check(false, "unpack_fields: ", bits, "-bit fields are not supported (1..8)");
    }
}

// Whether the bits of a row's words beyond its n fields (padding) are all zero.
[[nodiscard]] inline bool padding_is_zero(const std::uint32_t* words, std::int64_t n, int bits) {
    const int per = fields_per_word(bits);
    const std::int64_t nw = words_for(n, bits);
    if (nw == 0) return true;
    const std::int64_t used = n - (nw - 1) * per;  // fields used in the last word
    const int used_bits = static_cast<int>(used) * bits;
    const std::uint32_t keep = used_bits >= 32 ? 0xffffffffu : ((1u << used_bits) - 1u);
    return (words[nw - 1] & ~keep) == 0;
}

}  // namespace detail

struct PackedQuant {
    std::int64_t out = 0, in = 0;
    int bits = 4;
    std::int64_t group = 0;
    std::vector<std::uint32_t> qweight;      // [out, words_per_row()]
    std::vector<float> scales, zeros;        // [out, groups_per_row()]
    std::vector<std::int32_t> outlier_cols;  // ascending input columns kept in f32
    std::vector<float> outliers;             // [out, outlier_cols.size()]

    [[nodiscard]] std::int64_t words_per_row() const { return detail::words_for(in, bits); }
    [[nodiscard]] std::int64_t groups_per_row() const { return group > 0 ? in / group : 0; }
    [[nodiscard]] std::int64_t num_outliers() const { return static_cast<std::int64_t>(outlier_cols.size()); }
    [[nodiscard]] std::size_t bytes() const {
        return 4 * (qweight.size() + scales.size() + zeros.size() + outlier_cols.size() + outliers.size());
    }

    static PackedQuant pack(const IntCodes& codes) {
        codes.validate("PackedQuant::pack");
        PackedQuant p;
        p.out = codes.out;
        p.in = codes.in;
        p.bits = codes.bits;
        p.group = codes.group;
        p.qweight.assign(static_cast<std::size_t>(p.out * p.words_per_row()), 0u);
        for (std::int64_t r = 0; r < p.out; ++r)
            detail::pack_fields(codes.q.data() + r * p.in, p.in, p.bits, p.qweight.data() + r * p.words_per_row());
        p.scales = codes.scale;
        p.zeros = codes.zero;
        p.outlier_cols = codes.outlier_cols;
        if (!p.outlier_cols.empty()) p.outliers.assign(codes.outliers.f32(), codes.outliers.f32() + codes.outliers.numel());
        p.validate("PackedQuant::pack");
        return p;
    }

    // The invariants the kernels rely on; a checkpoint that breaks one is an error naming `what`.
    void validate(const std::string& what) const {
        check(bits >= 2 && bits <= 8, what, ": ", bits, "-bit codes are not supported (2..8)");
        check(out > 0 && in > 0, what, ": empty matrix [", out, ", ", in, "]");
        check(group > 0 && in % group == 0, what, ": group size ", group, " does not divide the row length ", in);
        const auto words = static_cast<std::size_t>(out * words_per_row()), ng = static_cast<std::size_t>(out * groups_per_row());
        check(qweight.size() == words, what, ".qweight: ", qweight.size(), " words, expected ", words);
        check(scales.size() == ng, what, ".scales: ", scales.size(), " values, expected ", ng);
        check(zeros.size() == ng, what, ".zeros: ", zeros.size(), " values, expected ", ng);
        for (std::int64_t r = 0; r < out; ++r)
            check(detail::padding_is_zero(qweight.data() + r * words_per_row(), in, bits), what,
                  ".qweight: row ", r, " has bits set beyond its ", in, " codes");
        const float levels = static_cast<float>(1 << bits);
        for (std::size_t g = 0; g < ng; ++g) {
            check(std::isfinite(scales[g]), what, ".scales: value ", scales[g], " at ", g, " is not finite");
            check(zeros[g] >= 0.0f && zeros[g] < levels && zeros[g] == std::floor(zeros[g]), what, ".zeros: ",
                  zeros[g], " at ", g, " is not an integer code in [0, ", levels, ")");
        }
        for (std::size_t k = 0; k < outlier_cols.size(); ++k)
            check(outlier_cols[k] >= 0 && outlier_cols[k] < in && (k == 0 || outlier_cols[k] > outlier_cols[k - 1]),
                  what, ".outlier_cols: column ", outlier_cols[k], " at ", k, " is out of [0, ", in,
                  ") or not ascending");
        check(outliers.size() == outlier_cols.size() * static_cast<std::size_t>(out), what, ".outliers: ",
              outliers.size(), " values, expected ", outlier_cols.size() * static_cast<std::size_t>(out));
    }

    // Rows [r0, r1) as f32 into dst ([r1 - r0, in], row-major).
    void dequantize_rows(std::int64_t r0, std::int64_t r1, float* dst) const {
        const std::int64_t wpr = words_per_row(), gpr = groups_per_row(), no = num_outliers();
        for (std::int64_t r = r0; r < r1; ++r) {
            float* d = dst + (r - r0) * in;
            detail::unpack_fields(qweight.data() + r * wpr, in, bits, d);
            for (std::int64_t g = 0; g < gpr; ++g) {
                const float s = scales[static_cast<std::size_t>(r * gpr + g)], z = zeros[static_cast<std::size_t>(r * gpr + g)];
                float* dg = d + g * group;
                for (std::int64_t c = 0; c < group; ++c) dg[c] = s * (dg[c] - z);
            }
            for (std::int64_t k = 0; k < no; ++k) d[outlier_cols[static_cast<std::size_t>(k)]] += outliers[static_cast<std::size_t>(r * no + k)];
        }
    }
};

}  // namespace mopt::compress
