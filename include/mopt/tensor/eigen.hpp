#pragma once
// Eigen's role behind the tensor: matrix views (Map) for GEMM. Rows may be strided (a head's
// slice of a [T, H*Dh] activation), columns are contiguous.
#include <Eigen/Core>

#include "mopt/tensor/tensor.hpp"

namespace mopt {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMatrixMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

// Row-major [rows, cols] view with leading dimension ld (>= cols).
inline MatrixMap matrix(float* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
    return {p, rows, cols, Eigen::OuterStride<>(ld)};
}
inline ConstMatrixMap matrix(const float* p, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
    return {p, rows, cols, Eigen::OuterStride<>(ld)};
}
// A tensor seen as [rows, last extent].
inline MatrixMap matrix(Tensor& t) { return matrix(t.f32(), t.shape().rows(), t.shape().back(), t.shape().back()); }
inline ConstMatrixMap matrix(const Tensor& t) {
    return matrix(t.f32(), t.shape().rows(), t.shape().back(), t.shape().back());
}

}  // namespace mopt
