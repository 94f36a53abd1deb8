#pragma once
// Linear: a weight matrix W [out, in] applied as x Wᵀ, no bias (Llama and Mixtral have none).
// Every projection of attention and of the feed-forward goes through this one type, so a
// Compression policy (packed int8/int4, N:M) has a single place to act: pack() swaps the dense
// weight for a compress::PackedWeight (frozen), after which the layer runs packed_linear and its
// visit() no longer shows the weight to optimizers and checkpoints.
#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <utility>

#include "mopt/autodiff/ops.hpp"
#include "mopt/autodiff/parameter.hpp"
#include "mopt/compress/packed_weight.hpp"
#include "mopt/nn/linear_observer.hpp"

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

    std::optional<compress::PackedWeight> packed;  // set by pack(); then `weight` holds no values

    // Replaces the dense weight by its packed form (shape [out, in] must match). The dense values
    // are released (the Parameter keeps its name, frozen, with an empty tensor).
    void pack(compress::PackedWeight p) {
        check(p.out() == out_features() && p.in() == in_features(), "Linear '", weight.name(), "': packed ",
              p.format(), " weight [", p.out(), ", ", p.in(), "] does not match [", out_features(), ", ",
              in_features(), "]");
        packed.emplace(std::move(p));
        weight = Parameter(weight.name(), Tensor{}, false);
    }
    [[nodiscard]] bool is_packed() const { return packed.has_value(); }
    [[nodiscard]] std::int64_t out_features() const { return packed ? packed->out() : weight.value().dim(0); }
    [[nodiscard]] std::int64_t in_features() const { return packed ? packed->in() : weight.value().dim(1); }
    // Bytes of the weight as stored: packed buffers, or dense f32.
    [[nodiscard]] std::int64_t bytes() const {
        return static_cast<std::int64_t>(packed ? packed->bytes() : weight.value().bytes());
    }
    // The weight as f32 [out, in]: dequantised when packed, else the parameter's value (shared).
    [[nodiscard]] Tensor dense_weight() const { return packed ? packed->dequantize() : weight.value(); }

    // x: [..., in] -> [..., out]
    Var operator()(Tape& tape, const Var& x) {
        observe_linear_input(*this, x.value());  // calibration statistics (compression), when observed
        if (packed) return autodiff::packed_linear(x, *packed);
        return autodiff::linear(x, tape.parameter(weight));
    }

    // Visits the weight Parameter unless the layer is packed (its dense tensor is then empty).
    template <class F>
    void visit(F&& f) {
        if (!packed) f(weight);
    }
};

}  // namespace mopt::nn
