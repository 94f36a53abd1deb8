#pragma once
// AdamW (Loshchilov & Hutter 2019): Adam moments with bias correction and weight decay decoupled
// from the gradient (w -= lr·λ·w, applied to the weight, not added to g). Only trainable
// parameters have moment buffers. Gradients are zeroed after each step.
#include <cmath>
#include <istream>
#include <ostream>
#include <vector>

#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/train/optimizer_state.hpp"

namespace mopt::train {

struct AdamWOptions {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 0.01f;
};

class AdamW {
public:
    AdamW(const std::vector<autodiff::Parameter*>& params, AdamWOptions opt = {})
        : params_(detail::trainable_only(params)), opt_(opt) {
        for (auto* p : params_) {
            m_.push_back(Tensor::zeros(p->shape()));
            v_.push_back(Tensor::zeros(p->shape()));
        }
    }

    void step() {
        ++step_;
        const float bc1 = 1.0f - std::pow(opt_.beta1, static_cast<float>(step_));
        const float bc2 = 1.0f - std::pow(opt_.beta2, static_cast<float>(step_));
        const float lr = opt_.lr, b1 = opt_.beta1, b2 = opt_.beta2, eps = opt_.eps, wd = opt_.weight_decay;
        for (std::size_t k = 0; k < params_.size(); ++k) {
            auto* p = params_[k];
            float* w = p->value().f32();
            const float* g = p->grad().f32();
            float* m = m_[k].f32();
            float* v = v_[k].f32();
            backend::cpu::parallel_chunks(p->numel(), [&](std::int64_t b, std::int64_t e) {
                for (std::int64_t i = b; i < e; ++i) {
                    m[i] = b1 * m[i] + (1.0f - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
                    const float update = (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
                    w[i] -= lr * (update + wd * w[i]);
                }
            });
            p->zero_grad();
        }
    }
    void zero_grad() {
        for (auto* p : params_) p->zero_grad();
    }

    void save(std::ostream& os) const {
        detail::write_header(os, "adamw", step_, params_.size());
        for (std::size_t k = 0; k < params_.size(); ++k) {
            detail::write_tensor(os, params_[k]->name() + ".m", m_[k]);
            detail::write_tensor(os, params_[k]->name() + ".v", v_[k]);
        }
    }
    void load(std::istream& is) {
        step_ = detail::read_header(is, "adamw", params_.size());
        for (std::size_t k = 0; k < params_.size(); ++k) {
            detail::read_tensor(is, params_[k]->name() + ".m", m_[k]);
            detail::read_tensor(is, params_[k]->name() + ".v", v_[k]);
        }
    }

    [[nodiscard]] std::int64_t steps() const { return step_; }
    [[nodiscard]] AdamWOptions& options() { return opt_; }
    [[nodiscard]] const std::vector<autodiff::Parameter*>& parameters() const { return params_; }

private:
    std::vector<autodiff::Parameter*> params_;
    AdamWOptions opt_;
    std::vector<Tensor> m_, v_;
    std::int64_t step_ = 0;
};

}  // namespace mopt::train
