#pragma once
// AdamW (Loshchilov & Hutter 2019): Adam moments with bias correction and weight decay decoupled
// from the gradient (w -= lr·λ·w, applied to the weight, not added to g). Only trainable
// parameters have moment buffers. Gradients are zeroed after each step.
//
// A device may take over the state: nn::Transformer<…, backend::Cuda> pretraining steps its weights
// on the GPU (through train::step) and attaches a Residence here. While attached, the device's copy
// of the parameters and moments is the truth: save() and train::save_checkpoint fetch it first,
// load() makes the device drop its copy (the host's is the truth again), step() on the host is
// refused, and destroying or moving the optimizer brings the state home and detaches it.
#include <cmath>
#include <functional>
#include <istream>
#include <ostream>
#include <utility>
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
    AdamW(const AdamW& o) : params_((o.fetch(), o.params_)), opt_(o.opt_), m_(o.m_), v_(o.v_), step_(o.step_) {}
    AdamW(AdamW&& o) noexcept
        : params_((o.go_home(), std::move(o.params_))), opt_(o.opt_), m_(std::move(o.m_)), v_(std::move(o.v_)),
          step_(o.step_) {}
    AdamW& operator=(const AdamW&) = delete;
    AdamW& operator=(AdamW&&) = delete;
    ~AdamW() { go_home(); }

    void step() {
        check(!attached(), "AdamW::step: this optimizer's state lives on the device of the model that trains its "
              "parameters; step it with train::step(model, max_norm, optimizers...)");
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
        fetch();
        detail::write_header(os, "adamw", step_, params_.size());
        for (std::size_t k = 0; k < params_.size(); ++k) {
            detail::write_tensor(os, params_[k]->name() + ".m", m_[k]);
            detail::write_tensor(os, params_[k]->name() + ".v", v_[k]);
        }
    }
    void load(std::istream& is) {
        if (attached()) std::exchange(residence_, {}).release(false);  // the host's state replaces the device's
        step_ = detail::read_header(is, "adamw", params_.size());
        for (std::size_t k = 0; k < params_.size(); ++k) {
            detail::read_tensor(is, params_[k]->name() + ".m", m_[k]);
            detail::read_tensor(is, params_[k]->name() + ".v", v_[k]);
        }
    }

    [[nodiscard]] std::int64_t steps() const { return step_; }
    [[nodiscard]] AdamWOptions& options() { return opt_; }
    [[nodiscard]] const std::vector<autodiff::Parameter*>& parameters() const { return params_; }

    // Where the state lives while a device trains the parameters. fetch: copy the device's parameter
    // values and moments into the host's; release(fetch_first): the device forgets its copy (after
    // fetching it, or not when the host's state has just replaced it) and detaches every optimizer.
    struct Residence {
        std::function<void()> fetch;
        std::function<void(bool)> release;
    };
    void attach(Residence r) { residence_ = std::move(r); }
    void detach() { residence_ = {}; }
    [[nodiscard]] bool attached() const { return static_cast<bool>(residence_.release); }
    // Brings the host's copy of the parameters and moments up to date (nothing when not attached).
    void fetch() const {
        if (residence_.fetch) residence_.fetch();
    }
    // For the device that runs the steps: parameters()[k]'s moments, and the step count's advance.
    [[nodiscard]] Tensor& first_moment(std::size_t k) { return m_[k]; }
    [[nodiscard]] Tensor& second_moment(std::size_t k) { return v_[k]; }
    std::int64_t advance() { return ++step_; }

private:
    // Brings the state home and detaches (destruction, move); never throws.
    void go_home() noexcept {
        if (!attached()) return;
        try {
            std::exchange(residence_, {}).release(true);
        } catch (...) {  // a failing device at teardown: the host keeps its last fetched state
        }
    }

    std::vector<autodiff::Parameter*> params_;
    AdamWOptions opt_;
    std::vector<Tensor> m_, v_;
    std::int64_t step_ = 0;
    Residence residence_;
};

}  // namespace mopt::train
