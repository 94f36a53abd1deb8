#pragma once
// Rotary position embedding (Su et al., RoFormer, 2021, eq. 34): each pair of a head's features is
// rotated by an angle proportional to the token's position, so a query·key dot product depends only
// on the distance between the two positions. Two pairings are in use by checkpoints we load, and a
// checkpoint read with the wrong one silently produces garbage, so the style is explicit.
#include <cmath>
#include <cstdint>

#include "mopt/autodiff/ops/common.hpp"

namespace mopt::autodiff {

// half: Hugging Face Llama, pairs (i, i + Dh/2); interleaved: llama2.c / Meta, pairs (2i, 2i+1).
enum class RopeStyle { half, interleaved };

struct RopeOptions {
    float theta = 10000.0f;      // base of the frequencies theta^(-2i/Dh)
    std::int64_t start_pos = 0;  // position of the first token (the KV-cache length when decoding)
    RopeStyle style = RopeStyle::half;
};

namespace ops_detail {

// Rotates every pair of x by +angle (sign = 1) or -angle (sign = -1) and writes (or, when
// accumulate, adds) into y. table: [2, T, Dh/2] holding cos then sin.
// x, y: [B, T, H, Dh]
inline void rope_rotate(const float* x, float* y, const float* table, std::int64_t batch, std::int64_t seq,
                        std::int64_t heads, std::int64_t head_dim, RopeStyle style, float sign, bool accumulate) {
    const std::int64_t half = head_dim / 2;
    const float* cos_t = table;
    const float* sin_t = table + seq * half;
    // Pair i is (i, i + half) or (2i, 2i + 1): an index stride and a pair stride cover both styles.
    const std::int64_t first_step = style == RopeStyle::half ? 1 : 2;
    const std::int64_t partner = style == RopeStyle::half ? half : 1;
    parallel_for(batch * seq, heads * head_dim * 4, [&](std::int64_t row) {
        const std::int64_t t = row % seq;
        const float* c = cos_t + t * half;
        const float* s = sin_t + t * half;
        for (std::int64_t h = 0; h < heads; ++h) {
            const std::int64_t base = (row * heads + h) * head_dim;
            const float* xr = x + base;
            float* yr = y + base;
            for (std::int64_t i = 0; i < half; ++i) {
                const std::int64_t a = i * first_step, b = a + partner;
                const float sn = sign * s[i];
                const float ya = xr[a] * c[i] - xr[b] * sn;
                const float yb = xr[a] * sn + xr[b] * c[i];
                if (accumulate) {
                    yr[a] += ya;
                    yr[b] += yb;
                } else {
                    yr[a] = ya;
                    yr[b] = yb;
                }
            }
        }
    });
}

inline void rope_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const Tensor& g = n.grad;
    // A rotation's transpose is its inverse: the gradient turns back by the same angle.
    rope_rotate(g.f32(), tape.grad_of(n, 0).f32(), n.saved[0].f32(), g.dim(0), g.dim(1), g.dim(2), g.dim(3),
                static_cast<RopeStyle>(n.i[0]), -1.0f, true);
}

}  // namespace ops_detail

// Rotates query or key heads by their positions start_pos + t (RoFormer, eq. 34).
// x: [B, T, H, Dh] -> [B, T, H, Dh]
inline Var rope(const Var& x, RopeOptions opt = {}) {
    const Tensor& tx = x.value();
    check(tx.rank() == 4, "rope: x must be 4-D [batch, seq, heads, head_dim], got shape ", tx.shape());
    ops_detail::expect_dtype("rope", tx, DType::f32, "x");
    check(tx.dim(3) % 2 == 0, "rope: head_dim must be even to form rotation pairs, got x of shape ", tx.shape());
    check(opt.theta > 0.0f, "rope: theta must be positive, got ", opt.theta, " for x of shape ", tx.shape());
    check(opt.start_pos >= 0, "rope: start_pos must be >= 0, got ", opt.start_pos);
    const std::int64_t batch = tx.dim(0), seq = tx.dim(1), heads = tx.dim(2), head_dim = tx.dim(3);
    const std::int64_t half = head_dim / 2;
    Tape& tape = x.tape();

    // cos/sin once per (t, i) rather than per head and batch; angles in double because pos * freq
    // reaches 1e4+ where a float angle has lost the digits the sine needs.
    Tensor table = tape.alloc({2, seq, half});
    float* cos_t = table.f32();
    float* sin_t = cos_t + seq * half;
    for (std::int64_t i = 0; i < half; ++i) {
        const double inv_freq = std::pow(static_cast<double>(opt.theta), -2.0 * static_cast<double>(i) /
                                                                             static_cast<double>(head_dim));
        for (std::int64_t t = 0; t < seq; ++t) {
            const double angle = static_cast<double>(opt.start_pos + t) * inv_freq;
            cos_t[t * half + i] = static_cast<float>(std::cos(angle));
            sin_t[t * half + i] = static_cast<float>(std::sin(angle));
        }
    }

    Tensor y = tape.alloc(tx.shape());
    ops_detail::rope_rotate(tx.f32(), y.f32(), table.f32(), batch, seq, heads, head_dim, opt.style, 1.0f, false);
    Var out = tape.record("rope", y, {x}, &ops_detail::rope_backward);
    Node& node = tape.node(out);
    if (node.requires_grad) node.saved[0] = table;
    node.i[0] = static_cast<std::int64_t>(opt.style);
    node.i[1] = opt.start_pos;
    node.f[0] = opt.theta;
    return out;
}

}  // namespace mopt::autodiff
