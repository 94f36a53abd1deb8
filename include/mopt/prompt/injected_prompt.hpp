#pragma once
// prompt::InjectedPrompt — K trainable vectors that enter the residual stream at the input of layer
// L_int (PromptConfig::inject_layer) instead of at the embeddings (as in the deep-prompt variants
// of Liu et al., P-Tuning v2, and the injection point of Dun et al., "Sweeping Heterogeneity with
// Smart MoPs"). L_int = 0 is the soft prompt.
//
//   layers ℓ < L_int:  x_{ℓ+1} = block_ℓ(x_ℓ)                   text rows only, positions K..K+T−1
//   layer L_int:       x = concat_seq(P, x_{L_int})              the prompt is PREPENDED as K new
//                                                                positions 0..K−1 (no text row is
//                                                                replaced); attention stays causal
//   layers ℓ ≥ L_int:  x_{ℓ+1} = block_ℓ(x_ℓ)                   [B, K + T, d]
//
// The text keeps positions K..K+T−1 in every layer, so with or without the prompt a text token has
// the same position, and the positions are those of a soft prompt (PEFT's convention). RoPE only
// sees differences, so the choice matters only against the prompt rows.
//
// Backward: P is the only trainable leaf and enters at L_int, so no node recorded below L_int
// needs a gradient and Tape::backward visits none of them: the step cost falls as L_int rises.
//
// Decoding with a KV cache: the layers below L_int never see the prompt, so their keys and values
// are K positions fewer than those of the layers above. They go into a second cache the layer
// owns (made on the first call of each generation, when the model's cache is empty), while the
// model's cache holds layers ≥ L_int.
#include <cstdint>

#include "mopt/nn/kv_cache.hpp"
#include "mopt/prompt/soft_prompt.hpp"

namespace mopt::prompt {

namespace detail {
// The KV cache of the layers below the injection point: the model's cache holds the layers from
// L_int on (prompt rows included); this one the layers below, which see `injected` fewer rows.
class LowerCache {
public:
    // Called at layer 0 of every forward with the model's cache (or null when not decoding).
    void begin(nn::KVCache* main, const nn::ModelConfig& model, bool insert, std::int64_t injected) {
        main_ = main;
        if (main == nullptr) return;
        if (insert) {  // a new generation: the model's cache is empty
            if (lower_.batch() != main->batch() || lower_.capacity() != main->capacity() ||
                model_layers_ != model.n_layers)
                lower_ = nn::KVCache(model, main->batch(), main->capacity());
            model_layers_ = model.n_layers;
            lower_.clear();
        } else {
            check(lower_.length() + injected == main->length(), "prompt at layer L_int: the KV cache holds ",
                  main->length(), " positions but the layers below the injection point ", lower_.length(),
                  " (expected ", main->length() - injected, "); start each generation with an empty cache");
        }
    }
    // The cache block `layer` reads and writes.
    [[nodiscard]] nn::KVCache* for_layer(std::int64_t layer, std::int64_t inject_layer) {
        if (main_ == nullptr) return nullptr;
        return layer < inject_layer ? &lower_ : main_;
    }
    // After the blocks: the lower layers stored `rows` more positions (the model advances its own).
    void finish(std::int64_t rows) {
        if (main_ != nullptr) lower_.advance(rows);
        main_ = nullptr;
    }

private:
    nn::KVCache lower_;
    nn::KVCache* main_ = nullptr;
    std::int64_t model_layers_ = 0;
};
}  // namespace detail

struct InjectedPrompt {
    static constexpr const char* name = "InjectedPrompt";
    static constexpr bool has_prompt = true;

    struct Layer {
        autodiff::Parameter prompt;  // "prompt_embeddings" [K, d]

        Layer() = default;
        // Zero prompt rows of the config's shape, for a loader to fill (io::load_prompt).
        Layer(const PromptConfig& c, const nn::ModelConfig& model) : config_(c), model_(model) {
            c.validate("InjectedPrompt", model.n_layers);
            check(c.experts == 1 && c.input_prompt == 0, "InjectedPrompt: experts = ", c.experts,
                  " and input_prompt = ", c.input_prompt,
                  " belong to MixtureOfPrompts; set experts = 1 and input_prompt = 0");
            prompt = autodiff::Parameter("prompt_embeddings", Tensor::zeros({c.length, model.d_model}));
        }
        // Initialised per the config from the token embedding table [vocab, d].
        Layer(const PromptConfig& c, const Tensor& embed_table, const nn::ModelConfig& model) : Layer(c, model) {
            detail::initialise(prompt, c, embed_table, 0, "InjectedPrompt");
        }

        [[nodiscard]] const PromptConfig& config() const { return config_; }
        [[nodiscard]] const nn::ModelConfig& model_config() const { return model_; }
        [[nodiscard]] std::int64_t length() const { return config_.length; }
        [[nodiscard]] std::int64_t inject_layer() const { return config_.inject_layer; }
        [[nodiscard]] std::int64_t d_model() const { return prompt.shape()[1]; }
        [[nodiscard]] std::int64_t positions() const { return config_.length; }

        template <class F>
        void visit(F&& f) {
            f(prompt);
        }

        autodiff::Var enter(autodiff::Tape& tape, const autodiff::Var& x, std::int64_t layer,
                            nn::AttentionContext& actx, PromptState& s) {
            if (layer == 0) cache_.begin(actx.cache, model_, s.insert, config_.length);
            actx.cache = cache_.for_layer(layer, config_.inject_layer);
            if (layer != config_.inject_layer || !s.insert) return x;
            return detail::prepend(tape, x, prompt, actx, s, layer == 0);
        }
        autodiff::Var leave(autodiff::Tape&, const autodiff::Var& x, nn::AttentionContext&, PromptState& s) {
            cache_.finish(s.text);
            return detail::text_rows(x, s);
        }

    private:
        PromptConfig config_;
        nn::ModelConfig model_;
        detail::LowerCache cache_;
    };
};

}  // namespace mopt::prompt
