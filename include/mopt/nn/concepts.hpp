#pragma once
// The contracts of Transformer's slots. Each policy is a tag type; layer policies carry a nested
// Layer that owns its parameters, is built from its name prefix and the config, runs forward on a
// tape and visits its parameters. Transformer static_asserts each concept with a message that says
// which slot is wrong and what it takes.
#include <concepts>
#include <cstdint>
#include <random>
#include <string>

#include "mopt/autodiff/tape.hpp"
#include "mopt/nn/attention.hpp"
#include "mopt/nn/config.hpp"
#include "mopt/nn/dense_ffn.hpp"

namespace mopt::nn {

namespace concepts_detail {
struct ParameterSink {
    void operator()(autodiff::Parameter&) const {}
};
}  // namespace concepts_detail

// Norm: Layer(prefix, d_model, eps); layer(tape, x) -> Var; x: [..., d] -> [..., d]
template <class N>
concept NormPolicy = requires { typename N::Layer; } &&
                     std::constructible_from<typename N::Layer, std::string, std::int64_t, float> &&
                     requires(typename N::Layer l, autodiff::Tape& t, autodiff::Var x) {
                         { l(t, x) } -> std::same_as<autodiff::Var>;
                         l.visit(concepts_detail::ParameterSink{});
                     };

// Attention: Layer(prefix, config, rng); layer(tape, x, AttentionContext) -> Var; declares
// whether the model adds learned absolute positions.
template <class A>
concept AttentionPolicy =
    requires {
        typename A::Layer;
        { A::learned_positions } -> std::convertible_to<bool>;
    } && std::constructible_from<typename A::Layer, std::string, ModelConfig, std::mt19937_64&> &&
    requires(typename A::Layer l, autodiff::Tape& t, autodiff::Var x, AttentionContext c) {
        { l(t, x, c) } -> std::same_as<autodiff::Var>;
        l.visit(concepts_detail::ParameterSink{});
    };

// FeedForward: Layer(prefix, layer index, config, rng); layer(tape, x, FeedForwardContext&) -> Var;
// declares whether it has experts and in which layers (expert_interval).
template <class F>
concept FeedForward =
    requires {
        typename F::Layer;
        typename F::Activation;
        { F::has_experts } -> std::convertible_to<bool>;
        { F::expert_interval } -> std::convertible_to<std::int64_t>;
    } && std::constructible_from<typename F::Layer, std::string, std::int64_t, ModelConfig, std::mt19937_64&> &&
    requires(typename F::Layer l, autodiff::Tape& t, autodiff::Var x, FeedForwardContext& c) {
        { l(t, x, c) } -> std::same_as<autodiff::Var>;
        l.visit(concepts_detail::ParameterSink{});
    };

// Family: the norm and attention of an architecture and its default feed-forward.
template <class F>
concept ModelFamily = requires {
    typename F::Norm;
    typename F::Attention;
    typename F::FFN;
    { F::name } -> std::convertible_to<const char*>;
} && NormPolicy<typename F::Norm> && AttentionPolicy<typename F::Attention>;

// Compression, Prompt and Backend: named tags with their defining flag.
template <class C>
concept CompressionPolicy = requires {
    { C::name } -> std::convertible_to<const char*>;
    { C::compresses } -> std::convertible_to<bool>;
};
template <class P>
concept PromptPolicy = requires {
    { P::name } -> std::convertible_to<const char*>;
    { P::has_prompt } -> std::convertible_to<bool>;
};
template <class B>
concept Backend = requires {
    { B::name } -> std::convertible_to<const char*>;
    { B::is_cuda } -> std::convertible_to<bool>;
};

}  // namespace mopt::nn
