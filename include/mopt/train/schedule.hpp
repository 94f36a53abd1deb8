#pragma once
// Learning-rate schedule: linear warmup from 0 to the peak, then cosine decay to min_ratio·peak at
// total_steps (Loshchilov & Hutter's SGDR without restarts; the GPT-3 / Llama recipe).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "mopt/error.hpp"

namespace mopt::train {

struct WarmupCosine {
    float peak_lr = 1e-3f;
    std::int64_t warmup_steps = 0;
    std::int64_t total_steps = 1;
    float min_ratio = 0.1f;  // final lr = min_ratio · peak_lr

    void validate() const {
        check(peak_lr > 0.0f && std::isfinite(peak_lr), "WarmupCosine: peak learning rate must be positive, got ", peak_lr);
        check(total_steps > 0, "WarmupCosine: total_steps must be positive, got ", total_steps);
        check(warmup_steps >= 0 && warmup_steps <= total_steps, "WarmupCosine: warmup_steps ", warmup_steps,
              " outside [0, total_steps = ", total_steps, "]");
        check(min_ratio >= 0.0f && min_ratio <= 1.0f, "WarmupCosine: min_ratio must lie in [0, 1], got ", min_ratio);
    }

    // The learning rate of step `step` (0-based: the first update is step 0).
    [[nodiscard]] float operator()(std::int64_t step) const {
        if (step < warmup_steps) return peak_lr * static_cast<float>(step + 1) / static_cast<float>(warmup_steps);
        const std::int64_t decay = std::max<std::int64_t>(total_steps - warmup_steps, 1);
        const double t = std::clamp(static_cast<double>(step - warmup_steps) / static_cast<double>(decay), 0.0, 1.0);
        const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * t));
        return static_cast<float>(peak_lr * (min_ratio + (1.0 - min_ratio) * cosine));
    }
};

}  // namespace mopt::train
