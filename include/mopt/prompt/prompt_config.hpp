#pragma once
// PromptConfig: the run-time numbers of a prompt policy (SoftPrompt, InjectedPrompt,
// MixtureOfPrompts), how its vectors are initialised, and the bookkeeping one forward pass shares
// between the Transformer and its prompt layer.
//
// Initialisation (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", §2.2):
//   uniform — every coordinate uniform in [-0.5, 0.5);
//   vocab   — each prompt row is the token embedding of an id drawn (without replacement while the
//             pool lasts) from the 5000 most frequent tokens: `frequent_ids` (most frequent first)
//             when given, else the first 5000 ids of the vocabulary;
//   text    — the token embeddings of a text, `init_ids`, repeated or truncated to K rows (a hard
//             prompt turned soft; PEFT's prompt_tuning_init = TEXT).
// All draws come from `seed`, so the same config gives the same prompt.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mopt/autodiff/tape.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::prompt {

enum class PromptInit { uniform, vocab, text };

inline const char* name(PromptInit i) {
    switch (i) {
        case PromptInit::uniform: return "uniform";
        case PromptInit::vocab: return "vocab";
        case PromptInit::text: return "text";
    }
    return "?";
}

// Rows of the vocabulary that vocab init samples from (Lester et al. use the 5000 most frequent).
inline constexpr std::int64_t vocab_init_pool = 5000;

struct PromptConfig {
    std::int64_t length = 20;        // K: ALL prompt vectors (MoP: experts × per_expert)
    std::int64_t inject_layer = 0;   // L_int (0 = at the input; SoftPrompt requires 0)
    std::int64_t experts = 1;        // E (MoP); each expert holds length/experts prompts (must divide)
    std::int64_t gate_dim = 64;      // d_g of the gate MLP (MoP)
    std::int64_t input_prompt = 0;   // MoP's optional frozen input prompt P¹ length (0 = none)
    std::int64_t top_k = 0;          // MoP: 0 = dense gate; k>0 = keep top-k gate values at evaluation (renormalised)
    PromptInit init = PromptInit::vocab;
    std::vector<std::int32_t> init_ids;     // text init: token ids (repeated/truncated to K)
    std::vector<std::int32_t> frequent_ids; // vocab init: candidate ids, most frequent first (optional)
    std::uint64_t seed = 0;

    [[nodiscard]] std::int64_t per_expert() const { return experts > 0 ? length / experts : 0; }

    // Checks what holds for every policy; `what` names the caller in messages ("SoftPrompt").
    void validate(const std::string& what, std::int64_t n_layers) const {
        check(length >= 1, what, ": prompt length K must be >= 1, got ", length);
        check(inject_layer >= 0 && inject_layer < n_layers, what, ": inject_layer L_int = ", inject_layer,
              " must lie in [0, n_layers = ", n_layers, ")");
        check(experts >= 1, what, ": experts must be >= 1, got ", experts);
        check(length % experts == 0, what, ": prompt length K = ", length, " is not divisible by experts E = ",
              experts, " (each expert holds K / E prompts)");
        check(gate_dim >= 1, what, ": gate_dim must be >= 1, got ", gate_dim);
        check(input_prompt >= 0, what, ": input_prompt length must be >= 0, got ", input_prompt);
        check(top_k >= 0 && top_k <= experts, what, ": top_k = ", top_k, " must lie in [0, experts = ", experts, "]");
        check(init != PromptInit::text || !init_ids.empty(), what,
              ": text init needs init_ids (the token ids of the initialising text)");
    }
};

// K rows [rows, d] initialised per `c` from the token embedding table [vocab, d]. `salt` separates
// the draws of several row blocks built from one config (MoP's input prompt and its expert prompts).
inline Tensor initial_rows(const PromptConfig& c, std::int64_t rows, const Tensor& table, std::uint64_t salt = 0) {
    check(table.rank() == 2 && table.dtype() == DType::f32, "prompt init: the token embedding table must be f32 [vocab, d], got ",
          name(table.dtype()), " ", table.shape());
    const std::int64_t vocab = table.dim(0), d = table.dim(1);
    std::mt19937_64 rng(c.seed * 0x9E3779B97F4A7C15ull + salt);
    Tensor out = Tensor::empty({rows, d});
    auto copy_row = [&](std::int64_t r, std::int32_t id) {
        check(id >= 0 && id < vocab, "prompt init (", name(c.init), "): token id ", id, " is outside the vocabulary [0, ",
              vocab, ")");
        std::copy_n(table.f32() + static_cast<std::int64_t>(id) * d, d, out.f32() + r * d);
    };
    switch (c.init) {
        case PromptInit::uniform: {
            std::uniform_real_distribution<float> u(-0.5f, 0.5f);
            for (float& v : out.span()) v = u(rng);
            break;
        }
        case PromptInit::vocab: {
            std::vector<std::int32_t> pool;
            if (!c.frequent_ids.empty()) {
                pool.assign(c.frequent_ids.begin(),
                            c.frequent_ids.begin() + std::min<std::int64_t>(vocab_init_pool, std::ssize(c.frequent_ids)));
            } else {
                pool.resize(static_cast<std::size_t>(std::min(vocab_init_pool, vocab)));
                std::iota(pool.begin(), pool.end(), 0);
            }
            // Draws without replacement while the pool lasts (a partial shuffle), then with.
            for (std::int64_t r = 0; r < rows; ++r) {
                const auto n = static_cast<std::int64_t>(pool.size());
                const std::int64_t i = r % n;
                std::uniform_int_distribution<std::int64_t> pick(i, n - 1);
                std::swap(pool[static_cast<std::size_t>(i)], pool[static_cast<std::size_t>(pick(rng))]);
                copy_row(r, pool[static_cast<std::size_t>(i)]);
            }
            break;
        }
        case PromptInit::text:
            check(!c.init_ids.empty(), "prompt init: text init needs init_ids");
            for (std::int64_t r = 0; r < rows; ++r) copy_row(r, c.init_ids[static_cast<std::size_t>(r) % c.init_ids.size()]);
            break;
    }
    return out;
}

// One forward pass's prompt bookkeeping: made by Transformer::forward, updated by the prompt
// layer's enter()/leave() hooks, read back into ForwardOutput.
struct PromptState {
    bool insert = true;        // the prompt enters in this call (false while decoding after the first call:
                               // the KV cache already holds its keys and values)
    autodiff::Var positions;   // learned-position models: the position table [max_seq, d], added to
                               // prompt rows that enter at layer 0 as it is to tokens (undefined for RoPE)
    std::int64_t text = 0;     // text positions T of this call
    autodiff::Var gate;        // MoP: [B, E] gate probabilities (top-k applied at evaluation)
    autodiff::Var gate_logits; // MoP: [B, E] before the softmax
};

// The prompt layer a model holds for policy P: P::Layer, or an empty struct for prompt::None.
template <class P, bool = P::has_prompt>
struct LayerOf {
    struct type {};
};
template <class P>
struct LayerOf<P, true> {
    using type = typename P::Layer;
};

}  // namespace mopt::prompt
