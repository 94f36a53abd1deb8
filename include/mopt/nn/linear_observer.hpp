#pragma once
// A hook that sees the input of every Linear call: how compression collects calibration statistics
// (XᵀX, column norms) of each projection while the model runs its ordinary forward — experts see
// exactly the rows routed to them. At most one observer is active; forward passes call Linears on
// the calling thread only (experts run one after another), so a plain pointer is enough.
#include <functional>

#include "mopt/tensor/tensor.hpp"

namespace mopt::nn {

struct Linear;
using LinearObserver = std::function<void(const Linear&, const Tensor& input)>;

namespace detail {
inline const LinearObserver*& active_linear_observer() {
    static const LinearObserver* observer = nullptr;
    return observer;
}
}  // namespace detail

// Calls the active observer, if any (from Linear::operator()).
inline void observe_linear_input(const Linear& l, const Tensor& x) {
    if (const LinearObserver* o = detail::active_linear_observer()) (*o)(l, x);
}

// Scope in which `f` observes every Linear input.
class ObserveLinears {
public:
    explicit ObserveLinears(LinearObserver f) : f_(std::move(f)), previous_(detail::active_linear_observer()) {
        detail::active_linear_observer() = &f_;
    }
    ~ObserveLinears() { detail::active_linear_observer() = previous_; }
    ObserveLinears(const ObserveLinears&) = delete;
    ObserveLinears& operator=(const ObserveLinears&) = delete;

private:
    LinearObserver f_;
    const LinearObserver* previous_;
};

}  // namespace mopt::nn
