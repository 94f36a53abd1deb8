#pragma once
// Linear: a weight matrix W [out, in] applied as x Wᵀ, no bias (Llama and Mixtral have none).
// Every projection of attention and of the feed-forward goes through this one type, so a
// Compression policy (packed int8/int4, N:M) has a single place to act.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "mopt/autodiff/ops.hpp"
#include "mopt/autodiff/parameter.hpp"

namespace mopt::nn {

using autodiff::Parameter;
using autodiff::Tape;
using autodiff::Var;

// Normal(0, std) values: the initial weights of a fresh model (GPT-2 style std = 0.02).
inline Tensor normal_tensor(Shape shape, float stddev, std::mt19937_64& rng) {
    Tensor t = Tensor::empty(shape);
    std::normal_distribution<float> dist(0.0f, stddev);
    for (float& v : t.span()) v = dist(rng);
    return t;
}

struct Linear {
    Parameter weight;  // [out, in]

    Linear() = default;
    Linear(const std::string& name, std::int64_t out, std::int64_t in, std::mt19937_64& rng, float stddev = 0.02f)
        : weight(name + ".weight", normal_tensor({out, in}, stddev, rng)) {}

    // x: [..., in] -> [..., out]
    Var operator()(Tape& tape, const Var& x) { return autodiff::linear(x, tape.parameter(weight)); }

    template <class F>
    void visit(F&& f) {
        f(weight);
    }
};

}  // namespace mopt::nn
