#pragma once
// Model families: the norm, attention and default feed-forward that define an architecture.
//   Llama — RMSNorm, rotary GQA attention, SwiGLU (Touvron et al.; also Mixtral with SwitchFFN<TopK>)
//   GPT   — LayerNorm, learned absolute positions, GELU (Radford et al., GPT-2), pre-norm
#include "mopt/nn/attention.hpp"
#include "mopt/nn/dense_ffn.hpp"
#include "mopt/nn/norm.hpp"

namespace mopt::nn {

template <class NormT, class AttentionT, class FFNT>
struct Family {
    using Norm = NormT;
    using Attention = AttentionT;
    using FFN = FFNT;
    static constexpr const char* name = "Family";
};

struct Llama : Family<RMSNorm, Attention<Rotary>, DenseFFN<SwiGLU>> {
    static constexpr const char* name = "Llama";
};
struct GPT : Family<LayerNorm, Attention<LearnedPositions>, DenseFFN<GELU>> {
    static constexpr const char* name = "GPT";
};

}  // namespace mopt::nn
