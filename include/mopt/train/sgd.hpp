#pragma once
// SGD with optional momentum (heavy ball) and decoupled weight decay. Frozen parameters get no
// state. Gradients are zeroed after each step.
#include <istream>
#include <ostream>
#include <vector>

#include "mopt/train/optimizer_state.hpp"

namespace mopt::train {

struct SGDOptions {
    float lr = 1e-2f;
    float momentum = 0.0f;
    float weight_decay = 0.0f;
};

class SGD {
public:
    SGD(const std::vector<autodiff::Parameter*>& params, SGDOptions opt = {})
        : params_(detail::trainable_only(params)), opt_(opt) {
        if (opt_.momentum != 0.0f)
            for (auto* p : params_) velocity_.push_back(Tensor::zeros(p->shape()));
    }

    void step() {
        for (std::size_t k = 0; k < params_.size(); ++k) {
            auto* p = params_[k];
            float* w = p->value().f32();
            float* g = p->grad().f32();
            const std::int64_t n = p->numel();
            if (opt_.weight_decay != 0.0f)
                for (std::int64_t i = 0; i < n; ++i) w[i] -= opt_.lr * opt_.weight_decay * w[i];
            if (opt_.momentum != 0.0f) {
                float* v = velocity_[k].f32();
                for (std::int64_t i = 0; i < n; ++i) {
                    v[i] = opt_.momentum * v[i] + g[i];
                    w[i] -= opt_.lr * v[i];
                }
            } else {
                for (std::int64_t i = 0; i < n; ++i) w[i] -= opt_.lr * g[i];
            }
            p->zero_grad();
        }
        ++step_;
    }
    void zero_grad() {
        for (auto* p : params_) p->zero_grad();
    }

    void save(std::ostream& os) const {
        detail::write_header(os, "sgd", step_, params_.size());
        for (std::size_t k = 0; k < velocity_.size(); ++k) detail::write_tensor(os, params_[k]->name(), velocity_[k]);
    }
    void load(std::istream& is) {
        step_ = detail::read_header(is, "sgd", params_.size());
        for (std::size_t k = 0; k < velocity_.size(); ++k) detail::read_tensor(is, params_[k]->name(), velocity_[k]);
    }

    [[nodiscard]] std::int64_t steps() const { return step_; }
    [[nodiscard]] SGDOptions& options() { return opt_; }
    [[nodiscard]] const std::vector<autodiff::Parameter*>& parameters() const { return params_; }

private:
    std::vector<autodiff::Parameter*> params_;
    SGDOptions opt_;
    std::vector<Tensor> velocity_;
    std::int64_t step_ = 0;
};

}  // namespace mopt::train
