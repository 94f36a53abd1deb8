#pragma once
// DenseFFN policy: a position-wise feed-forward with one of three activations —
//   SwiGLU: down(silu(gate(x)) ⊙ up(x))   (Shazeer 2020; Llama, Mixtral experts)
//   GELU:   down(gelu(up(x)))             (GPT-2)
//   ReLU:   down(relu(up(x)))             (Vaswani et al.)
// Mlp is also the expert of SwitchFFN; its weight names are given by the caller because
// Llama (mlp.gate_proj/up_proj/down_proj) and Mixtral experts (w1/w3/w2) name them differently.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "mopt/autodiff/ops.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/nn/linear.hpp"
#include "mopt/nn/linear_role.hpp"

namespace mopt::nn {

struct SwiGLU {
    static constexpr const char* name = "SwiGLU";
    static constexpr bool gated = true;
    static constexpr const char* hf_act = "silu";
};
struct GELU {
    static constexpr const char* name = "GELU";
    static constexpr bool gated = false;
    // The op is the tanh approximation (autodiff::gelu); in Hugging Face configs "gelu" names
    // the exact erf form, so the tanh form must be written as "gelu_pytorch_tanh".
    static constexpr const char* hf_act = "gelu_pytorch_tanh";
};
struct ReLU {
    static constexpr const char* name = "ReLU";
    static constexpr bool gated = false;
    static constexpr const char* hf_act = "relu";
};

// Names of an Mlp's three matrices (the gate is unused by ungated activations).
struct MlpNames {
    std::string gate, up, down;
    static MlpNames llama(const std::string& prefix) {
        return {prefix + ".gate_proj", prefix + ".up_proj", prefix + ".down_proj"};
    }
    static MlpNames mixtral_expert(const std::string& prefix) { return {prefix + ".w1", prefix + ".w3", prefix + ".w2"}; }
};

template <class Act>
struct Mlp {
    Linear gate, up, down;

    Mlp() = default;
    Mlp(const MlpNames& n, const ModelConfig& c, std::mt19937_64& rng)
        : up(n.up, c.d_ff, c.d_model, rng),
          down(n.down, c.d_model, c.d_ff, rng, 0.02f / std::sqrt(2.0f * static_cast<float>(c.n_layers))) {
        if constexpr (Act::gated) gate = Linear(n.gate, c.d_ff, c.d_model, rng);
    }

    // x: [..., d_model] -> [..., d_model]
    Var operator()(Tape& tape, const Var& x) {
        if constexpr (Act::gated) return down(tape, autodiff::swiglu(gate(tape, x), up(tape, x)));
        else if constexpr (std::is_same_v<Act, GELU>) return down(tape, autodiff::gelu(up(tape, x)));
        else return down(tape, autodiff::relu(up(tape, x)));
    }

    template <class F>
    void visit(F&& f) {
        if constexpr (Act::gated) gate.visit(f);
        up.visit(f);
        down.visit(f);
    }
    template <class F>
    void visit_linears(F&& f, LinearRole role) {
        if constexpr (Act::gated) f(gate, role);
        f(up, role);
        f(down, role);
    }
};

// Per-layer expert statistics of one forward pass (empty for dense layers).
struct ExpertStats {
    std::int64_t layer = 0;
    std::int64_t tokens = 0;          // tokens routed (batch × sequence)
    std::vector<double> fraction;     // share of the token→expert assignments each expert got
    std::int64_t dropped = 0;         // assignments over capacity (their tokens pass through unchanged)
    double router_entropy = 0.0;      // mean over tokens of −Σ p log p of the router softmax
    double aux_loss = 0.0;            // this layer's unscaled load-balancing term N·Σ f_i·P_i
};

// What a feed-forward layer adds to a forward pass besides its output.
struct FeedForwardContext {
    std::vector<ExpertStats>* stats = nullptr;  // filled by expert layers
    Var aux_loss{};                             // expert layers add α·(load balance) + z-loss here
};

template <class Act = SwiGLU>
struct DenseFFN {
    static constexpr const char* name = "DenseFFN";
    static constexpr bool has_experts = false;
    static constexpr std::int64_t expert_interval = 1;
    using Activation = Act;

    struct Layer {
        Mlp<Act> mlp;
        Layer() = default;
        // prefix: "model.layers.3"
        Layer(const std::string& prefix, std::int64_t /*layer*/, const ModelConfig& c, std::mt19937_64& rng)
            : mlp(MlpNames::llama(prefix + ".mlp"), c, rng) {}
        // x: [B, T, d_model] -> [B, T, d_model]
        Var operator()(Tape& tape, const Var& x, FeedForwardContext& /*ctx*/) { return mlp(tape, x); }
        template <class F>
        void visit(F&& f) {
            mlp.visit(f);
        }
        template <class F>
        void visit_linears(F&& f) {
            mlp.visit_linears(f, LinearRole::ffn);
        }
    };
};

}  // namespace mopt::nn
