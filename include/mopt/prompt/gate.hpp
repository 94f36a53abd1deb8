#pragma once
// The gating network of a Mixture of Prompts (Dun et al., "Sweeping Heterogeneity with Smart MoPs",
// Algorithm 1) and the op that applies its weights to the experts' prompt rows.
//
//   avg = mean of the hidden states entering layer L_int over their positions   [B, d]
//   z   = W₂ · ReLU(W₁ · avg)      W₁ ∈ R^{d_g×d} ("gate.w1"), W₂ ∈ R^{E×d_g} ("gate.w2")   [B, E]
//   g   = softmax(z)                                                             [B, E]
//
// Top-k at evaluation: with top_k = k > 0 and gradients off (NoGrad, i.e. evaluation), g keeps its
// k largest entries (ties: the lower expert) renormalised to sum 1, the rest 0; training keeps the
// dense g so every expert gets a gradient.
//
// scale_row_groups(x, g, p): the expert prompts sit as E groups of p rows at the front of each
// sequence; row e·p + j of entry b is multiplied by g[b, e], the other rows pass unchanged:
//   y[b, e·p + j, :] = g[b, e] · x[b, e·p + j, :],   ∂L/∂g[b, e] = Σ_j ⟨∂L/∂y[b, e·p + j], x[b, e·p + j]⟩.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "mopt/autodiff/ops.hpp"
#include "mopt/autodiff/parameter.hpp"

namespace mopt::prompt {

// x: [B, S, d], g: [B, E], E·group_rows <= S -> [B, S, d]
inline autodiff::Var scale_row_groups(const autodiff::Var& x, const autodiff::Var& g, std::int64_t group_rows) {
    using autodiff::Node;
    using autodiff::Tape;
    const Tensor& tx = x.value();
    const Tensor& tg = g.value();
    check(tx.rank() == 3 && tg.rank() == 2 && tx.dim(0) == tg.dim(0), "scale_row_groups: x must be [B, S, d] and g [B, E]; got x ",
          tx.shape(), ", g ", tg.shape());
    check(group_rows >= 1 && tg.dim(1) * group_rows <= tx.dim(1), "scale_row_groups: ", tg.dim(1), " groups of ",
          group_rows, " rows do not fit in the ", tx.dim(1), " positions of x ", tx.shape());
    const std::int64_t B = tx.dim(0), S = tx.dim(1), d = tx.dim(2), E = tg.dim(1);
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape());
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t r = 0; r < S; ++r) {
            const float s = r < E * group_rows ? tg.f32()[b * E + r / group_rows] : 1.0f;
            const float* xr = tx.f32() + (b * S + r) * d;
            float* yr = out.f32() + (b * S + r) * d;
            for (std::int64_t j = 0; j < d; ++j) yr[j] = s * xr[j];
        }
    autodiff::Var y = tape.record("scale_row_groups", out, {x, g}, [](Tape& t, Node& n) {
        const Tensor& xv = t.value_of(n, 0);
        const Tensor& gv = t.value_of(n, 1);
        const std::int64_t B = xv.dim(0), S = xv.dim(1), d = xv.dim(2), E = gv.dim(1), p = n.i[0];
        const float* gy = n.grad.f32();
        float* gx = t.wants_grad(n, 0) ? t.grad_of(n, 0).f32() : nullptr;
        float* gg = t.wants_grad(n, 1) ? t.grad_of(n, 1).f32() : nullptr;
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t r = 0; r < S; ++r) {
                const bool scaled = r < E * p;
                const std::int64_t at = (b * S + r) * d;
                if (gx != nullptr) {
                    const float s = scaled ? gv.f32()[b * E + r / p] : 1.0f;
                    for (std::int64_t j = 0; j < d; ++j) gx[at + j] += s * gy[at + j];
                }
                if (gg != nullptr && scaled) {
                    double dot = 0.0;
                    for (std::int64_t j = 0; j < d; ++j) dot += static_cast<double>(gy[at + j]) * xv.f32()[at + j];
                    gg[b * E + r / p] += static_cast<float>(dot);
                }
            }
    });
    tape.node(y).i[0] = group_rows;
    return y;
}

// Keeps the k largest entries of each row of probs [B, E] (ties: the lower index), renormalised.
inline Tensor top_k_renormalised(const Tensor& probs, std::int64_t k) {
    const std::int64_t B = probs.dim(0), E = probs.dim(1);
    Tensor out = Tensor::zeros(probs.shape());
    std::vector<std::int64_t> order(static_cast<std::size_t>(E));
    for (std::int64_t b = 0; b < B; ++b) {
        const float* p = probs.f32() + b * E;
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) { return p[i] > p[j]; });
        double kept = 0.0;
        for (std::int64_t i = 0; i < k; ++i) kept += p[order[static_cast<std::size_t>(i)]];
        for (std::int64_t i = 0; i < k; ++i) {
            const std::int64_t e = order[static_cast<std::size_t>(i)];
            out.f32()[b * E + e] = kept > 0.0 ? static_cast<float>(p[e] / kept) : 1.0f / static_cast<float>(k);
        }
    }
    return out;
}

// The gate MLP: W₁ [d_g, d] and W₂ [E, d_g], no biases, initialised uniform ±1/√fan_in.
struct Gate {
    autodiff::Parameter w1;  // "gate.w1" [d_g, d]
    autodiff::Parameter w2;  // "gate.w2" [E, d_g]

    struct Output {
        autodiff::Var logits;  // [B, E] z
        autodiff::Var probs;   // [B, E] g (top-k applied at evaluation)
    };

    Gate() = default;
    Gate(std::int64_t d, std::int64_t gate_dim, std::int64_t experts, std::uint64_t seed) {
        std::mt19937_64 rng(seed);
        auto uniform = [&](Shape shape, std::int64_t fan_in) {
            const float a = 1.0f / std::sqrt(static_cast<float>(fan_in));
            std::uniform_real_distribution<float> u(-a, a);
            Tensor t = Tensor::empty(shape);
            for (float& v : t.span()) v = u(rng);
            return t;
        };
        w1 = autodiff::Parameter("gate.w1", uniform({gate_dim, d}, d));
        w2 = autodiff::Parameter("gate.w2", uniform({experts, gate_dim}, gate_dim));
    }

    [[nodiscard]] std::int64_t experts() const { return w2.shape()[0]; }

    // avg: [B, d] -> logits and probabilities [B, E]
    Output operator()(autodiff::Tape& tape, const autodiff::Var& avg, std::int64_t top_k) {
        Output o;
        o.logits = autodiff::linear(autodiff::relu(autodiff::linear(avg, tape.parameter(w1))), tape.parameter(w2));
        o.probs = autodiff::softmax(o.logits);
        if (top_k > 0 && top_k < experts() && !autodiff::grad_enabled())
            o.probs = tape.constant(top_k_renormalised(o.probs.value(), top_k));
        return o;
    }

    template <class F>
    void visit(F&& f) {
        f(w1);
        f(w2);
    }
};

}  // namespace mopt::prompt
