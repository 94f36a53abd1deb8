#pragma once
// Shared helpers of the op files: shape checks that name the op and both shapes.
#include "mopt/autodiff/tape.hpp"
#include "mopt/backend/cpu/parallel.hpp"

namespace mopt::autodiff::ops_detail {

using backend::cpu::parallel_chunks;
using backend::cpu::parallel_for;

inline void expect_same(const char* op, const Tensor& a, const Tensor& b) {
    check(a.shape() == b.shape(), op, ": shape mismatch ", a.shape(), " vs ", b.shape());
}
inline void expect_rank(const char* op, const Tensor& t, int rank, const char* what) {
    check(t.rank() == rank, op, ": ", what, " must be ", rank, "-D, got shape ", t.shape());
}
inline void expect_dtype(const char* op, const Tensor& t, DType d, const char* what) {
    check(t.dtype() == d, op, ": ", what, " must be ", name(d), ", got ", name(t.dtype()), " of shape ", t.shape());
}
// dst[i] += src[i] for i in [0, n), parallel for large n.
inline void add_into(float* dst, const float* src, std::int64_t n) {
    parallel_chunks(n, [&](std::int64_t b, std::int64_t e) {
        for (std::int64_t i = b; i < e; ++i) dst[i] += src[i];
    });
}

}  // namespace mopt::autodiff::ops_detail
