#pragma once
// What the compression tests share: synthetic calibration activations shaped like an LLM's
// (correlated features, a spread of scales, outlier columns) and the relative output error that
// the compressors minimise. random_tensor comes from test_util.hpp.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <mopt/tensor/eigen.hpp>
#include <mopt/tensor/tensor.hpp>

#include "test_util.hpp"

namespace mopt::test {

// Correlated activations X [n, in]: Z · A (Gaussian Z, random mixing A), columns scaled by factors
// in [1/√10, √10], and every 17th column 5x larger (the outlier features LLMs show).
inline Tensor correlated_inputs(std::int64_t n, std::int64_t in, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> g(0.0f, 1.0f);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> a(static_cast<std::size_t>(in * in)), scale(static_cast<std::size_t>(in));
    for (auto& v : a) v = u(rng);
    for (std::int64_t j = 0; j < in; ++j)
        scale[static_cast<std::size_t>(j)] = std::pow(10.0f, 0.5f * u(rng)) * (j % 17 == 3 ? 5.0f : 1.0f);
    Tensor z = Tensor::empty({n, in}), x = Tensor::zeros({n, in});
    for (auto& v : z.span()) v = g(rng);
    mopt::matrix(x).noalias() = mopt::matrix(z) * mopt::matrix(a.data(), in, in, in);
    for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t j = 0; j < in; ++j) x.f32()[r * in + j] *= scale[static_cast<std::size_t>(j)] / std::sqrt(float(in));
    return x;
}

// ‖X Wᵀ − X Ŵᵀ‖_F relative to ‖X Wᵀ‖_F.
inline double output_error(const Tensor& x, const Tensor& w, const Tensor& w_hat) {
    const auto X = mopt::matrix(x).cast<double>();
    const auto W = mopt::matrix(w).cast<double>();
    const auto Wh = mopt::matrix(w_hat).cast<double>();
    return (X * (W - Wh).transpose()).norm() / (X * W.transpose()).norm();
}

}  // namespace mopt::test
