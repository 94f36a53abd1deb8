#pragma once
// Helpers shared by the tests: seeded random tensors.
#include <random>

#include <mopt/mopt.hpp>

namespace mopt::test {

// Uniform values in [lo, hi), reproducible from the seed.
inline Tensor random_tensor(Shape shape, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    Tensor t = Tensor::empty(shape);
    for (auto& v : t.span()) v = dist(rng);
    return t;
}

// Integer ids uniform in [0, bound).
inline Tensor random_ids(Shape shape, std::uint64_t seed, std::int32_t bound) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::int32_t> dist(0, bound - 1);
    Tensor t = Tensor::empty(shape, DType::i32);
    for (auto& v : t.span<std::int32_t>()) v = dist(rng);
    return t;
}

}  // namespace mopt::test
