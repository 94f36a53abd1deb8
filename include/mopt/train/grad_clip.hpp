#pragma once
// Gradient clipping by global norm (Pascanu et al. 2013): if ‖g‖₂ over all trainable parameters
// exceeds max_norm, every gradient is scaled by max_norm / ‖g‖₂. Returns the norm before clipping;
// a non-finite norm is an error naming the first parameter with a non-finite gradient.
#include <cmath>
#include <vector>

#include "mopt/autodiff/parameter.hpp"

namespace mopt::train {

inline double clip_grad_norm(const std::vector<autodiff::Parameter*>& params, double max_norm) {
    double sq = 0.0;
    for (const auto* p : params) {
        if (!p->trainable()) continue;
        double s = 0.0;
        for (float g : p->grad().span()) s += static_cast<double>(g) * g;
        check(std::isfinite(s), "clip_grad_norm: gradient of '", p->name(), "' is not finite");
        sq += s;
    }
    const double norm = std::sqrt(sq);
    if (norm > max_norm && norm > 0.0) {
        const auto factor = static_cast<float>(max_norm / norm);
        for (auto* p : params)
            if (p->trainable())
                for (float& g : p->grad().span()) g *= factor;
    }
    return norm;
}

}  // namespace mopt::train
