#pragma once
// Transformer: a decoder-only language model whose structure is its type.
//
//   using Model = mopt::nn::Transformer<
//       mopt::nn::Llama,                                           // RMSNorm, RoPE, pre-norm
//       mopt::nn::SwitchFFN<mopt::nn::Top1, mopt::nn::EveryOtherLayer>,
//       mopt::compress::None, mopt::prompt::None, mopt::backend::Cpu>;
//   Model model = Model::load("models/switch-brown");             // sizes from config.json
//
// Slots (each checked by a concept in concepts.hpp):
//   Family      — norm and attention (Llama, GPT, or Family<Norm, Attention<…>, FFN>)
//   FFN         — DenseFFN<Act> or SwitchFFN<Routing, Placement, Act> (default: the family's)
//   Compression — compress::None (dense only), compress::Any (recipe at run time) or a recipe type
//                 such as compress::Prune<compress::SparseGPT, compress::NM<2, 4>>
//                 (compress/policies.hpp); compress::compress() packs the projections in place
//   Prompt      — prompt::None, SoftPrompt, InjectedPrompt or MixtureOfPrompts (mopt/prompt/):
//                 init_prompt(config) builds it; forward() lets it enter between blocks
//                 (Prompt::Layer::enter) and drops its rows before the head (leave), so logits
//                 and loss cover the text only; the prompt is not among visit_parameters()
//   Backend     — backend::Cpu
// Blocks are pre-norm residual: x += attn(norm(x)); x += ffn(norm(x)); then a final norm and the
// output head (tied to the token embedding or its own matrix). Parameter names are Hugging Face's
// (model.layers.{i}.self_attn.q_proj.weight, …), so checkpoints map one to one.
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/autodiff/ops.hpp"
#include "mopt/backend/cpu/cpu.hpp"
#include "mopt/compress/none.hpp"
#include "mopt/io/load_model.hpp"
#include "mopt/nn/attention.hpp"
#include "mopt/nn/concepts.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/nn/dense_ffn.hpp"
#include "mopt/nn/family.hpp"
#include "mopt/nn/kv_cache.hpp"
#include "mopt/nn/linear.hpp"
#include "mopt/nn/switch_ffn.hpp"
#include "mopt/prompt/no_prompt.hpp"
#include "mopt/prompt/prompt_config.hpp"

namespace mopt::nn {

// What a forward pass may take besides the token ids.
struct ForwardOptions {
    const Tensor* targets = nullptr;  // i32 [B, T]: next-token targets (-100 = not predicted)
    KVCache* cache = nullptr;         // decoding: earlier positions' keys and values (under NoGrad)
    bool logits = true;               // false: the caller reads the loss only, and a backend may leave
                                      // ForwardOutput::logits undefined (backend::Cuda's pretraining then
                                      // computes the loss on the device and never copies the logits)
};

// What a forward pass returns.
struct ForwardOutput {
    Var logits;                       // [B, T, vocab]
    Var loss;                         // [] mean next-token cross-entropy (when targets were given)
    Var aux_loss;                     // [] α·load balance + z-loss of all expert layers (training only)
    std::vector<ExpertStats> experts; // one entry per expert layer
    Var gate;                         // MixtureOfPrompts: [B, E] gate probabilities (top-k at evaluation)
    Var gate_logits;                  // MixtureOfPrompts: [B, E] before the softmax (gate pretraining)
};

// targets[b, t] = ids[b, t + 1]; the last position predicts nothing (-100).
// ids: i32 [B, T] -> i32 [B, T]
inline Tensor next_token_targets(const Tensor& ids) {
    check(ids.rank() == 2 && ids.dtype() == DType::i32, "next_token_targets: ids must be i32 [batch, seq], got ",
          name(ids.dtype()), " ", ids.shape());
    Tensor t = Tensor::empty(ids.shape(), DType::i32);
    const std::int64_t B = ids.dim(0), T = ids.dim(1);
    const std::int32_t* in = ids.data<std::int32_t>();
    std::int32_t* out = t.data<std::int32_t>();
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t i = 0; i < T; ++i) out[b * T + i] = i + 1 < T ? in[b * T + i + 1] : -100;
    return t;
}

template <class FamilyT, class FFNT = typename FamilyT::FFN, class CompressionT = compress::None,
          class PromptT = prompt::None, class BackendT = backend::Cpu>
class Transformer {
    static_assert(ModelFamily<FamilyT>,
                  "mopt::nn::Transformer: slot 1 (Family) needs a ModelFamily — Llama, GPT or "
                  "Family<Norm, Attention<Positions>, FFN> (see mopt/nn/concepts.hpp)");
    static_assert(FeedForward<FFNT>,
                  "mopt::nn::Transformer: slot 2 (FFN) needs a FeedForward policy — DenseFFN<Act> or "
                  "SwitchFFN<Routing, Placement, Act> (see mopt/nn/concepts.hpp)");
    static_assert(CompressionPolicy<CompressionT>,
                  "mopt::nn::Transformer: slot 3 (Compression) needs a Compression policy such as compress::None");
    static_assert(PromptPolicy<PromptT>,
                  "mopt::nn::Transformer: slot 4 (Prompt) needs a Prompt policy such as prompt::None");
    static_assert(Backend<BackendT>, "mopt::nn::Transformer: slot 5 (Backend) needs a Backend such as backend::Cpu");

public:
    using Family = FamilyT;
    using FFN = FFNT;
    using Compression = CompressionT;
    using Prompt = PromptT;
    using BackendType = BackendT;
    using Norm = typename Family::Norm;
    using AttentionPolicy = typename Family::Attention;

    struct Block {
        typename Norm::Layer attn_norm;
        typename AttentionPolicy::Layer attn;
        typename Norm::Layer ffn_norm;
        typename FFN::Layer ffn;
    };

    // The structure of this type, in the words config.json uses.
    static Structure structure() {
        Structure s;
        s.family = Family::name;
        s.norm = Norm::name;
        s.learned_positions = AttentionPolicy::learned_positions;
        s.ffn = FFN::name;
        s.activation = FFN::Activation::name;
        if constexpr (FFN::has_experts) {
            s.routing = FFN::RoutingPolicy::name;
            s.expert_interval = FFN::expert_interval;
        }
        return s;
    }

    // A freshly initialised model (normal(0, 0.02) weights, residual projections scaled down).
    explicit Transformer(ModelConfig c, std::uint64_t seed = 0) : config_(fit(std::move(c))) {
        std::mt19937_64 rng(seed);
        embed_tokens_ = Parameter("model.embed_tokens.weight",
                                  normal_tensor({config_.vocab_size, config_.d_model}, 0.02f, rng));
        if constexpr (AttentionPolicy::learned_positions)
            embed_positions_ = Parameter("model.embed_positions.weight",
                                         normal_tensor({config_.max_seq, config_.d_model}, 0.01f, rng));
        blocks_.reserve(static_cast<std::size_t>(config_.n_layers));
        for (std::int64_t l = 0; l < config_.n_layers; ++l) {
            const std::string p = "model.layers." + std::to_string(l);
            blocks_.push_back(Block{typename Norm::Layer(p + ".input_layernorm", config_.d_model, config_.norm_eps),
                                    typename AttentionPolicy::Layer(p + ".self_attn", config_, rng),
                                    typename Norm::Layer(p + ".post_attention_layernorm", config_.d_model,
                                                         config_.norm_eps),
                                    typename FFN::Layer(p, l, config_, rng)});
        }
        final_norm_ = typename Norm::Layer("model.norm", config_.d_model, config_.norm_eps);
        if (!config_.tie_embeddings)
            lm_head_ = Parameter("lm_head.weight", normal_tensor({config_.vocab_size, config_.d_model}, 0.02f, rng));
    }

    // A pretrained model: a Hugging Face folder (or its config.json), or a llama2.c .bin file.
    // A checkpoint whose structure differs from this type is an error naming what differs.
    static Transformer load(const std::filesystem::path& path) { return io::load_model<Transformer>(path); }
    // Writes config.json and model.safetensors (Hugging Face layout, atomically) into `dir`.
    void save(const std::filesystem::path& dir, DType on_disk = DType::f32) { io::save_hf(*this, dir, on_disk); }

    [[nodiscard]] const ModelConfig& config() const { return config_; }
    [[nodiscard]] std::vector<Block>& blocks() { return blocks_; }

    // ids: i32 [B, T] -> logits [B, T, vocab], the loss against opt.targets, expert statistics.
    // A prompt takes the positions before the text (PEFT's convention: prompt 0..K−1, text
    // K..K+T−1); it enters on the first call only, later calls find it in the KV cache.
    ForwardOutput forward(Tape& tape, const Tensor& ids, ForwardOptions opt = {}) {
        check(ids.rank() == 2 && ids.dtype() == DType::i32, "Transformer::forward: ids must be i32 [batch, seq], got ",
              name(ids.dtype()), " of shape ", ids.shape());
        const std::int64_t T = ids.dim(1);
        const std::int64_t cached = opt.cache != nullptr ? opt.cache->length() : 0;
        const std::int64_t prompt_len = cached == 0 ? prompt_positions() : 0;  // prompt positions entering now
        const std::int64_t start = cached + prompt_len;                        // position of the first text token
        check(T > 0, "Transformer::forward: empty sequence (ids of shape ", ids.shape(), ")");
        check(start + T <= config_.max_seq, "Transformer::forward: positions up to ", start + T,
              prompt_len > 0 ? mopt::detail::concat(" (", prompt_len, " prompt + ", T, " text)") : std::string(),
              " exceed the model's context max_seq = ", config_.max_seq);
        ForwardOutput out;
        Var x = embed(tape, ids, start);  // [B, T, d]
        AttentionContext actx{.prefix = 0, .start_pos = start, .cache = opt.cache};
        FeedForwardContext fctx{.stats = &out.experts};
        prompt::PromptState ps;
        ps.insert = prompt_len > 0;
        ps.text = T;
        if constexpr (AttentionPolicy::learned_positions) ps.positions = tape.parameter(embed_positions_);
        const bool prompted = prompt_positions() > 0;  // a prompt slot whose prompt is built (init_prompt)
        for (std::size_t l = 0; l < blocks_.size(); ++l) {
            if constexpr (Prompt::has_prompt)
                if (prompted) x = prompt_.enter(tape, x, static_cast<std::int64_t>(l), actx, ps);
            x = block(tape, l, x, actx, fctx);
        }
        if constexpr (Prompt::has_prompt)
            if (prompted) x = prompt_.leave(tape, x, actx, ps);  // [B, T, d]: text rows only
        if (opt.cache != nullptr) opt.cache->advance(prompt_len + T);
        out.logits = head(tape, x);
        if (opt.targets != nullptr) out.loss = autodiff::cross_entropy(out.logits, *opt.targets);
        out.aux_loss = fctx.aux_loss;
        out.gate = ps.gate;
        out.gate_logits = ps.gate_logits;
        return out;
    }

    // Builds the prompt (vocab and text init read the token embedding table). The model's own
    // parameters are untouched; freeze them with set_trainable(false) for prompt tuning.
    void init_prompt(const prompt::PromptConfig& c)
        requires Prompt::has_prompt
    {
        prompt_ = typename Prompt::Layer(c, embed_tokens_.value(), config_);
    }
    // The prompt layer: its parameters (visit), config and hooks.
    typename prompt::LayerOf<Prompt>::type& prompt()  // Prompt::Layer
        requires Prompt::has_prompt
    {
        return prompt_;
    }
    // Positions the prompt takes before the text (0 without a prompt or before init_prompt, when
    // forward() runs the model alone).
    [[nodiscard]] std::int64_t prompt_positions() const {
        if constexpr (Prompt::has_prompt) return prompt_.prompt.value().defined() ? prompt_.positions() : 0;
        else return 0;
    }

    // The pieces of forward(), for code that runs the model layer by layer (calibration of
    // compression streams one block at a time; prompts enter between blocks).
    // Token (and learned position) embeddings. ids: i32 [B, T] -> [B, T, d]; positions from `start`.
    Var embed(Tape& tape, const Tensor& ids, std::int64_t start = 0) {
        const std::int64_t B = ids.dim(0), T = ids.dim(1);
        Var x = autodiff::embedding(tape.parameter(embed_tokens_), ids);
        if constexpr (AttentionPolicy::learned_positions) {
            Tensor pos = tape.alloc({B, T}, DType::i32);
            for (std::int64_t i = 0; i < B * T; ++i) pos.data<std::int32_t>()[i] = static_cast<std::int32_t>(start + i % T);
            x = autodiff::add(x, autodiff::embedding(tape.parameter(embed_positions_), pos));
        }
        return x;
    }
    // Block l, pre-norm residual: x += attn(norm(x)); x += ffn(norm(x)). x: [B, T, d] -> [B, T, d]
    Var block(Tape& tape, std::size_t l, Var x, AttentionContext& actx, FeedForwardContext& fctx) {
        check(l < blocks_.size(), "Transformer::block: layer ", l, " of a ", blocks_.size(), "-layer model");
        Block& b = blocks_[l];
        actx.layer = static_cast<std::int64_t>(l);
        x = autodiff::add(x, b.attn(tape, b.attn_norm(tape, x), actx));
        return autodiff::add(x, b.ffn(tape, b.ffn_norm(tape, x), fctx));
    }
    // Final norm and output head. x: [B, T, d] -> logits [B, T, vocab]
    Var head(Tape& tape, const Var& x) {
        Var h = final_norm_(tape, x);
        return autodiff::linear(h, tape.parameter(config_.tie_embeddings ? embed_tokens_ : lm_head_));
    }

    // Calls f(Linear&, LinearRole) for every projection of every block (attention, feed-forward,
    // experts, routers) in checkpoint order — what compression walks.
    template <class F>
    void visit_linears(F&& f) {
        for (Block& b : blocks_) {
            b.attn.visit_linears(f);
            b.ffn.visit_linears(f);
        }
    }
    // Same, for block l only.
    template <class F>
    void visit_linears(std::size_t l, F&& f) {
        blocks_.at(l).attn.visit_linears(f);
        blocks_.at(l).ffn.visit_linears(f);
    }

    // Calls f(Parameter&) for every parameter, in checkpoint order.
    template <class F>
    void visit_parameters(F&& f) {
        f(embed_tokens_);
        if constexpr (AttentionPolicy::learned_positions) f(embed_positions_);
        for (Block& b : blocks_) {
            b.attn_norm.visit(f);
            b.attn.visit(f);
            b.ffn_norm.visit(f);
            b.ffn.visit(f);
        }
        final_norm_.visit(f);
        if (!config_.tie_embeddings) f(lm_head_);
    }

    [[nodiscard]] std::int64_t num_parameters() {
        std::int64_t n = 0;
        visit_parameters([&](Parameter& p) { n += p.numel(); });
        return n;
    }
    // Bytes the weights take in memory (packed projections at their packed size).
    [[nodiscard]] std::int64_t parameter_bytes() {
        std::int64_t n = 0;
        visit_parameters([&](Parameter& p) { n += static_cast<std::int64_t>(p.value().bytes()); });
        // Packed (compressed) projections are not parameters any more; count their buffers.
        visit_linears([&](Linear& l, LinearRole) {
            if (l.is_packed()) n += l.bytes();
        });
        return n;
    }
    // The recipe a compressed model was made with (compress/recipe.hpp's JSON; null when dense):
    // set by compress::compress and by loading a compressed checkpoint, saved into its config.json.
    [[nodiscard]] const nlohmann::json& compression_recipe() const { return compression_recipe_; }
    void set_compression_recipe(nlohmann::json r) { compression_recipe_ = std::move(r); }

    // Freezes (or unfreezes) every parameter: prompt tuning trains only the prompt.
    void set_trainable(bool on) {
        visit_parameters([&](Parameter& p) { p.set_trainable(on); });
    }

private:
    // Validates the numbers and sets what the type decides (where experts sit).
    static ModelConfig fit(ModelConfig c) {
        c.validate("model config");
        if constexpr (FFN::has_experts) {
            check(c.num_experts >= 1, "model config: the type has ", FFN::name,
                  " but num_experts is 0; set num_experts (num_local_experts in config.json)");
            c.expert_interval = FFN::expert_interval;
            if constexpr (!FFN::RoutingPolicy::renormalize)
                check(c.experts_per_token == 1, "model config: Top1 routing but experts_per_token = ",
                      c.experts_per_token, "; use SwitchFFN<TopK> for k > 1");
        } else {
            check(c.num_experts == 0, "model config: num_experts = ", c.num_experts,
                  " but the type's FFN is DenseFFN; use SwitchFFN<…> for a mixture of experts");
        }
        return c;
    }

    ModelConfig config_;
    Parameter embed_tokens_;     // [vocab, d]
    Parameter embed_positions_;  // [max_seq, d] (learned positions only)
    std::vector<Block> blocks_;
    typename Norm::Layer final_norm_;
    Parameter lm_head_;          // [vocab, d] (untied only)
    [[no_unique_address]] typename prompt::LayerOf<Prompt>::type prompt_;  // prompt parameters and hooks
    nlohmann::json compression_recipe_;
};

}  // namespace mopt::nn
