#pragma once
// prompt::MixtureOfPrompts — Dun et al., "Sweeping Heterogeneity with Smart MoPs: Mixture of
// Prompts for LLM Task Adaptation" (2023), Algorithm 1:
//
//   layer 0:      an optional FROZEN input prompt P¹ [p₁, d] is prepended to the token embeddings
//                 (positions K..K+p₁−1 — the soft-prompt convention, see soft_prompt.hpp);
//   layer L_int:  avg = mean of the hidden states entering L_int over ALL their rows — the n text
//                 rows and the p₁ input-prompt rows, BEFORE the expert prompts are added;
//                 g = softmax(W₂·ReLU(W₁·avg)) (gate.hpp);
//                 the E experts' prompts P [E·p, d] (expert e: rows e·p..e·p+p−1) are prepended as
//                 positions 0..K−1 (K = E·p), as InjectedPrompt does;
//   every layer ℓ ≥ L_int: at its input the rows of expert e are multiplied by g_e
//                 (scale_row_groups), so an expert's prompts fade with its gate value layer by layer.
// Sequence order from L_int on: [P (K rows), P¹ (p₁ rows), text (n rows)] under causal attention
// (every text row sees every prompt row); the head sees the text rows only.
//
// Pretraining P¹: it is a soft prompt of length p₁ trained first (SoftPrompt on the same frozen
// model); copy its "prompt_embeddings" in with set_input_prompt() (or load it with
// io::load_prompt). It stays frozen (visited, but set_trainable(false)).
// Gate pretraining with domain labels reads ForwardOutput::gate_logits (cross-entropy against the
// expert assigned to each example's domain) before joint training.
// Top-k gating (PromptConfig::top_k) applies at evaluation (gradients off), see gate.hpp.
//
// With a KV cache the gate is computed on the first call (the prompt text) and kept in the
// cached keys and values; later calls return no gate. Layers below L_int keep their own cache as
// in InjectedPrompt.
#include <cstdint>

#include "mopt/prompt/gate.hpp"
#include "mopt/prompt/injected_prompt.hpp"

namespace mopt::prompt {

struct MixtureOfPrompts {
    static constexpr const char* name = "MixtureOfPrompts";
    static constexpr bool has_prompt = true;

    struct Layer {
        autodiff::Parameter prompt;        // "prompt_embeddings" [E·p, d], expert-major
        autodiff::Parameter input_prompt;  // "input_prompt" [p₁, d], frozen (p₁ = 0: none)
        Gate gate;                         // "gate.w1" [d_g, d], "gate.w2" [E, d_g]

        Layer() = default;
        // Zero prompts of the config's shapes and a freshly initialised gate, for a loader to fill.
        Layer(const PromptConfig& c, const nn::ModelConfig& model) : config_(c), model_(model) {
            c.validate("MixtureOfPrompts", model.n_layers);
            prompt = autodiff::Parameter("prompt_embeddings", Tensor::zeros({c.length, model.d_model}));
            if (c.input_prompt > 0)
                input_prompt = autodiff::Parameter("input_prompt", Tensor::zeros({c.input_prompt, model.d_model}), false);
            gate = Gate(model.d_model, c.gate_dim, c.experts, c.seed * 0x9E3779B97F4A7C15ull + 2);
        }
        // Prompts (and the input prompt, with its own draws) initialised per the config from the
        // token embedding table [vocab, d].
        Layer(const PromptConfig& c, const Tensor& embed_table, const nn::ModelConfig& model) : Layer(c, model) {
            detail::initialise(prompt, c, embed_table, 0, "MixtureOfPrompts");
            if (c.input_prompt > 0) detail::initialise(input_prompt, c, embed_table, 1, "MixtureOfPrompts");
        }

        [[nodiscard]] const PromptConfig& config() const { return config_; }
        [[nodiscard]] const nn::ModelConfig& model_config() const { return model_; }
        [[nodiscard]] std::int64_t length() const { return config_.length; }
        [[nodiscard]] std::int64_t experts() const { return config_.experts; }
        [[nodiscard]] std::int64_t per_expert() const { return config_.per_expert(); }
        [[nodiscard]] std::int64_t inject_layer() const { return config_.inject_layer; }
        [[nodiscard]] std::int64_t d_model() const { return prompt.shape()[1]; }
        [[nodiscard]] std::int64_t positions() const { return config_.length + config_.input_prompt; }

        // Copies a pretrained soft prompt [p₁, d] into the frozen input prompt.
        void set_input_prompt(const Tensor& p) {
            check(config_.input_prompt > 0, "MixtureOfPrompts::set_input_prompt: this mixture has no input prompt "
                                            "(PromptConfig::input_prompt = 0)");
            detail::assign(input_prompt, p, "MixtureOfPrompts::set_input_prompt");
        }
        // Top-k at evaluation (0 = dense).
        void set_top_k(std::int64_t k) {
            check(k >= 0 && k <= config_.experts, "MixtureOfPrompts: top_k = ", k, " must lie in [0, experts = ",
                  config_.experts, "]");
            config_.top_k = k;
        }

        template <class F>
        void visit(F&& f) {
            f(prompt);
            if (config_.input_prompt > 0) f(input_prompt);
            gate.visit(f);
        }

        autodiff::Var enter(autodiff::Tape& tape, autodiff::Var x, std::int64_t layer, nn::AttentionContext& actx,
                            PromptState& s) {
            const std::int64_t L = config_.inject_layer;
            if (layer == 0) cache_.begin(actx.cache, model_, s.insert, config_.length);
            actx.cache = cache_.for_layer(layer, L);
            if (!s.insert) return x;
            if (layer == 0 && config_.input_prompt > 0) x = detail::prepend(tape, x, input_prompt, actx, s, true);
            if (layer == L) {
                const Gate::Output g = gate(tape, autodiff::mean_seq(x), config_.top_k);
                s.gate_logits = g.logits;
                s.gate = g.probs;
                x = detail::prepend(tape, x, prompt, actx, s, L == 0);
            }
            if (layer >= L) x = scale_row_groups(x, s.gate, config_.per_expert());
            return x;
        }
        autodiff::Var leave(autodiff::Tape&, const autodiff::Var& x, nn::AttentionContext&, PromptState& s) {
            cache_.finish(s.text + (s.insert ? config_.input_prompt : 0));  // rows the layers below L_int saw
            return detail::text_rows(x, s);
        }

    private:
        PromptConfig config_;
        nn::ModelConfig model_;
        detail::LowerCache cache_;
    };
};

}  // namespace mopt::prompt
