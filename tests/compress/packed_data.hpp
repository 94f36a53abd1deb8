#pragma once
// Random packed-weight inputs shared by the CPU tests of the packed formats (tests/compress/packed.cpp)
// and the GPU kernels that read them (tests/backend/cuda/packed_gemm.cu): integer codes with
// scales, zero points and LLM.int8() outlier columns, and dense matrices with N:M zeros.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include <mopt/compress/codes.hpp>
#include <mopt/tensor/tensor.hpp>

namespace mopt::test::packed {

// Uniform values in [lo, hi) from a seeded mt19937_64 (the draws of test_util.hpp's random_tensor).
inline Tensor uniform_tensor(Shape shape, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    Tensor t = Tensor::empty(shape);
    for (auto& v : t.span()) v = dist(rng);
    return t;
}

// Random codes, scales and integer zero points; `outlier_cols` adds f32 outlier columns whose
// codes are the zero point (as LLM.int8() stores them).
inline compress::IntCodes random_codes(std::int64_t out, std::int64_t in, int bits, std::int64_t group,
                                       std::uint64_t seed, std::vector<std::int32_t> outlier_cols = {}) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
    std::uniform_real_distribution<float> scale(0.01f, 0.1f);
    compress::IntCodes c;
    c.out = out;
    c.in = in;
    c.bits = bits;
    c.group = group;
    for (std::int64_t i = 0; i < out * in; ++i) c.q.push_back(static_cast<std::uint8_t>(code(rng)));
    for (std::int64_t g = 0; g < out * (in / group); ++g) {
        c.scale.push_back(scale(rng));
        c.zero.push_back(static_cast<float>(code(rng)));
    }
    c.outlier_cols = std::move(outlier_cols);
    if (!c.outlier_cols.empty()) {
        c.outliers = uniform_tensor({out, static_cast<std::int64_t>(c.outlier_cols.size())}, seed + 1, -4.0f, 4.0f);
        for (std::int64_t r = 0; r < out; ++r)
            for (std::int32_t col : c.outlier_cols)
                c.q[static_cast<std::size_t>(r * in + col)] =
                    static_cast<std::uint8_t>(c.zero[static_cast<std::size_t>(r * (in / group) + col / group)]);
    }
    return c;
}

// A dense matrix with n zeros in every group of m (the zeros at random positions).
inline Tensor nm_matrix(std::int64_t out, std::int64_t in, int n, int m, std::uint64_t seed) {
    Tensor w = uniform_tensor({out, in}, seed);
    std::mt19937_64 rng(seed + 1);
    std::vector<int> pos(static_cast<std::size_t>(m));
    for (std::int64_t r = 0; r < out; ++r)
        for (std::int64_t g = 0; g < in / m; ++g) {
            std::iota(pos.begin(), pos.end(), 0);
            std::shuffle(pos.begin(), pos.end(), rng);
            for (int j = 0; j < n; ++j) w.f32()[r * in + g * m + pos[static_cast<std::size_t>(j)]] = 0.0f;
        }
    return w;
}

}  // namespace mopt::test::packed
