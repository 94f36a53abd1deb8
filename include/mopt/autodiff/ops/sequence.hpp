#pragma once
// Ops along the sequence axis (axis 1 of [batch, seq, ...]): concatenation (a prompt before the
// input embeddings), slicing (dropping prompt positions) and the mean over positions (the MoP
// gate's average embedding). Trailing axes are treated as one feature axis.
#include "mopt/autodiff/ops/common.hpp"

namespace mopt::autodiff {

namespace ops_detail {
// Features per position: the product of the axes after the sequence axis.
inline std::int64_t features(const Tensor& t) { return t.numel() / std::max<std::int64_t>(t.dim(0) * t.dim(1), 1); }

// Copies rows [0, len) of each batch entry: dst[b, dst_off + t] (+)= src[b, src_off + t].
inline void copy_positions(float* dst, std::int64_t dst_seq, std::int64_t dst_off, const float* src,
                           std::int64_t src_seq, std::int64_t src_off, std::int64_t batch, std::int64_t len,
                           std::int64_t f, bool accumulate) {
    parallel_for(batch, len * f, [&](std::int64_t b) {
        float* d = dst + (b * dst_seq + dst_off) * f;
        const float* s = src + (b * src_seq + src_off) * f;
        if (accumulate) {
            for (std::int64_t i = 0; i < len * f; ++i) d[i] += s[i];
        } else {
            std::copy_n(s, len * f, d);
        }
    });
}
}  // namespace ops_detail

// a: [B, Ta, ...], b: [B, Tb, ...] (same trailing axes) -> [B, Ta + Tb, ...]
inline Var concat_seq(const Var& a, const Var& b) {
    const Tensor& ta = a.value();
    const Tensor& tb = b.value();
    bool ok = ta.rank() >= 2 && ta.rank() == tb.rank() && ta.dim(0) == tb.dim(0);
    for (int d = 2; ok && d < ta.rank(); ++d) ok = ta.dim(d) == tb.dim(d);
    check(ok, "concat_seq: shapes ", ta.shape(), " and ", tb.shape(), " differ outside the sequence axis");
    const std::int64_t batch = ta.dim(0), la = ta.dim(1), lb = tb.dim(1), f = ops_detail::features(ta);
    Tape& tape = a.tape();
    Tensor out = tape.alloc(ta.shape().with(1, la + lb));
    ops_detail::copy_positions(out.f32(), la + lb, 0, ta.f32(), la, 0, batch, la, f, false);
    ops_detail::copy_positions(out.f32(), la + lb, la, tb.f32(), lb, 0, batch, lb, f, false);
    return tape.record("concat_seq", out, {a, b}, [](Tape& t, Node& n) {
        const Tensor& x = t.value_of(n, 0);
        const std::int64_t batch = x.dim(0), la = x.dim(1), total = n.grad.dim(1), f = ops_detail::features(x);
        if (t.wants_grad(n, 0))
            ops_detail::copy_positions(t.grad_of(n, 0).f32(), la, 0, n.grad.f32(), total, 0, batch, la, f, true);
        if (t.wants_grad(n, 1))
            ops_detail::copy_positions(t.grad_of(n, 1).f32(), total - la, 0, n.grad.f32(), total, la, batch,
                                       total - la, f, true);
    });
}

// Positions [begin, end). x: [B, T, ...] -> [B, end - begin, ...]
inline Var slice_seq(const Var& x, std::int64_t begin, std::int64_t end) {
    const Tensor& tx = x.value();
    check(tx.rank() >= 2, "slice_seq: x must be at least 2-D [batch, seq, ...], got shape ", tx.shape());
    check(0 <= begin && begin <= end && end <= tx.dim(1), "slice_seq: range [", begin, ", ", end,
          ") out of bounds for shape ", tx.shape());
    const std::int64_t batch = tx.dim(0), seq = tx.dim(1), f = ops_detail::features(tx);
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape().with(1, end - begin));
    ops_detail::copy_positions(out.f32(), end - begin, 0, tx.f32(), seq, begin, batch, end - begin, f, false);
    Var y = tape.record("slice_seq", out, {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        const Tensor& src = t.value_of(n, 0);
        ops_detail::copy_positions(t.grad_of(n, 0).f32(), src.dim(1), n.i[0], n.grad.f32(), n.grad.dim(1), 0,
                                   src.dim(0), n.grad.dim(1), ops_detail::features(src), true);
    });
    tape.node(y).i[0] = begin;
    return y;
}

// Mean over positions. x: [B, T, ...] -> [B, ...]
inline Var mean_seq(const Var& x) {
    const Tensor& tx = x.value();
    check(tx.rank() >= 2 && tx.dim(1) > 0, "mean_seq: x must be [batch, seq > 0, ...], got shape ", tx.shape());
    const std::int64_t batch = tx.dim(0), seq = tx.dim(1), f = ops_detail::features(tx);
    Shape shape;
    if (tx.rank() == 2) shape = Shape{batch};
    else if (tx.rank() == 3) shape = Shape{batch, tx.dim(2)};
    else shape = Shape{batch, tx.dim(2), tx.dim(3)};
    Tape& tape = x.tape();
    Tensor out = tape.zeros(shape);
    const float inv = 1.0f / static_cast<float>(seq);
    ops_detail::parallel_for(batch, seq * f, [&](std::int64_t b) {
        float* o = out.f32() + b * f;
        for (std::int64_t t = 0; t < seq; ++t)
            for (std::int64_t i = 0; i < f; ++i) o[i] += tx.f32()[(b * seq + t) * f + i];
        for (std::int64_t i = 0; i < f; ++i) o[i] *= inv;
    });
    return tape.record("mean_seq", out, {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        const Tensor& src = t.value_of(n, 0);
        const std::int64_t batch = src.dim(0), seq = src.dim(1), f = ops_detail::features(src);
        const float inv = 1.0f / static_cast<float>(seq);
        float* g = t.grad_of(n, 0).f32();
        ops_detail::parallel_for(batch, seq * f, [&](std::int64_t b) {
            for (std::int64_t p = 0; p < seq; ++p)
                for (std::int64_t i = 0; i < f; ++i) g[(b * seq + p) * f + i] += inv * n.grad.f32()[b * f + i];
        });
    });
}

}  // namespace mopt::autodiff
