#pragma once
// ModelConfig: the run-time numbers of a transformer (sizes, rotary base, expert counts). The
// structure — which norm, attention, feed-forward — is the model's type; these are its values,
// read from a checkpoint's config.json or set by hand.
#include <cstdint>
#include <string>

#include "mopt/error.hpp"

namespace mopt::nn {

struct ModelConfig {
    std::int64_t vocab_size = 0;
    std::int64_t d_model = 0;
    std::int64_t n_layers = 0;
    std::int64_t n_heads = 0;
    std::int64_t n_kv_heads = 0;  // 0 -> n_heads (plain multi-head attention)
    std::int64_t d_ff = 0;        // hidden width of the feed-forward (of each expert)
    std::int64_t max_seq = 2048;  // longest position the model accepts (learned positions: table rows)
    float rope_theta = 10000.0f;
    float norm_eps = 1e-5f;
    bool tie_embeddings = false;  // output head shares the token embedding
    std::int32_t bos_id = 1;
    std::int32_t eos_id = 2;

    // Mixture of experts (Fedus et al., Switch Transformers; Jiang et al., Mixtral).
    std::int64_t num_experts = 0;        // 0: dense model
    std::int64_t experts_per_token = 1;  // k of top-k routing (1 = Switch)
    std::int64_t expert_interval = 1;    // experts in every layer (1) or every other layer (2)
    float capacity_factor = 0.0f;        // 0: no capacity limit (no token dropped)
    float aux_loss_coef = 0.01f;         // α of the load-balancing loss α·N·Σ f_i·P_i
    float z_loss_coef = 0.0f;            // router z-loss coefficient (Zoph et al.); 0 = off

    [[nodiscard]] std::int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
    [[nodiscard]] std::int64_t head_dim() const { return n_heads > 0 ? d_model / n_heads : 0; }
    // Whether layer l holds experts (the others hold a dense feed-forward).
    [[nodiscard]] bool has_experts(std::int64_t layer) const {
        return num_experts > 0 && (layer % expert_interval) == expert_interval - 1;
    }

    // Throws naming `where` (a file, a flag) and the field when the numbers cannot form a model.
    void validate(const std::string& where) const {
        auto positive = [&](std::int64_t v, const char* field) {
            check(v > 0, where, ": ", field, " must be positive, got ", v);
        };
        positive(vocab_size, "vocab_size");
        positive(d_model, "d_model (hidden_size)");
        positive(n_layers, "n_layers (num_hidden_layers)");
        positive(n_heads, "n_heads (num_attention_heads)");
        positive(d_ff, "d_ff (intermediate_size)");
        positive(max_seq, "max_seq (max_position_embeddings)");
        check(d_model % n_heads == 0, where, ": d_model ", d_model, " is not divisible by n_heads ", n_heads);
        // kv_heads() reads any n_kv_heads <= 0 as n_heads, so a negative count must be caught here.
        check(n_kv_heads >= 0, where, ": n_kv_heads (num_key_value_heads) must be >= 0 (0 = n_heads), got ",
              n_kv_heads);
        check(kv_heads() > 0 && n_heads % kv_heads() == 0, where, ": n_heads ", n_heads,
              " is not divisible by n_kv_heads ", kv_heads());
        check(head_dim() % 2 == 0, where, ": head_dim ", head_dim(), " must be even for rotary positions");
        check(rope_theta > 0.0f, where, ": rope_theta must be positive, got ", rope_theta);
        check(norm_eps > 0.0f, where, ": norm_eps must be positive, got ", norm_eps);
        check(num_experts >= 0, where, ": num_experts must be >= 0, got ", num_experts);
        if (num_experts > 0) {
            check(experts_per_token >= 1 && experts_per_token <= num_experts, where, ": experts_per_token ",
                  experts_per_token, " outside [1, num_experts = ", num_experts, "]");
            check(expert_interval == 1 || expert_interval == 2, where, ": expert_interval must be 1 or 2, got ",
                  expert_interval);
            check(capacity_factor >= 0.0f, where, ": capacity_factor must be >= 0, got ", capacity_factor);
            // A negative coefficient would reward imbalance (or large router logits) instead.
            check(aux_loss_coef >= 0.0f, where, ": aux_loss_coef (router_aux_loss_coef) must be >= 0, got ",
                  aux_loss_coef);
            check(z_loss_coef >= 0.0f, where, ": z_loss_coef must be >= 0, got ", z_loss_coef);
        }
        check(bos_id >= 0 && bos_id < vocab_size, where, ": bos_token_id ", bos_id, " outside the vocabulary of ",
              vocab_size);
    }
};

// The structure of a model type in words: what a checkpoint's config.json must match.
struct Structure {
    std::string family;      // "Llama", "GPT"
    std::string norm;        // "RMSNorm", "LayerNorm"
    bool learned_positions = false;
    std::string ffn;         // "DenseFFN", "SwitchFFN"
    std::string activation;  // "SwiGLU", "GELU", "ReLU"
    std::string routing;     // "Top1", "TopK" (SwitchFFN only)
    std::int64_t expert_interval = 1;

    [[nodiscard]] std::string describe() const {
        std::string s = family + " (" + norm + ", " + (learned_positions ? "learned positions" : "rotary") + ", " +
                        ffn + "<" + activation;
        if (ffn == "SwitchFFN")
            s += ", " + routing + ", " + (expert_interval == 1 ? "EveryLayer" : "EveryOtherLayer");
        return s + ">)";
    }
    friend bool operator==(const Structure&, const Structure&) = default;
};

}  // namespace mopt::nn
