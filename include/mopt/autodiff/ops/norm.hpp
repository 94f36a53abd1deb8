#pragma once
// Normalisations over the last axis: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).
// Each is a fused row kernel — statistics, normalisation and affine map in one pass over a row
// that sits in cache — written as plain loops over rows with parallel_for: a row's statistics are
// a reduction feeding back into the same row, which an element-wise expression cannot express
// without materialising temporaries, and rows are independent so they parallelise without
// synchronisation. Per-row statistics (mean, 1/σ) are kept in arena tensors for the backward,
// which recomputes x̂ from them instead of storing it.
#include <algorithm>
#include <cmath>

#include "mopt/autodiff/ops/common.hpp"

namespace mopt::autodiff {

namespace ops_detail {

// The weight (and bias) gradients are sums over rows. Row-parallel loops would race on them, so
// they run parallel over blocks of columns: each thread owns its dst entries, no atomics.
template <class Fn>
void for_column_blocks(std::int64_t rows, std::int64_t d, Fn&& fn) {
    constexpr std::int64_t block = 64;
    const std::int64_t blocks = (d + block - 1) / block;
    parallel_for(blocks, rows * block * 4, [&](std::int64_t k) { fn(k * block, std::min(d, (k + 1) * block)); });
}

inline void expect_norm_inputs(const char* op, const Tensor& x, const Tensor& weight, const char* what) {
    check(x.rank() >= 1 && x.shape().back() > 0, op, ": input must have a non-empty last axis, got shape ",
          x.shape());
    const std::int64_t d = x.shape().back();
    check(weight.numel() == d && weight.rank() == 1, op, ": ", what, " of shape ", weight.shape(),
          " does not match the last axis of input ", x.shape(), " (expected [", d, "])");
}

inline void layer_norm_backward(Tape& tape, Node& n) {
    const Tensor& x = tape.value_of(n, 0);
    const std::int64_t d = x.shape().back(), rows = x.shape().rows();
    const float* px = x.f32();
    const float* pw = tape.value_of(n, 1).f32();
    const float* g = n.grad.f32();
    const float* mean = n.saved[0].f32();
    const float* rstd = n.saved[1].f32();
    if (tape.wants_grad(n, 0)) {
        float* gx = tape.grad_of(n, 0).f32();
        // With ĝ = g ⊙ w and x̂ = (x − μ)/σ: dx = (ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) / σ.
        parallel_for(rows, 10 * d, [&](std::int64_t r) {
            const float* xr = px + r * d;
            const float* gr = g + r * d;
            float* dxr = gx + r * d;
            const float mu = mean[r], rs = rstd[r];
            double sum_g = 0.0, sum_gx = 0.0;
            for (std::int64_t j = 0; j < d; ++j) {
                const float gh = gr[j] * pw[j];
                sum_g += gh;
                sum_gx += gh * ((xr[j] - mu) * rs);
            }
            const float mean_g = static_cast<float>(sum_g / d), mean_gx = static_cast<float>(sum_gx / d);
            for (std::int64_t j = 0; j < d; ++j)
                dxr[j] += rs * (gr[j] * pw[j] - mean_g - (xr[j] - mu) * rs * mean_gx);
        });
    }
    const bool want_w = tape.wants_grad(n, 1), want_b = tape.wants_grad(n, 2);
    if (!want_w && !want_b) return;  // frozen affine parameters: no reduction over rows at all
    float* gw = want_w ? tape.grad_of(n, 1).f32() : nullptr;
    float* gb = want_b ? tape.grad_of(n, 2).f32() : nullptr;
    for_column_blocks(rows, d, [&](std::int64_t j0, std::int64_t j1) {
        for (std::int64_t r = 0; r < rows; ++r) {
            const float* xr = px + r * d;
            const float* gr = g + r * d;
            const float mu = mean[r], rs = rstd[r];
            if (gw)
                for (std::int64_t j = j0; j < j1; ++j) gw[j] += gr[j] * ((xr[j] - mu) * rs);
            if (gb)
                for (std::int64_t j = j0; j < j1; ++j) gb[j] += gr[j];
        }
    });
}

inline void rms_norm_backward(Tape& tape, Node& n) {
    const Tensor& x = tape.value_of(n, 0);
    const std::int64_t d = x.shape().back(), rows = x.shape().rows();
    const float* px = x.f32();
    const float* pw = tape.value_of(n, 1).f32();
    const float* g = n.grad.f32();
    const float* rstd = n.saved[0].f32();
    if (tape.wants_grad(n, 0)) {
        float* gx = tape.grad_of(n, 0).f32();
        // With ĝ = g ⊙ w and x̂ = x/rms: dx = (ĝ − x̂·mean(ĝ ⊙ x̂)) / rms (no centring term).
        parallel_for(rows, 8 * d, [&](std::int64_t r) {
            const float* xr = px + r * d;
            const float* gr = g + r * d;
            float* dxr = gx + r * d;
            const float rs = rstd[r];
            double sum_gx = 0.0;
            for (std::int64_t j = 0; j < d; ++j) sum_gx += gr[j] * pw[j] * (xr[j] * rs);
            const float mean_gx = static_cast<float>(sum_gx / d);
            for (std::int64_t j = 0; j < d; ++j) dxr[j] += rs * (gr[j] * pw[j] - xr[j] * rs * mean_gx);
        });
    }
    if (!tape.wants_grad(n, 1)) return;  // frozen gain: skip the reduction over rows
    float* gw = tape.grad_of(n, 1).f32();
    for_column_blocks(rows, d, [&](std::int64_t j0, std::int64_t j1) {
        for (std::int64_t r = 0; r < rows; ++r) {
            const float* xr = px + r * d;
            const float* gr = g + r * d;
            const float rs = rstd[r];
            for (std::int64_t j = j0; j < j1; ++j) gw[j] += gr[j] * (xr[j] * rs);
        }
    });
}

}  // namespace ops_detail

// Ba et al. 2016: y = (x − μ)/√(σ² + eps) ⊙ weight + bias, μ and σ² over the last axis.
// x: [..., d], weight: [d], bias: [d] -> [..., d]
inline Var layer_norm(const Var& x, const Var& weight, const Var& bias, float eps = 1e-5f) {
    const Tensor& tx = x.value();
    const Tensor& tw = weight.value();
    const Tensor& tb = bias.value();
    ops_detail::expect_norm_inputs("layer_norm", tx, tw, "weight");
    ops_detail::expect_norm_inputs("layer_norm", tx, tb, "bias");
    check(eps >= 0.0f, "layer_norm: eps must be non-negative, got ", eps);
    const std::int64_t d = tx.shape().back(), rows = tx.shape().rows();
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape());
    Tensor mean = tape.alloc(Shape{rows});
    Tensor rstd = tape.alloc(Shape{rows});
    const float* px = tx.f32();
    const float* pw = tw.f32();
    const float* pb = tb.f32();
    float* py = out.f32();
    float* pm = mean.f32();
    float* ps = rstd.f32();
    ops_detail::parallel_for(rows, 8 * d, [&](std::int64_t r) {
        const float* xr = px + r * d;
        float* yr = py + r * d;
        // Two passes (mean, then centred squares) in double: the one-pass E[x²] − E[x]² cancels
        // catastrophically when |μ| ≫ σ.
        double s = 0.0;
        for (std::int64_t j = 0; j < d; ++j) s += xr[j];
        const double mu = s / d;
        double ss = 0.0;
        for (std::int64_t j = 0; j < d; ++j) ss += (xr[j] - mu) * (xr[j] - mu);
        const float m = static_cast<float>(mu);
        const float rs = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
        for (std::int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - m) * rs * pw[j] + pb[j];
        pm[r] = m;
        ps[r] = rs;
    });
    Var y = tape.record("layer_norm", out, {x, weight, bias}, &ops_detail::layer_norm_backward);
    Node& node = tape.node(y);
    node.saved[0] = mean;
    node.saved[1] = rstd;
    node.f[0] = eps;
    return y;
}

// Zhang & Sennrich 2019: y = x / √(mean(x²) + eps) ⊙ weight — no centring, no bias.
// x: [..., d], weight: [d] -> [..., d]
inline Var rms_norm(const Var& x, const Var& weight, float eps = 1e-5f) {
    const Tensor& tx = x.value();
    const Tensor& tw = weight.value();
    ops_detail::expect_norm_inputs("rms_norm", tx, tw, "weight");
    check(eps >= 0.0f, "rms_norm: eps must be non-negative, got ", eps);
    const std::int64_t d = tx.shape().back(), rows = tx.shape().rows();
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape());
    Tensor rstd = tape.alloc(Shape{rows});
    const float* px = tx.f32();
    const float* pw = tw.f32();
    float* py = out.f32();
    float* ps = rstd.f32();
    ops_detail::parallel_for(rows, 6 * d, [&](std::int64_t r) {
        const float* xr = px + r * d;
        float* yr = py + r * d;
        double ss = 0.0;
        for (std::int64_t j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
        const float rs = static_cast<float>(1.0 / std::sqrt(ss / d + eps));
        for (std::int64_t j = 0; j < d; ++j) yr[j] = xr[j] * rs * pw[j];
        ps[r] = rs;
    });
    Var y = tape.record("rms_norm", out, {x, weight}, &ops_detail::rms_norm_backward);
    Node& node = tape.node(y);
    node.saved[0] = rstd;
    node.f[0] = eps;
    return y;
}

}  // namespace mopt::autodiff
