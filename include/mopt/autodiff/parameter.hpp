#pragma once
// Parameter: a named, persistent tensor of a model. A trainable parameter owns a gradient buffer
// of its shape; a frozen one has none — it enters a tape as a constant, so no weight-gradient
// GEMM is ever run for it.
#include <string>
#include <utility>

#include "mopt/tensor/tensor.hpp"

namespace mopt::autodiff {

class Parameter {
public:
    Parameter() = default;
    Parameter(std::string name, Tensor value, bool trainable = true) : name_(std::move(name)), value_(std::move(value)) {
        check(value_.dtype() == DType::f32, "Parameter '", name_, "': trainable storage must be f32, got ",
              mopt::name(value_.dtype()));
        set_trainable(trainable);
    }

    [[nodiscard]] const std::string& name() const { return name_; }
    [[nodiscard]] Tensor& value() { return value_; }
    [[nodiscard]] const Tensor& value() const { return value_; }
    [[nodiscard]] Tensor& grad() { return grad_; }
    [[nodiscard]] const Tensor& grad() const { return grad_; }
    [[nodiscard]] bool trainable() const { return trainable_; }
    [[nodiscard]] const Shape& shape() const { return value_.shape(); }
    [[nodiscard]] std::int64_t numel() const { return value_.numel(); }

    // Freezing releases the gradient buffer; unfreezing allocates a zeroed one.
    void set_trainable(bool on) {
        trainable_ = on;
        grad_ = on ? Tensor::zeros(value_.shape()) : Tensor{};
    }
    void zero_grad() {
        if (trainable_) grad_.zero();
    }

private:
    std::string name_;
    Tensor value_;
    Tensor grad_;
    bool trainable_ = false;
};

}  // namespace mopt::autodiff
