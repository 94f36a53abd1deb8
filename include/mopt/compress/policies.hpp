#pragma once
// Policies for the Compression slot of nn::Transformer. A policy names a Recipe at compile time:
//
//   using Model = nn::Transformer<nn::Llama, nn::DenseFFN<>,
//                                 compress::Prune<compress::SparseGPT, compress::NM<2, 4>>>;
//   Model model = Model::load("models/dense-brown");
//   compress::compress(model, calibration);          // the policy's recipe, calibrated
//
// compress::None (none.hpp) keeps every weight dense and refuses compressed checkpoints;
// compress::Any takes its recipe at run time (examples use it: --method, --sparsity, --bits) and
// loads any compressed checkpoint. Building blocks:
//   saliency   Magnitude, Wanda, SparseGPT
//   pattern    Unstructured<PerMille> (500 = 50%), NM<N, M> (N of every M consecutive inputs zeroed)
//   quantizer  Int8, RTN<Bits, Group>, GPTQ<Bits, Group, ActOrder>
//   policies   Prune<Saliency, Pattern>, Quantize<Quantizer>, PruneThenQuantize<Prune<…>, Quantize<…>>
#include <optional>
#include <string>

#include "mopt/compress/none.hpp"
#include "mopt/compress/recipe.hpp"

namespace mopt::compress {

struct Magnitude {
    static constexpr Saliency saliency = Saliency::magnitude;
};
struct Wanda {
    static constexpr Saliency saliency = Saliency::wanda;
};
struct SparseGPT {
    static constexpr Saliency saliency = Saliency::sparsegpt;
};

template <int PerMille>
struct Unstructured {
    static_assert(PerMille >= 0 && PerMille < 1000, "Unstructured<PerMille>: sparsity must be in [0, 1000)");
    static Sparsity sparsity() { return {.ratio = PerMille / 1000.0}; }
};
template <int N, int M>
struct NM {
    static_assert(N >= 1 && N < M, "NM<N, M>: N (zeroed per group) must be in [1, M)");
    static Sparsity sparsity() { return {.ratio = 0.0, .nm_zero = N, .nm_group = M}; }
};

struct Int8 {
    static void apply(Recipe& r) { r.quantizer = Quantizer::int8; }
};
template <int Bits, int Group = 128>
struct RTN {
    static void apply(Recipe& r) {
        r.quantizer = Quantizer::rtn;
        r.quant.bits = Bits;
        r.quant.group = Group;
    }
};
template <int Bits, int Group = 128, bool ActOrder = false>
struct GPTQ {
    static void apply(Recipe& r) {
        r.quantizer = Quantizer::gptq;
        r.quant.bits = Bits;
        r.quant.group = Group;
        r.quant.act_order = ActOrder;
    }
};

template <class SaliencyT, class Pattern>
struct Prune {
    static constexpr const char* name = "Prune";
    static constexpr bool compresses = true;
    static std::optional<Recipe> recipe() {
        Recipe r;
        r.prune = SaliencyT::saliency;
        r.sparsity = Pattern::sparsity();
        return r;
    }
};

template <class Q>
struct Quantize {
    static constexpr const char* name = "Quantize";
    static constexpr bool compresses = true;
    static std::optional<Recipe> recipe() {
        Recipe r;
        Q::apply(r);
        return r;
    }
};

template <class P, class Q>
struct PruneThenQuantize {
    static constexpr const char* name = "PruneThenQuantize";
    static constexpr bool compresses = true;
    static std::optional<Recipe> recipe() {
        Recipe r = *P::recipe();
        const Recipe q = *Q::recipe();
        r.quantizer = q.quantizer;
        r.quant = q.quant;
        return r;
    }
};

// The recipe comes at run time (compress(model, recipe, calibration)); loads any compressed checkpoint.
struct Any {
    static constexpr const char* name = "Any";
    static constexpr bool compresses = true;
    static std::optional<Recipe> recipe() { return std::nullopt; }
};

}  // namespace mopt::compress
