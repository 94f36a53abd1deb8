#pragma once
// PackedNM: an N:M sparse weight (N of every M consecutive input columns of a row are zero — 2:4
// is what sparse tensor cores accelerate; Mishra et al. 2021, SparseGPT) stored as its K = M − N
// kept values per group, in f32, and their positions inside the group as ceil(log2 M)-bit fields
// packed into uint32 words per row (2:4: two 2-bit indices a group). 2:4 costs 8 bytes of values
// + 4 bits of indices per 4 weights: 0.53× f32.
//
//   ŵ[r, g·M + idx[r, g, k]] = values[r, g, k]   (k < K; every other entry is 0)
//
// Built from a dense matrix that already has the pattern (a pruner makes it); a group with more
// than K non-zeros is an error naming the row and group. Kept positions are strictly ascending in
// a group; a group with fewer non-zeros keeps some zeros so that every group has K entries.
#include <bit>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/compress/packed_quant.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

struct PackedNM {
    std::int64_t out = 0, in = 0;
    int n = 2, m = 4;                    // n of every m are zero; k = m - n are kept
    std::vector<float> values;           // [out, groups_per_row() * kept()]
    std::vector<std::uint32_t> indices;  // [out, index_words_per_row()], index_bits() each

    [[nodiscard]] int kept() const { return m - n; }
    [[nodiscard]] int index_bits() const { return m <= 2 ? 1 : std::bit_width(static_cast<unsigned>(m - 1)); }
    [[nodiscard]] std::int64_t groups_per_row() const { return m > 0 ? in / m : 0; }
    [[nodiscard]] std::int64_t kept_per_row() const { return groups_per_row() * kept(); }
    [[nodiscard]] std::int64_t index_words_per_row() const { return detail::words_for(kept_per_row(), index_bits()); }
    [[nodiscard]] std::size_t bytes() const { return 4 * (values.size() + indices.size()); }

    // w: dense [out, in] with at least n zeros in every group of m consecutive columns of a row.
    static PackedNM pack(const Tensor& w, int n_zero, int m) {
        check(w.rank() == 2 && w.dtype() == DType::f32, "PackedNM::pack: weight must be a 2-D f32 matrix, got ",
              w.shape(), " ", name(w.dtype()));
        PackedNM p;
        p.out = w.dim(0);
        p.in = w.dim(1);
        p.n = n_zero;
        p.m = m;
        p.check_pattern("PackedNM::pack");
        const int k = p.kept();
        const std::int64_t gpr = p.groups_per_row(), kpr = p.kept_per_row();
        p.values.assign(static_cast<std::size_t>(p.out * kpr), 0.0f);
        p.indices.assign(static_cast<std::size_t>(p.out * p.index_words_per_row()), 0u);
        std::vector<std::uint8_t> idx(static_cast<std::size_t>(kpr));
        const float* src = w.f32();
        for (std::int64_t r = 0; r < p.out; ++r) {
            for (std::int64_t g = 0; g < gpr; ++g) {
                const float* grp = src + r * p.in + g * m;
                int nonzero = 0;
                for (int j = 0; j < m; ++j) nonzero += grp[j] != 0.0f;
                check(nonzero <= k, "PackedNM::pack: row ", r, ", group ", g, " (columns ", g * m, "..", g * m + m - 1,
                      ") has ", nonzero, " non-zeros; ", n_zero, ":", m, " sparsity keeps at most ", k);
                int zeros_to_keep = k - nonzero, slot = 0;  // fill up with the first zeros
                for (int j = 0; j < m && slot < k; ++j) {
                    const bool keep = grp[j] != 0.0f || zeros_to_keep-- > 0;
                    if (!keep) continue;
                    p.values[static_cast<std::size_t>(r * kpr + g * k + slot)] = grp[j];
                    idx[static_cast<std::size_t>(g * k + slot)] = static_cast<std::uint8_t>(j);
                    ++slot;
                }
            }
            detail::pack_fields(idx.data(), kpr, p.index_bits(), p.indices.data() + r * p.index_words_per_row());
        }
        return p;
    }

    void check_pattern(const std::string& what) const {
        check(m >= 2 && m <= 256 && n >= 1 && n < m, what, ": ", n, ":", m, " is not a valid N:M pattern (1 <= N < M <= 256)");
        check(out > 0 && in > 0, what, ": empty matrix [", out, ", ", in, "]");
        check(in % m == 0, what, ": the row length ", in, " is not a multiple of M = ", m);
    }

    // The invariants the kernels rely on: sizes, and indices < m strictly ascending in each group.
    void validate(const std::string& what) const {
        check_pattern(what);
        const auto nv = static_cast<std::size_t>(out * kept_per_row()), nw = static_cast<std::size_t>(out * index_words_per_row());
        check(values.size() == nv, what, ".values: ", values.size(), " values, expected ", nv);
        check(indices.size() == nw, what, ".indices: ", indices.size(), " words, expected ", nw);
        const int k = kept();
        std::vector<int> idx(static_cast<std::size_t>(kept_per_row()));
        for (std::int64_t r = 0; r < out; ++r) {
            const std::uint32_t* words = indices.data() + r * index_words_per_row();
            check(detail::padding_is_zero(words, kept_per_row(), index_bits()), what, ".indices: row ", r,
                  " has bits set beyond its ", kept_per_row(), " fields");
            detail::unpack_fields(words, kept_per_row(), index_bits(), idx.data());
            for (std::int64_t g = 0; g < groups_per_row(); ++g)
                for (int j = 0; j < k; ++j) {
                    const int v = idx[static_cast<std::size_t>(g * k + j)];
                    check(v < m && (j == 0 || v > idx[static_cast<std::size_t>(g * k + j - 1)]), what, ".indices: row ", r,
                          ", group ", g, ": index ", v, " is out of [0, ", m, ") or not ascending");
                }
        }
    }

    // Rows [r0, r1) as f32 into dst ([r1 - r0, in], row-major).
    void dequantize_rows(std::int64_t r0, std::int64_t r1, float* dst) const {
        const int k = kept();
        const std::int64_t kpr = kept_per_row(), gpr = groups_per_row();
        thread_local std::vector<std::uint8_t> idx;
        idx.resize(static_cast<std::size_t>(kpr));
        for (std::int64_t r = r0; r < r1; ++r) {
            float* d = dst + (r - r0) * in;
            std::fill_n(d, in, 0.0f);
            detail::unpack_fields(indices.data() + r * index_words_per_row(), kpr, index_bits(), idx.data());
            const float* v = values.data() + r * kpr;
            for (std::int64_t g = 0; g < gpr; ++g)
                for (int j = 0; j < k; ++j) d[g * m + idx[static_cast<std::size_t>(g * k + j)]] = v[g * k + j];
        }
    }
};

}  // namespace mopt::compress
