#pragma once
// generate: autoregressive text generation with a KV cache.
//
//   auto ids = tok.encode("Once upon a time");                   // BOS first
//   auto next = mopt::eval::generate(model, ids, {.steps = 100, .temperature = 0.8f, .top_p = 0.9f});
//
// The prompt is fed once (one forward of all its positions); every later step feeds only the
// token just chosen, reading earlier positions' keys and values from the cache, so a step costs
// O(position) instead of O(position²). Sampling: temperature 0 takes the most likely token
// (greedy); otherwise softmax(logits / temperature), restricted to the smallest set of most likely
// tokens whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020) and renormalised.
// The random stream is a std::mt19937_64 seeded with `seed`, so a seed always gives the same text.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <vector>

#include "mopt/autodiff/tape.hpp"
#include "mopt/error.hpp"
#include "mopt/nn/kv_cache.hpp"
#include "mopt/nn/transformer.hpp"

namespace mopt::eval {

struct GenerateOptions {
    std::int64_t steps = 128;   // tokens to generate (fewer when a stop token comes first)
    float temperature = 1.0f;   // 0: greedy
    float top_p = 1.0f;         // nucleus mass in (0, 1]; 1: the whole distribution
    std::uint64_t seed = 0;     // seeds the sampler (unused when greedy)
    bool stop_at_eos = true;    // stop at EOS or at a new BOS (llama2.c's models end a story with BOS)
};

namespace detail {

// A double in [0, 1) from the top 53 bits: the same numbers on every standard library, unlike
// std::uniform_real_distribution whose algorithm is the implementation's.
inline double unit_uniform(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// The token to emit after logits (one position). logits: [vocab]
inline std::int32_t choose_token(std::span<const float> logits, const GenerateOptions& opt, std::mt19937_64& rng,
                                 std::vector<double>& prob, std::vector<std::int32_t>& order) {
    const auto n = static_cast<std::int32_t>(logits.size());
    // Greedy: the first maximum (lowest id on ties).
    if (opt.temperature == 0.0f)
        return static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    const double mx = *std::max_element(logits.begin(), logits.end());
    prob.resize(logits.size());
    double sum = 0;
    for (std::int32_t i = 0; i < n; ++i) sum += prob[i] = std::exp((logits[i] - mx) / opt.temperature);
    for (double& p : prob) p /= sum;
    const double r = unit_uniform(rng);
    if (opt.top_p >= 1.0f) {
        double acc = 0;
        for (std::int32_t i = 0; i < n; ++i)
            if (r < (acc += prob[i])) return i;
        return n - 1;  // r within rounding of 1
    }
    // Most likely first (lowest id on ties, so a tiny top_p agrees with greedy); keep the shortest
    // prefix whose mass reaches top_p and draw from it renormalised.
    order.resize(logits.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
        return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
    });
    double mass = 0;
    std::size_t keep = 0;
    while (keep < order.size() && (keep == 0 || mass < opt.top_p)) mass += prob[order[keep++]];
    const double target = r * mass;
    double acc = 0;
    for (std::size_t k = 0; k < keep; ++k)
        if (target < (acc += prob[order[k]])) return order[k];
    return order[keep - 1];
}

}  // namespace detail

// Generates up to opt.steps tokens after `prompt` (which should start with BOS) and returns them
// (the prompt not included; a stop token ends the text and is not returned). The prompt and the
// generated tokens but the last must fit the model's context: prompt + steps - 1 <= max_seq.
// prompt: ids [P] -> ids [<= steps]
template <class Model>
std::vector<std::int32_t> generate(Model& model, std::span<const std::int32_t> prompt, const GenerateOptions& opt = {}) {
    const nn::ModelConfig& c = model.config();
    const auto P = static_cast<std::int64_t>(prompt.size());
    check(P > 0, "generate: empty prompt; start it with BOS (id ", c.bos_id, ")");
    check(opt.steps >= 0, "generate: steps must be >= 0, got ", opt.steps);
    check(std::isfinite(opt.temperature) && opt.temperature >= 0.0f,
          "generate: temperature must be a finite number >= 0 (0 = greedy), got ", opt.temperature);
    check(std::isfinite(opt.top_p) && opt.top_p > 0.0f && opt.top_p <= 1.0f,
          "generate: top_p must be in (0, 1] (1 = off), got ", opt.top_p);
    for (std::int64_t i = 0; i < P; ++i)
        check(prompt[i] >= 0 && prompt[i] < c.vocab_size, "generate: prompt token ", i, " is ", prompt[i],
              ", outside the vocabulary of ", c.vocab_size);
    std::vector<std::int32_t> out;
    if (opt.steps == 0) return out;
    // The last generated token is never fed back, so P + steps - 1 positions enter the model, after
    // the positions a learned prompt takes (a soft prompt's K, a Mixture of Prompts' K + p₁).
    const std::int64_t prefix = model.prompt_positions();
    const std::int64_t positions = prefix + P + opt.steps - 1;
    check(positions <= c.max_seq, "generate: ", prefix > 0 ? mopt::detail::concat(prefix, " prompt positions, ") : "",
          "a text of ", P, " tokens and ", opt.steps, " steps need ", positions,
          " positions but the model's context is max_seq = ", c.max_seq, "; generate at most ",
          std::max<std::int64_t>(c.max_seq - prefix - P + 1, 0), " tokens after this text");

    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    nn::KVCache cache(c, 1, positions);
    std::mt19937_64 rng(opt.seed);
    std::vector<double> prob;
    std::vector<std::int32_t> order;
    Tensor ids = Tensor::from({1, P}, prompt);
    out.reserve(static_cast<std::size_t>(opt.steps));
    for (std::int64_t step = 0; step < opt.steps; ++step) {
        tape.reset();
        const Tensor& logits = model.forward(tape, ids, {.cache = &cache}).logits.value();  // [1, T, vocab]
        const std::int64_t T = logits.dim(1), V = logits.dim(2);
        const std::int32_t next = detail::choose_token({logits.f32() + (T - 1) * V, static_cast<std::size_t>(V)},
                                                       opt, rng, prob, order);
        if (opt.stop_at_eos && (next == c.eos_id || next == c.bos_id)) break;
        out.push_back(next);
        ids = Tensor::from({1, 1}, std::span<const std::int32_t>(&next, 1));
    }
    return out;
}

}  // namespace mopt::eval
