#pragma once
// Gradient checking: compares an op's backward with central finite differences.
// The scalar probed is L = Σ out ⊙ R for a fixed random R, accumulated in double; the analytic
// side back-propagates R directly (Tape::backward(out, R)), so the check exercises the op alone.
// In f32, eps = 1e-2 balances truncation (O(eps²)) against round-off (O(ulp·|L|/eps)).
#include <cmath>
#include <functional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "mopt/autodiff/tape.hpp"

namespace mopt::autodiff {

struct GradCheckOptions {
    float eps = 1e-2f;
    double atol = 2e-3;   // |analytic - numeric| <= atol + rtol * max(|analytic|, |numeric|)
    double rtol = 2e-2;
    int max_checks_per_input = 48;  // coordinates probed per input (randomly chosen when larger)
    std::uint64_t seed = 1;
};

struct GradCheckResult {
    bool ok = true;
    int checked = 0;
    double max_abs_error = 0.0;
    std::string worst;  // the worst coordinate: input, index, analytic, numeric
};

inline std::ostream& operator<<(std::ostream& os, const GradCheckResult& r) {
    return os << (r.ok ? "ok" : "FAILED") << ", " << r.checked << " coordinates, max |error| " << r.max_abs_error
              << (r.worst.empty() ? "" : ", worst: ") << r.worst;
}

// build: makes the op's output from input Vars. inputs: f32 inputs are checked when their flag
// in `differentiable` is set (default: every f32 input); other dtypes (ids, indices) pass through.
using GradCheckBuild = std::function<Var(Tape&, std::span<const Var>)>;

inline GradCheckResult gradcheck(const GradCheckBuild& build, std::vector<Tensor> inputs,
                                 std::vector<bool> differentiable = {}, GradCheckOptions opt = {}) {
    for (auto& t : inputs) t = t.clone();  // perturbed in place below
    if (differentiable.empty())
        for (const auto& t : inputs) differentiable.push_back(t.dtype() == DType::f32);
    check(differentiable.size() == inputs.size(), "gradcheck: ", differentiable.size(), " flags for ",
          inputs.size(), " inputs");
    std::mt19937_64 rng(opt.seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);

    // Analytic gradients.
    Tape tape;
    std::vector<Var> vars;
    for (std::size_t k = 0; k < inputs.size(); ++k) vars.push_back(tape.input(inputs[k], differentiable[k]));
    Var out = build(tape, vars);
    Tensor weight = Tensor::empty(out.shape());
    for (auto& w : weight.span()) w = normal(rng);
    tape.backward(out, weight);

    auto probe = [&]() {
        NoGrad no_grad;
        Tape t;
        std::vector<Var> vs;
        for (auto& in : inputs) vs.push_back(t.constant(in));
        const Tensor& o = build(t, vs).value();
        double l = 0.0;
        for (std::int64_t k = 0; k < o.numel(); ++k) l += static_cast<double>(o.at(k)) * weight.at(k);
        return l;
    };

    GradCheckResult r;
    for (std::size_t k = 0; k < inputs.size(); ++k) {
        if (!differentiable[k]) continue;
        const Tensor& g = vars[k].grad();
        const std::int64_t n = inputs[k].numel();
        std::vector<std::int64_t> coords;
        if (n <= opt.max_checks_per_input) {
            for (std::int64_t c = 0; c < n; ++c) coords.push_back(c);
        } else {
            std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
            for (int c = 0; c < opt.max_checks_per_input; ++c) coords.push_back(pick(rng));
        }
        for (std::int64_t c : coords) {
            float& x = inputs[k].at(c);
            const float saved = x;
            x = saved + opt.eps;
            const double plus = probe();
            x = saved - opt.eps;
            const double minus = probe();
            x = saved;
            const double numeric = (plus - minus) / (2.0 * opt.eps);
            const double analytic = g.defined() ? g.at(c) : 0.0;
            const double err = std::abs(analytic - numeric);
            ++r.checked;
            const bool bad = err > opt.atol + opt.rtol * std::max(std::abs(analytic), std::abs(numeric));
            if (bad) r.ok = false;
            if (err > r.max_abs_error || (bad && r.worst.empty())) {
                r.max_abs_error = std::max(r.max_abs_error, err);
                std::ostringstream os;
                os << "input " << k << " index " << c << ": analytic " << analytic << ", numeric " << numeric;
                r.worst = os.str();
            }
        }
    }
    return r;
}

}  // namespace mopt::autodiff
