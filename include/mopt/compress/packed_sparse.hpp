#pragma once
// PackedSparse: an unstructured sparse weight (magnitude or SparseGPT pruning without a pattern)
// in compressed sparse row form — per output row its non-zeros as f32 values and uint16 input
// columns (so in <= 65535), plus int32 row offsets:
//
//   ŵ[r, cols[j]] = values[j]   for j in [row_ptr[r], row_ptr[r + 1])
//
// 6 bytes a non-zero + 4 a row: smaller than dense f32 only below ~2/3 density (smaller_than_dense).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

struct PackedSparse {
    static constexpr std::int64_t max_in = std::numeric_limits<std::uint16_t>::max();

    std::int64_t out = 0, in = 0;
    std::vector<float> values;          // [nnz]
    std::vector<std::uint16_t> cols;    // [nnz], ascending within a row
    std::vector<std::int32_t> row_ptr;  // [out + 1], row_ptr[0] = 0, row_ptr[out] = nnz

    [[nodiscard]] std::int64_t nnz() const { return static_cast<std::int64_t>(values.size()); }
    [[nodiscard]] static std::size_t bytes_for(std::int64_t nnz, std::int64_t out) {
        return static_cast<std::size_t>(6 * nnz + 4 * (out + 1));
    }
    [[nodiscard]] std::size_t bytes() const { return bytes_for(nnz(), out); }

    // Whether CSR storage of w takes fewer bytes than dense f32.
    [[nodiscard]] static bool smaller_than_dense(const Tensor& w) {
        check(w.rank() == 2 && w.dtype() == DType::f32, "PackedSparse: weight must be a 2-D f32 matrix, got ", w.shape());
        const auto nz = static_cast<std::int64_t>(std::count_if(w.span().begin(), w.span().end(), [](float v) { return v != 0.0f; }));
        return bytes_for(nz, w.dim(0)) < w.bytes();
    }

    static PackedSparse pack(const Tensor& w) {
        check(w.rank() == 2 && w.dtype() == DType::f32, "PackedSparse::pack: weight must be a 2-D f32 matrix, got ",
              w.shape(), " ", name(w.dtype()));
        PackedSparse p;
        p.out = w.dim(0);
        p.in = w.dim(1);
        check(p.out > 0 && p.in > 0, "PackedSparse::pack: empty matrix ", w.shape());
        check(p.in <= max_in, "PackedSparse::pack: rows of ", p.in, " columns do not fit uint16 column indices (max ",
              max_in, ")");
        p.row_ptr.reserve(static_cast<std::size_t>(p.out + 1));
        p.row_ptr.push_back(0);
        const float* src = w.f32();
        for (std::int64_t r = 0; r < p.out; ++r) {
            for (std::int64_t c = 0; c < p.in; ++c)
                if (src[r * p.in + c] != 0.0f) {
                    p.values.push_back(src[r * p.in + c]);
                    p.cols.push_back(static_cast<std::uint16_t>(c));
                }
            check(p.values.size() <= static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
                  "PackedSparse::pack: more than 2^31 non-zeros");
            p.row_ptr.push_back(static_cast<std::int32_t>(p.values.size()));
        }
        return p;
    }

    // The invariants the kernels rely on: offsets monotone and in range, columns < in and ascending.
    void validate(const std::string& what) const {
        check(out > 0 && in > 0 && in <= max_in, what, ": matrix [", out, ", ", in, "] is empty or has more than ",
              max_in, " columns");
        check(row_ptr.size() == static_cast<std::size_t>(out + 1), what, ".row_ptr: ", row_ptr.size(), " offsets, expected ",
              out + 1);
        check(cols.size() == values.size(), what, ".col_idx: ", cols.size(), " indices for ", values.size(), " values");
        check(row_ptr[0] == 0 && row_ptr[static_cast<std::size_t>(out)] == nnz(), what, ".row_ptr: must run from 0 to nnz = ",
              nnz(), ", runs from ", row_ptr[0], " to ", row_ptr[static_cast<std::size_t>(out)]);
        for (std::int64_t r = 0; r < out; ++r)
            check(row_ptr[static_cast<std::size_t>(r)] <= row_ptr[static_cast<std::size_t>(r + 1)], what,
                  ".row_ptr: offsets ", row_ptr[static_cast<std::size_t>(r)], " -> ",
                  row_ptr[static_cast<std::size_t>(r + 1)], " of row ", r, " are not monotone");
        for (std::int64_t r = 0; r < out; ++r) {
            const std::int32_t b = row_ptr[static_cast<std::size_t>(r)], e = row_ptr[static_cast<std::size_t>(r + 1)];
            for (std::int32_t j = b; j < e; ++j)
                check(cols[static_cast<std::size_t>(j)] < in && (j == b || cols[static_cast<std::size_t>(j)] > cols[static_cast<std::size_t>(j - 1)]),
                      what, ".col_idx: column ", cols[static_cast<std::size_t>(j)], " in row ", r, " is out of [0, ", in,
                      ") or not ascending");
        }
    }

    // Rows [r0, r1) as f32 into dst ([r1 - r0, in], row-major).
    void dequantize_rows(std::int64_t r0, std::int64_t r1, float* dst) const {
        for (std::int64_t r = r0; r < r1; ++r) {
            float* d = dst + (r - r0) * in;
            std::fill_n(d, in, 0.0f);
            for (std::int32_t j = row_ptr[static_cast<std::size_t>(r)]; j < row_ptr[static_cast<std::size_t>(r + 1)]; ++j)
                d[cols[static_cast<std::size_t>(j)]] = values[static_cast<std::size_t>(j)];
        }
    }
};

}  // namespace mopt::compress
