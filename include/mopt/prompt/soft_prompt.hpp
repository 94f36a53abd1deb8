#pragma once
// prompt::SoftPrompt — prompt tuning (Lester et al., "The Power of Scale for Parameter-Efficient
// Prompt Tuning", 2021): K trainable vectors P ∈ R^{K×d} are put before the token embeddings of
// every sequence, and only P is trained; the model stays frozen (and may be compressed).
//
//   x₀ = concat_seq(P broadcast over the batch, embed(ids))          [B, K + T, d]
//
// Positions follow Hugging Face PEFT for causal LMs, which concatenates the prompt to
// inputs_embeds and extends the attention mask, so the model numbers the prompt 0..K−1 and the
// text K..K+T−1: RoPE rotates by those positions, and a learned-position model adds its position
// rows 0..K−1 to the prompt as it adds K.. to the text (max_seq must cover K + T). Attention stays
// causal over [prompt; text], as in PEFT: every text query sees all K prompt rows (they come
// first), prompt row i sees rows 0..i — so a prompt file gives the same logits in mopt and in
// PEFT (scripts/peft_check.py). Before the head the K prompt rows are dropped, so logits and loss
// cover the text only.
//
// With a KV cache the prompt enters on the first call (empty cache) and stays in the cache; later
// calls continue at position K + (text so far).
//
// Each policy's Layer has the same hooks, called by Transformer::forward:
//   enter(tape, x, layer, actx, state) — at the input of block `layer`: may prepend prompt rows
//                                        (actx.start_pos −= rows) and scale them;
//   leave(tape, x, actx, state)        — before the final norm: drops the prompt rows;
//   positions()                        — how many positions the prompt takes before the text.
#include <cstdint>
#include <string>

#include "mopt/autodiff/ops.hpp"
#include "mopt/autodiff/parameter.hpp"
#include "mopt/nn/attention.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/prompt/prompt_config.hpp"

namespace mopt::prompt {

namespace detail {
// Prepends the rows of `p` [K, d], the same for every batch entry, to x [B, S, d]: they take the K
// positions before x's first one. `at_input`: the rows stand in for token embeddings (they enter
// at layer 0), so a learned-position model adds its position rows to them as to tokens.
inline autodiff::Var prepend(autodiff::Tape& tape, const autodiff::Var& x, autodiff::Parameter& p,
                             nn::AttentionContext& actx, const PromptState& s, bool at_input) {
    const std::int64_t B = x.shape()[0], K = p.shape()[0];
    check(actx.start_pos >= K, "prompt: ", K, " prompt rows do not fit before position ", actx.start_pos);
    actx.start_pos -= K;
    // Broadcast over the batch as a gather of rows 0..K−1 for each entry (its backward sums over B).
    Tensor rows = tape.alloc({B, K}, DType::i32);
    for (std::int64_t i = 0; i < B * K; ++i) rows.data<std::int32_t>()[i] = static_cast<std::int32_t>(i % K);
    autodiff::Var v = autodiff::embedding(tape.parameter(p), rows);
    if (at_input && s.positions.defined()) {
        Tensor pos = tape.alloc({B, K}, DType::i32);
        for (std::int64_t i = 0; i < B * K; ++i)
            pos.data<std::int32_t>()[i] = static_cast<std::int32_t>(actx.start_pos + i % K);
        v = autodiff::add(v, autodiff::embedding(s.positions, pos));
    }
    return autodiff::concat_seq(v, x);
}

// The text rows of x [B, rows in front + T, d] -> [B, T, d].
inline autodiff::Var text_rows(const autodiff::Var& x, const PromptState& s) {
    const std::int64_t S = x.shape()[1];
    return S == s.text ? x : autodiff::slice_seq(x, S - s.text, S);
}

// Fills prompt parameter p [rows, d] per the config from the token embedding table [vocab, d].
inline void initialise(autodiff::Parameter& p, const PromptConfig& c, const Tensor& embed_table, std::uint64_t salt,
                       const char* what) {
    check(embed_table.rank() == 2 && embed_table.dim(1) == p.shape()[1], what, ": embedding table ",
          embed_table.shape(), " does not match the prompt width d_model = ", p.shape()[1]);
    p.value().copy_from(initial_rows(c, p.shape()[0], embed_table, salt));
}

// Checks that `t` can replace parameter `p` (same shape, f32) and copies it in.
inline void assign(autodiff::Parameter& p, const Tensor& t, const char* what) {
    check(p.value().defined(), what, ": the prompt is not built yet (call the model's init_prompt first)");
    check(t.dtype() == DType::f32 && t.shape() == p.shape(), what, ": '", p.name(), "' is f32 ", p.shape(),
          " but the given tensor is ", name(t.dtype()), " ", t.shape());
    p.value().copy_from(t);
}
}  // namespace detail

struct SoftPrompt {
    static constexpr const char* name = "SoftPrompt";
    static constexpr bool has_prompt = true;

    struct Layer {
        autodiff::Parameter prompt;  // "prompt_embeddings" [K, d]

        Layer() = default;
        // Zero prompt rows of the config's shape, for a loader to fill (io::load_prompt).
        Layer(const PromptConfig& c, const nn::ModelConfig& model) : config_(c), model_(model) {
            c.validate("SoftPrompt", model.n_layers);
            check(c.inject_layer == 0, "SoftPrompt: the prompt enters at the input (inject_layer 0), got inject_layer ",
                  c.inject_layer, "; use InjectedPrompt for deeper layers");
            check(c.experts == 1 && c.input_prompt == 0, "SoftPrompt: experts = ", c.experts, " and input_prompt = ",
                  c.input_prompt, " belong to MixtureOfPrompts; set experts = 1 and input_prompt = 0");
            prompt = autodiff::Parameter("prompt_embeddings", Tensor::zeros({c.length, model.d_model}));
        }
        // Initialised per the config; embed_table: the model's token embeddings [vocab, d] (vocab
        // and text init read it).
        Layer(const PromptConfig& c, const Tensor& embed_table, const nn::ModelConfig& model) : Layer(c, model) {
            detail::initialise(prompt, c, embed_table, 0, "SoftPrompt");
        }

        [[nodiscard]] const PromptConfig& config() const { return config_; }
        [[nodiscard]] const nn::ModelConfig& model_config() const { return model_; }
        [[nodiscard]] std::int64_t length() const { return config_.length; }
        [[nodiscard]] std::int64_t d_model() const { return prompt.shape()[1]; }
        [[nodiscard]] std::int64_t positions() const { return config_.length; }

        template <class F>
        void visit(F&& f) {
            f(prompt);
        }

        autodiff::Var enter(autodiff::Tape& tape, const autodiff::Var& x, std::int64_t layer,
                            nn::AttentionContext& actx, PromptState& s) {
            if (layer != 0 || !s.insert) return x;
            return detail::prepend(tape, x, prompt, actx, s, true);
        }
        autodiff::Var leave(autodiff::Tape&, const autodiff::Var& x, nn::AttentionContext&, PromptState& s) {
            return detail::text_rows(x, s);
        }

    private:
        PromptConfig config_;
        nn::ModelConfig model_;
    };
};

}  // namespace mopt::prompt
