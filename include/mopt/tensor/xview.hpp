#pragma once
// xtensor's role behind the tensor: non-owning adaptors for element-wise expressions and
// reductions (xt::adapt over the tensor's buffer; nothing is copied).
#include <array>
#include <cstddef>

#include <xtensor/xadapt.hpp>
#include <xtensor/xmath.hpp>
#include <xtensor/xnoalias.hpp>
#include <xtensor/xtensor.hpp>
#include <xtensor/xview.hpp>

#include "mopt/tensor/tensor.hpp"

namespace mopt {

// Elements [begin, end) of a tensor as a 1-D xtensor expression.
inline auto flat(float* p, std::int64_t begin, std::int64_t end) {
    return xt::adapt(p + begin, static_cast<std::size_t>(end - begin), xt::no_ownership(),
                     std::array<std::size_t, 1>{static_cast<std::size_t>(end - begin)});
}
inline auto flat(const float* p, std::int64_t begin, std::int64_t end) {
    return flat(const_cast<float*>(p), begin, end);
}
inline auto flat(Tensor& t) { return flat(t.f32(), 0, t.numel()); }
inline auto flat(const Tensor& t) { return flat(t.f32(), 0, t.numel()); }

// A tensor as a 2-D [rows, last extent] xtensor expression (rows of [begin, end)).
inline auto rows_of(const float* p, std::int64_t begin, std::int64_t end, std::int64_t cols) {
    return xt::adapt(const_cast<float*>(p) + begin * cols, static_cast<std::size_t>((end - begin) * cols),
                     xt::no_ownership(),
                     std::array<std::size_t, 2>{static_cast<std::size_t>(end - begin), static_cast<std::size_t>(cols)});
}
inline auto rows_of(const Tensor& t) { return rows_of(t.f32(), 0, t.shape().rows(), t.shape().back()); }

}  // namespace mopt
