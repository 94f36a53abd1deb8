#pragma once
// One optimizer step over a model's gradients: clip them by their global norm (clip_grad_norm over
// the optimizers' parameters; max_norm <= 0 measures the norm without clipping), then step every
// optimizer; returns the norm before clipping. A model that trains where its weights live does
// both there — nn::Transformer<…, backend::Cuda> pretraining with train::AdamW runs the step on
// its GPU (its optimizer_step) — so a training loop written with train::step runs on either
// backend unchanged.
#include <limits>
#include <vector>

#include "mopt/autodiff/parameter.hpp"
#include "mopt/train/grad_clip.hpp"

namespace mopt::train {

namespace detail {
template <class... Optimizers>
double host_step(double max_norm, Optimizers&... optimizers) {
    std::vector<autodiff::Parameter*> params;
    (params.insert(params.end(), optimizers.parameters().begin(), optimizers.parameters().end()), ...);
    const double norm = clip_grad_norm(params, max_norm > 0.0 ? max_norm : std::numeric_limits<double>::infinity());
    (optimizers.step(), ...);
    return norm;
}
}  // namespace detail

template <class Model, class... Optimizers>
double step(Model& model, double max_norm, Optimizers&... optimizers) {
    if constexpr (requires { model.optimizer_step(max_norm, optimizers...); })
        return model.optimizer_step(max_norm, optimizers...);
    else
        return detail::host_step(max_norm, optimizers...);
}

}  // namespace mopt::train
