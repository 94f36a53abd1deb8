#pragma once
// Shared by the CPU references of the CUDA tests (g++ side): bf16 rounding, the random weights every
// whole-model reference starts from, its random batch, and flattening tensors into one host block.
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include <mopt/autodiff/ops.hpp>
#include <mopt/autodiff/parameter.hpp>
#include <mopt/nn/linear_role.hpp>  // before transformer.hpp, as the references include them
#include <mopt/nn/transformer.hpp>

namespace mopt::cuda_test {

// Round to the nearest bf16 (ties to even), kept in a float.
inline float round_bf16(float x) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    u += 0x7fffu + ((u >> 16) & 1u);
    return std::bit_cast<float>(u & 0xffff0000u);
}

// The model config of a reference case: its vocab, d_model, n_layers, n_heads, n_kv_heads, d_ff and a
// context of 256 positions (the rest as nn::ModelConfig's defaults; a caller adds experts).
template <class Case>
nn::ModelConfig config_of(const Case& c) {
    nn::ModelConfig config;
    config.vocab_size = c.vocab;
    config.d_model = c.d_model;
    config.n_layers = c.n_layers;
    config.n_heads = c.n_heads;
    config.n_kv_heads = c.n_kv_heads;
    config.d_ff = c.d_ff;
    config.max_seq = 256;
    return config;
}

// train::prompt_step's joint objective: the loss, plus aux_weight · aux_loss when the model has one.
inline autodiff::Var prompt_objective(const nn::ForwardOutput& out, float aux_weight) {
    if (aux_weight != 0.0f && out.aux_loss.defined())
        return autodiff::add(out.loss, autodiff::scale(out.aux_loss, aux_weight));
    return out.loss;
}

// An i32 tensor's values as a host vector (the ids and targets the GPU side uploads).
inline std::vector<std::int32_t> int_values(const Tensor& t) {
    const auto s = t.span<std::int32_t>();
    return {s.begin(), s.end()};
}

// Appends a tensor's f32 values to `to` (flattening several tensors into one host block).
inline void append(std::vector<float>& to, const Tensor& t) {
    const auto s = t.span();
    to.insert(to.end(), s.begin(), s.end());
}

// Weights scaled so every activation is O(1): projections (routers and experts included)
// Normal(0, 1/in) (attention scores of unit spread, so the mask and the rotary positions change the
// result), embeddings Normal(0, 4/d) (logits of spread ~2 through a tied head), norm weights
// 1 + Normal(0, 0.04). bf16: every value rounded to bf16 first, so the GPU's bf16 run starts from
// the same weights and only its arithmetic differs.
template <class Model>
void randomize(Model& model, std::uint64_t seed, bool bf16) {
    std::mt19937_64 rng(seed);
    model.visit_parameters([&](autodiff::Parameter& p) {
        const Shape& s = p.shape();
        const bool embedding = p.name() == "model.embed_tokens.weight" || p.name() == "lm_head.weight";
        const float mean = s.rank() == 1 ? 1.0f : 0.0f;
        const float stddev = s.rank() == 1 ? 0.2f
                             : embedding   ? 2.0f / std::sqrt(static_cast<float>(s[1]))
                                           : 1.0f / std::sqrt(static_cast<float>(s[1]));
        std::normal_distribution<float> dist(mean, stddev);
        for (float& v : p.value().span()) v = bf16 ? round_bf16(dist(rng)) : dist(rng);
    });
}

// A batch of uniform random ids [batch, seq] and their next-token targets (−100 at each row's end
// and at one more position in the middle, so an ignored target inside a row is exercised).
inline std::pair<Tensor, Tensor> random_batch(std::int64_t vocab, std::int64_t batch, std::int64_t seq,
                                              std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(vocab) - 1);
    Tensor ids = Tensor::empty({batch, seq}, DType::i32);
    for (std::int32_t& v : ids.span<std::int32_t>()) v = token(rng);
    Tensor targets = nn::next_token_targets(ids);
    targets.span<std::int32_t>()[static_cast<std::size_t>(batch * seq / 2)] = -100;
    return {std::move(ids), std::move(targets)};
}

}  // namespace mopt::cuda_test
