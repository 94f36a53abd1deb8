#pragma once
// Attention policy: multi-head or grouped-query causal self-attention (n_kv_heads < n_heads
// shares each key/value head among n_heads / n_kv_heads query heads; Ainslie et al.) with a
// position scheme as its parameter:
//   Rotary            — RoPE on queries and keys (Su et al.), theta = config.rope_theta, the
//                       rotate-half pairing of Hugging Face Llama (llama2.c's interleaved pairs
//                       are converted when a llama2.c checkpoint is imported);
//   LearnedPositions  — a learned table [max_seq, d_model] added to the token embeddings (GPT-2).
// The first `prefix` positions (a prompt) are visible to every query.
#include <cstdint>
#include <random>
#include <string>

#include "mopt/autodiff/ops.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/nn/kv_cache.hpp"
#include "mopt/nn/linear.hpp"
#include "mopt/nn/linear_role.hpp"

namespace mopt::nn {

struct Rotary {
    static constexpr bool learned_positions = false;
};
struct LearnedPositions {
    static constexpr bool learned_positions = true;
};

// What a layer's attention needs besides its input.
struct AttentionContext {
    std::int64_t prefix = 0;     // always-visible leading positions (a soft prompt)
    std::int64_t start_pos = 0;  // position of the first input token (cache length when decoding)
    KVCache* cache = nullptr;    // decoding: keys/values of earlier positions
    std::int64_t layer = 0;
};

template <class Positions = Rotary>
struct Attention {
    static constexpr const char* name = Positions::learned_positions ? "Attention<LearnedPositions>"
                                                                     : "Attention<Rotary>";
    static constexpr bool learned_positions = Positions::learned_positions;

    struct Layer {
        Linear q_proj, k_proj, v_proj, o_proj;
        std::int64_t heads = 0, kv_heads = 0, head_dim = 0;
        float rope_theta = 10000.0f;

        Layer() = default;
        // prefix: "model.layers.3.self_attn"
        Layer(const std::string& prefix, const ModelConfig& c, std::mt19937_64& rng)
            : q_proj(prefix + ".q_proj", c.n_heads * c.head_dim(), c.d_model, rng),
              k_proj(prefix + ".k_proj", c.kv_heads() * c.head_dim(), c.d_model, rng),
              v_proj(prefix + ".v_proj", c.kv_heads() * c.head_dim(), c.d_model, rng),
              // Residual projections scaled by 1/sqrt(2·layers) at init (GPT-2), so depth does not
              // grow the residual stream.
              o_proj(prefix + ".o_proj", c.d_model, c.n_heads * c.head_dim(), rng,
                     0.02f / std::sqrt(2.0f * static_cast<float>(c.n_layers))),
              heads(c.n_heads), kv_heads(c.kv_heads()), head_dim(c.head_dim()), rope_theta(c.rope_theta) {}

        // x: [B, T, d_model] -> [B, T, d_model]
        Var operator()(Tape& tape, const Var& x, const AttentionContext& ctx) {
            const std::int64_t B = x.shape()[0], T = x.shape()[1];
            Var q = autodiff::reshape(q_proj(tape, x), {B, T, heads, head_dim});
            Var k = autodiff::reshape(k_proj(tape, x), {B, T, kv_heads, head_dim});
            Var v = autodiff::reshape(v_proj(tape, x), {B, T, kv_heads, head_dim});
            if constexpr (!Positions::learned_positions) {
                const autodiff::RopeOptions rope{.theta = rope_theta, .start_pos = ctx.start_pos,
                                                 .style = autodiff::RopeStyle::half};
                q = autodiff::rope(q, rope);
                k = autodiff::rope(k, rope);
            }
            if (ctx.cache != nullptr) {
                // Decoding runs without gradients: the cache holds plain tensors.
                check(!k.requires_grad(), "Attention: a KV cache is for inference; wrap the call in NoGrad");
                const std::int64_t S = ctx.cache->length() + T;
                Tensor k_all = tape.alloc({B, S, kv_heads, head_dim});
                Tensor v_all = tape.alloc({B, S, kv_heads, head_dim});
                ctx.cache->append(ctx.layer, k.value(), v.value(), k_all, v_all);
                k = tape.constant(k_all);
                v = tape.constant(v_all);
            }
            Var o = autodiff::attention(q, k, v, {.causal = true, .prefix = ctx.prefix});
            return o_proj(tape, autodiff::reshape(o, {B, T, heads * head_dim}));
        }

        template <class F>
        void visit(F&& f) {
            q_proj.visit(f);
            k_proj.visit(f);
            v_proj.visit(f);
            o_proj.visit(f);
        }
        // f(Linear&, LinearRole) for the four projections.
        template <class F>
        void visit_linears(F&& f) {
            for (Linear* l : {&q_proj, &k_proj, &v_proj, &o_proj}) f(*l, LinearRole::attention);
        }
    };
};

}  // namespace mopt::nn
