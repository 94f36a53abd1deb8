#pragma once
// LlamaHostWeights: the weights of a Llama-family model (RMSNorm, rotary GQA attention, dense
// SwiGLU feed-forward, or a Switch top-1 mixture of SwiGLU experts in the layers
// config.has_experts(l) marks) as plain f32 host arrays under Hugging Face's names — what DeviceLlama
// (backend/cuda/llama.cuh) uploads. Plain C++: a program may read its nn::Transformer into this
// struct in a g++-compiled file (llama_host_weights(model)) and hand the struct to a CUDA file that
// never sees the CPU model's headers (fast nvcc builds); transformer.cuh calls it from nvcc itself.
//
// Shapes (row-major, nn::Linear's [out, in]; Dh = d_model / n_heads):
//   embed_tokens [vocab, d]   lm_head [vocab, d] (empty when tie_embeddings)   final_norm [d]
//   per layer: attn_norm, ffn_norm [d]; q_proj [H·Dh, d]; k_proj, v_proj [Hkv·Dh, d];
//              o_proj [d, H·Dh]; gate_proj, up_proj [F, d]; down_proj [d, F]
//   Switch layers instead of gate/up/down_proj (E = num_experts; block_sparse_moe.gate and
//   block_sparse_moe.experts.{e}.w1/w3/w2, Top1 routing: nn::SwitchFFN<Top1, …, SwiGLU>):
//              router [E, d]; expert_gate, expert_up [E, F, d]; expert_down [E, d, F]
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/nn/config.hpp"

namespace mopt::backend::cuda {

struct LlamaHostWeights {
    struct Layer {
        std::vector<float> attn_norm, q_proj, k_proj, v_proj, o_proj;
        std::vector<float> ffn_norm, gate_proj, up_proj, down_proj;
        std::vector<float> router, expert_gate, expert_up, expert_down;  // Switch layers only
    };
    nn::ModelConfig config;
    std::vector<float> embed_tokens;
    std::vector<Layer> layers;
    std::vector<float> final_norm;
    std::vector<float> lm_head;

    // Throws naming the first tensor whose size does not match the config.
    void validate() const {
        config.validate("LlamaHostWeights");
        check(config.num_experts == 0 || config.experts_per_token == 1, "LlamaHostWeights: experts_per_token = ",
              config.experts_per_token, "; the CUDA Llama runs Switch (top-1) experts only");
        const std::int64_t d = config.d_model, V = config.vocab_size, F = config.d_ff, E = config.num_experts;
        const std::int64_t q = config.n_heads * config.head_dim(), kv = config.kv_heads() * config.head_dim();
        auto expect = [](const std::vector<float>& t, std::int64_t n, const std::string& name) {
            check(static_cast<std::int64_t>(t.size()) == n, "LlamaHostWeights: ", name, " holds ", t.size(),
                  " values, the config needs ", n);
        };
        expect(embed_tokens, V * d, "model.embed_tokens.weight");
        check(static_cast<std::int64_t>(layers.size()) == config.n_layers, "LlamaHostWeights: ", layers.size(),
              " layers, the config has n_layers = ", config.n_layers);
        for (std::size_t l = 0; l < layers.size(); ++l) {
            const Layer& w = layers[l];
            const std::string p = "model.layers." + std::to_string(l) + ".";
            expect(w.attn_norm, d, p + "input_layernorm.weight");
            expect(w.q_proj, q * d, p + "self_attn.q_proj.weight");
            expect(w.k_proj, kv * d, p + "self_attn.k_proj.weight");
            expect(w.v_proj, kv * d, p + "self_attn.v_proj.weight");
            expect(w.o_proj, d * q, p + "self_attn.o_proj.weight");
            expect(w.ffn_norm, d, p + "post_attention_layernorm.weight");
            const bool moe = config.has_experts(static_cast<std::int64_t>(l));
            expect(w.gate_proj, moe ? 0 : F * d, p + "mlp.gate_proj.weight");
            expect(w.up_proj, moe ? 0 : F * d, p + "mlp.up_proj.weight");
            expect(w.down_proj, moe ? 0 : d * F, p + "mlp.down_proj.weight");
            expect(w.router, moe ? E * d : 0, p + "block_sparse_moe.gate.weight");
            expect(w.expert_gate, moe ? E * F * d : 0, p + "block_sparse_moe.experts.*.w1.weight");
            expect(w.expert_up, moe ? E * F * d : 0, p + "block_sparse_moe.experts.*.w3.weight");
            expect(w.expert_down, moe ? E * d * F : 0, p + "block_sparse_moe.experts.*.w2.weight");
        }
        expect(final_norm, d, "model.norm.weight");
        expect(lm_head, config.tie_embeddings ? 0 : V * d, "lm_head.weight");
    }
};

// Copies the weights of a CPU nn::Transformer of the Llama family with a dense SwiGLU
// feed-forward or a Switch one (SwitchFFN<Top1, EveryLayer|EveryOtherLayer, SwiGLU>; any prompt
// slot; the prompt is not copied). Projections are read through
// Linear::dense_weight(), so a compressed (packed) model comes out dequantised. Compile in a
// translation unit that includes mopt/nn/transformer.hpp (g++).
template <class Model>
[[nodiscard]] LlamaHostWeights llama_host_weights(Model& model) {
    using std::string_view;
    static_assert(string_view(Model::Norm::name) == "RMSNorm" && !Model::AttentionPolicy::learned_positions,
                  "llama_host_weights: the model needs RMSNorm and rotary positions (the Llama family)");
    static_assert(string_view(Model::FFN::Activation::name) == "SwiGLU",
                  "llama_host_weights: the model needs a SwiGLU feed-forward (DenseFFN<SwiGLU> or "
                  "SwitchFFN<Top1, …, SwiGLU>)");
    if constexpr (Model::FFN::has_experts)
        static_assert(!Model::FFN::RoutingPolicy::renormalize,
                      "llama_host_weights: a Switch model needs Top1 routing (SwitchFFN<Top1, …>); TopK "
                      "(Mixtral) routing does not run on the GPU");
    std::map<std::string, std::vector<float>, std::less<>> by_name;
    auto take = [&](const std::string& name, const auto& tensor) {
        const auto s = tensor.span();
        by_name[name] = std::vector<float>(s.begin(), s.end());
    };
    model.visit_parameters([&](auto& p) {
        if (p.shape().rank() == 1 || p.name() == "model.embed_tokens.weight" || p.name() == "lm_head.weight")
            take(p.name(), p.value());
    });
    model.visit_linears([&](auto& linear, auto /*role*/) { take(linear.weight.name(), linear.dense_weight()); });
    auto pop = [&](const std::string& name) {
        auto it = by_name.find(name);
        check(it != by_name.end(), "llama_host_weights: the model has no parameter '", name, "'");
        return std::move(it->second);
    };
    LlamaHostWeights w;
    w.config = model.config();
    w.embed_tokens = pop("model.embed_tokens.weight");
    for (std::int64_t l = 0; l < w.config.n_layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        LlamaHostWeights::Layer layer;
        layer.attn_norm = pop(p + "input_layernorm.weight");
        layer.q_proj = pop(p + "self_attn.q_proj.weight");
        layer.k_proj = pop(p + "self_attn.k_proj.weight");
        layer.v_proj = pop(p + "self_attn.v_proj.weight");
        layer.o_proj = pop(p + "self_attn.o_proj.weight");
        layer.ffn_norm = pop(p + "post_attention_layernorm.weight");
        if (w.config.has_experts(l)) {
            const std::string moe = p + "block_sparse_moe.";
            layer.router = pop(moe + "gate.weight");
            for (std::int64_t e = 0; e < w.config.num_experts; ++e) {
                const std::string x = moe + "experts." + std::to_string(e) + ".";
                auto append = [&](std::vector<float>& to, const std::string& name) {
                    const std::vector<float> v = pop(x + name);
                    to.insert(to.end(), v.begin(), v.end());
                };
                append(layer.expert_gate, "w1.weight");
                append(layer.expert_up, "w3.weight");
                append(layer.expert_down, "w2.weight");
            }
        } else {
            layer.gate_proj = pop(p + "mlp.gate_proj.weight");
            layer.up_proj = pop(p + "mlp.up_proj.weight");
            layer.down_proj = pop(p + "mlp.down_proj.weight");
        }
        w.layers.push_back(std::move(layer));
    }
    w.final_norm = pop("model.norm.weight");
    if (!w.config.tie_embeddings) w.lm_head = pop("lm_head.weight");
    w.validate();
    return w;
}

}  // namespace mopt::backend::cuda
