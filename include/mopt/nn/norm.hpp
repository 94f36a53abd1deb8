#pragma once
// Norm policies: RMSNorm (Zhang & Sennrich; Llama) and LayerNorm (Ba et al.; GPT-2).
// A policy is a tag type with a nested Layer holding its parameters; see concepts.hpp.
#include <cstdint>
#include <string>

#include "mopt/autodiff/ops.hpp"
#include "mopt/autodiff/parameter.hpp"

namespace mopt::nn {

struct RMSNorm {
    static constexpr const char* name = "RMSNorm";
    struct Layer {
        autodiff::Parameter weight;  // [d], starts at 1
        float eps = 1e-5f;
        Layer() = default;
        Layer(const std::string& prefix, std::int64_t d, float eps_)
            : weight(prefix + ".weight", Tensor::full({d}, 1.0f)), eps(eps_) {}
        // x: [..., d] -> [..., d]
        autodiff::Var operator()(autodiff::Tape& tape, const autodiff::Var& x) {
            return autodiff::rms_norm(x, tape.parameter(weight), eps);
        }
        template <class F>
        void visit(F&& f) {
            f(weight);
        }
    };
};

struct LayerNorm {
    static constexpr const char* name = "LayerNorm";
    struct Layer {
        autodiff::Parameter weight;  // [d], starts at 1
        autodiff::Parameter bias;    // [d], starts at 0
        float eps = 1e-5f;
        Layer() = default;
        Layer(const std::string& prefix, std::int64_t d, float eps_)
            : weight(prefix + ".weight", Tensor::full({d}, 1.0f)), bias(prefix + ".bias", Tensor::zeros({d})),
              eps(eps_) {}
        // x: [..., d] -> [..., d]
        autodiff::Var operator()(autodiff::Tape& tape, const autodiff::Var& x) {
            return autodiff::layer_norm(x, tape.parameter(weight), tape.parameter(bias), eps);
        }
        template <class F>
        void visit(F&& f) {
            f(weight);
            f(bias);
        }
    };
};

}  // namespace mopt::nn
