#pragma once
// Activations of the feed-forward blocks: ReLU, GELU (tanh form), SiLU and SwiGLU. They are
// element-wise, so each is an xtensor expression over contiguous chunks (one chunk per thread).
// Nothing is saved: the backward recomputes σ or tanh from the input the tape already holds, which
// costs a transcendental per element but no activation memory.
#include <algorithm>
#include <cmath>

#include "mopt/autodiff/ops/common.hpp"
#include "mopt/tensor/xview.hpp"

namespace mopt::autodiff {

namespace ops_detail {

// Backward passes need σ(x) or tanh(u) in several terms; a lazy expression would evaluate the
// transcendental once per term. Blocks this small keep a stack temporary in L1, so it is computed
// once per element without any arena or heap scratch.
inline constexpr std::int64_t activation_block = 512;

template <class Fn>
void for_each_block(std::int64_t n, Fn&& fn) {
    parallel_chunks(n, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t b = begin; b < end; b += activation_block) fn(b, std::min(b + activation_block, end));
    });
}

// Constants of the tanh approximation of GELU (Hendrycks & Gimpel, §2): √(2/π) and 0.044715.
inline constexpr float gelu_k0 = 0.7978845608028654f;
inline constexpr float gelu_k1 = 0.044715f;

inline void relu_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const float* x = tape.value_of(n, 0).f32();
    const float* g = n.grad.f32();
    float* gx = tape.grad_of(n, 0).f32();
    parallel_chunks(n.grad.numel(), [&](std::int64_t b, std::int64_t e) {
        auto dx = flat(gx, b, e);
        dx += xt::where(flat(x, b, e) > 0.0f, flat(g, b, e), 0.0f);
    });
}

inline void gelu_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const float* x = tape.value_of(n, 0).f32();
    const float* g = n.grad.f32();
    float* gx = tape.grad_of(n, 0).f32();
    for_each_block(n.grad.numel(), [&](std::int64_t b, std::int64_t e) {
        float t_buf[activation_block], xc_buf[activation_block];
        auto t = flat(t_buf, 0, e - b);
        auto xc = flat(xc_buf, 0, e - b);
        // Beyond |x| = 10 tanh is ±1 in f32 and the second term is exactly 0; clipping keeps x³
        // from overflowing into 0·inf = NaN there without changing any value.
        xt::noalias(xc) = xt::clip(flat(x, b, e), -10.0f, 10.0f);
        xt::noalias(t) = xt::tanh(gelu_k0 * (xc + gelu_k1 * xc * xc * xc));
        // d/dx ½x(1 + t) = ½(1 + t) + ½x(1 − t²)·k0(1 + 3k1x²)
        auto dx = flat(gx, b, e);
        dx += flat(g, b, e) *
              (0.5f * (1.0f + t) + 0.5f * xc * (1.0f - t * t) * gelu_k0 * (1.0f + 3.0f * gelu_k1 * xc * xc));
    });
}

inline void silu_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const float* x = tape.value_of(n, 0).f32();
    const float* g = n.grad.f32();
    float* gx = tape.grad_of(n, 0).f32();
    for_each_block(n.grad.numel(), [&](std::int64_t b, std::int64_t e) {
        float s_buf[activation_block];
        auto s = flat(s_buf, 0, e - b);
        auto xx = flat(x, b, e);
        xt::noalias(s) = 1.0f / (1.0f + xt::exp(-xx));
        // d/dx xσ(x) = σ(x)(1 + x(1 − σ(x)))
        auto dx = flat(gx, b, e);
        dx += flat(g, b, e) * s * (1.0f + xx * (1.0f - s));
    });
}

inline void swiglu_backward(Tape& tape, Node& n) {
    const bool want_gate = tape.wants_grad(n, 0), want_up = tape.wants_grad(n, 1);
    const float* gate = tape.value_of(n, 0).f32();
    const float* up = tape.value_of(n, 1).f32();
    const float* g = n.grad.f32();
    float* g_gate = want_gate ? tape.grad_of(n, 0).f32() : nullptr;
    float* g_up = want_up ? tape.grad_of(n, 1).f32() : nullptr;
    for_each_block(n.grad.numel(), [&](std::int64_t b, std::int64_t e) {
        float s_buf[activation_block];
        auto s = flat(s_buf, 0, e - b);
        auto xg = flat(gate, b, e);
        xt::noalias(s) = 1.0f / (1.0f + xt::exp(-xg));
        if (want_gate) {
            auto d_gate = flat(g_gate, b, e);
            d_gate += flat(g, b, e) * flat(up, b, e) * s * (1.0f + xg * (1.0f - s));
        }
        if (want_up) {
            auto d_up = flat(g_up, b, e);
            d_up += flat(g, b, e) * xg * s;
        }
    });
}

}  // namespace ops_detail

// max(x, 0). x: any shape -> same shape
inline Var relu(const Var& x) {
    Tape& tape = x.tape();
    const Tensor& tx = x.value();
    Tensor out = tape.alloc(tx.shape());
    ops_detail::parallel_chunks(tx.numel(), [&](std::int64_t b, std::int64_t e) {
        xt::noalias(flat(out.f32(), b, e)) = xt::maximum(flat(tx.f32(), b, e), 0.0f);
    });
    return tape.record("relu", out, {x}, &ops_detail::relu_backward);
}

// Hendrycks & Gimpel (2016), tanh approximation: ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
// x: any shape -> same shape
inline Var gelu(const Var& x) {
    using ops_detail::gelu_k0, ops_detail::gelu_k1;
    Tape& tape = x.tape();
    const Tensor& tx = x.value();
    Tensor out = tape.alloc(tx.shape());
    ops_detail::parallel_chunks(tx.numel(), [&](std::int64_t b, std::int64_t e) {
        auto xx = flat(tx.f32(), b, e);
        xt::noalias(flat(out.f32(), b, e)) = 0.5f * xx * (1.0f + xt::tanh(gelu_k0 * (xx + gelu_k1 * xx * xx * xx)));
    });
    return tape.record("gelu", out, {x}, &ops_detail::gelu_backward);
}

// SiLU / swish: xσ(x) (Elfwing et al. 2018; Ramachandran et al. 2017). x: any shape -> same shape
inline Var silu(const Var& x) {
    Tape& tape = x.tape();
    const Tensor& tx = x.value();
    Tensor out = tape.alloc(tx.shape());
    // x / (1 + e^{−x}) rather than x·σ(x): for x → −∞ the denominator overflows to inf and the
    // result is a clean −0, never inf·0.
    ops_detail::parallel_chunks(tx.numel(), [&](std::int64_t b, std::int64_t e) {
        auto xx = flat(tx.f32(), b, e);
        xt::noalias(flat(out.f32(), b, e)) = xx / (1.0f + xt::exp(-xx));
    });
    return tape.record("silu", out, {x}, &ops_detail::silu_backward);
}

// SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) ⊙ up, the gated hidden
// layer of Llama's FFN. gate: [..., f], up: [..., f] -> [..., f]
inline Var swiglu(const Var& gate, const Var& up) {
    const Tensor& tg = gate.value();
    const Tensor& tu = up.value();
    check(tg.shape() == tu.shape(), "swiglu: gate of shape ", tg.shape(), " and up of shape ", tu.shape(),
          " must have the same shape");
    Tape& tape = gate.tape();
    Tensor out = tape.alloc(tg.shape());
    ops_detail::parallel_chunks(tg.numel(), [&](std::int64_t b, std::int64_t e) {
        auto xg = flat(tg.f32(), b, e);
        xt::noalias(flat(out.f32(), b, e)) = xg / (1.0f + xt::exp(-xg)) * flat(tu.f32(), b, e);
    });
    return tape.record("swiglu", out, {gate, up}, &ops_detail::swiglu_backward);
}

}  // namespace mopt::autodiff
