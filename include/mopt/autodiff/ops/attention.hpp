#pragma once
// Scaled dot-product attention (Vaswani et al., 2017, eq. 1) with grouped key/value heads
// (Ainslie et al., GQA, 2023): query head h reads kv head h / (H / Hkv). Queries are the last T of
// the S key positions, so the same op serves training (T = S) and decoding with a KV cache (T < S).
// A soft prompt of `prefix` positions (Lester et al., 2021) is visible to every query and attends
// to itself bidirectionally.
//
// Work is split over (batch, kv head): a GQA group's query heads all write the same dK/dV slice,
// so one item per group makes the backward free of races without atomics or per-head copies.
// Per-head products are strided GEMMs straight on the [B, T, H, Dh] layout (no transposed copies).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "mopt/autodiff/ops/common.hpp"
#include "mopt/backend/cpu/gemm.hpp"
#include "mopt/backend/cpu/vector_math.hpp"

namespace mopt::autodiff {

struct AttentionOptions {
    bool causal = true;
    std::int64_t prefix = 0;  // the first `prefix` key positions are visible to every query
    float scale = 0.0f;       // 0 -> 1/sqrt(Dh)
};

namespace ops_detail {

// Shapes and attributes shared by forward and backward.
struct AttentionDims {
    std::int64_t batch, seq_q, seq_k, heads, kv_heads, head_dim, group;
    bool causal;
    std::int64_t prefix;
    float scale;

    // Keys [0, visible(t)) are seen by query t: the causal limit (its absolute position S - T + t)
    // and the prefix are both leading ranges, so their union is one range and the masked tail of
    // each score row can be skipped rather than filled with -inf.
    [[nodiscard]] std::int64_t visible(std::int64_t t) const {
        if (!causal) return seq_k;
        return std::min(seq_k, std::max(seq_k - seq_q + t + 1, prefix));
    }
    // Flops of one (batch, kv head) item: four T x S x Dh products per query head.
    [[nodiscard]] std::int64_t work_per_item() const { return group * seq_q * seq_k * head_dim * 4; }
};

// Row-wise softmax of the scaled scores over the visible keys for query rows [t0, t0 + rows);
// masked entries become exact zeros so the backward and P V need no mask. p: rows of [T, S]
inline void attention_softmax_rows(float* p, const AttentionDims& d, std::int64_t t0, std::int64_t rows) {
    for (std::int64_t t = 0; t < rows; ++t) {
        float* row = p + t * d.seq_k;
        const std::int64_t lim = d.visible(t0 + t);
        backend::cpu::softmax_row(row, lim);  // stable: subtracts the row max
        std::fill(row + lim, row + d.seq_k, 0.0f);
    }
}

// Query rows per block: small enough that blocks follow the causal diagonal closely, large
// enough that each block's GEMMs stay efficient.
inline constexpr std::int64_t attention_block = 64;

inline AttentionDims attention_dims(const Node& n, const Tensor& q, const Tensor& k) {
    return {q.dim(0), q.dim(1), k.dim(1), q.dim(2), k.dim(2), q.dim(3), q.dim(2) / k.dim(2),
            n.i[0] != 0, n.i[1], static_cast<float>(n.f[0])};
}

inline void attention_backward(Tape& tape, Node& n) {
    using backend::cpu::gemm;
    const Tensor& q = tape.value_of(n, 0);
    const Tensor& k = tape.value_of(n, 1);
    const Tensor& v = tape.value_of(n, 2);
    const AttentionDims d = attention_dims(n, q, k);
    const std::int64_t T = d.seq_q, S = d.seq_k, Dh = d.head_dim;
    const std::int64_t ldq = d.heads * Dh, ldk = d.kv_heads * Dh;

    // Buffers are fetched before the parallel region: grad_of and alloc touch the tape.
    float* dq = tape.wants_grad(n, 0) ? tape.grad_of(n, 0).f32() : nullptr;
    float* dk = tape.wants_grad(n, 1) ? tape.grad_of(n, 1).f32() : nullptr;
    float* dv = tape.wants_grad(n, 2) ? tape.grad_of(n, 2).f32() : nullptr;
    const bool need_ds = dq || dk;
    // dS scratch, one [T, S] per item so items never share it.
    Tensor ds_all = need_ds ? tape.alloc({d.batch * d.kv_heads, T, S}) : Tensor{};
    const float* prob = n.saved[0].f32();
    const float* grad_out = n.grad.f32();

    parallel_for(d.batch * d.kv_heads, d.work_per_item(), [&](std::int64_t item) {
        const std::int64_t b = item / d.kv_heads, kvh = item % d.kv_heads;
        const float* kb = k.f32() + b * S * ldk + kvh * Dh;
        const float* vb = v.f32() + b * S * ldk + kvh * Dh;
        float* ds = need_ds ? ds_all.f32() + item * T * S : nullptr;
        for (std::int64_t g = 0; g < d.group; ++g) {
            const std::int64_t h = kvh * d.group + g;
            const float* p = prob + (b * d.heads + h) * T * S;
            const float* go = grad_out + b * T * ldq + h * Dh;
            const float* qh = q.f32() + b * T * ldq + h * Dh;
            for (std::int64_t t0 = 0; t0 < T; t0 += attention_block) {
                const std::int64_t rows = std::min(attention_block, T - t0), kv = d.visible(t0 + rows - 1);
                const float* pb = p + t0 * S;
                if (dv)  // dV += Pᵀ dO
                    gemm({.trans_a = true, .m = kv, .n = Dh, .k = rows, .beta = 1.0f, .a = pb, .lda = S,
                          .b = go + t0 * ldq, .ldb = ldq, .c = dv + b * S * ldk + kvh * Dh, .ldc = ldk});
                if (!need_ds) continue;
                float* dsb = ds + t0 * S;
                // dP = dO Vᵀ
                gemm({.trans_b = true, .m = rows, .n = kv, .k = Dh, .a = go + t0 * ldq, .lda = ldq, .b = vb,
                      .ldb = ldk, .c = dsb, .ldc = S});
                // Softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked P are zero, so is their dS.
                for (std::int64_t t = 0; t < rows; ++t) {
                    const float* pr = pb + t * S;
                    float* dr = dsb + t * S;
                    const std::int64_t lim = d.visible(t0 + t);
                    float dot = 0.0f;
                    for (std::int64_t j = 0; j < lim; ++j) dot += pr[j] * dr[j];
                    for (std::int64_t j = 0; j < lim; ++j) dr[j] = pr[j] * (dr[j] - dot);
                    std::fill(dr + lim, dr + kv, 0.0f);
                }
                if (dq)  // dQ += scale · dS K
                    gemm({.m = rows, .n = Dh, .k = kv, .alpha = d.scale, .beta = 1.0f, .a = dsb, .lda = S, .b = kb,
                          .ldb = ldk, .c = dq + b * T * ldq + h * Dh + t0 * ldq, .ldc = ldq});
                if (dk)  // dK += scale · dSᵀ Q
                    gemm({.trans_a = true, .m = kv, .n = Dh, .k = rows, .alpha = d.scale, .beta = 1.0f, .a = dsb,
                          .lda = S, .b = qh + t0 * ldq, .ldb = ldq, .c = dk + b * S * ldk + kvh * Dh, .ldc = ldk});
            }
        }
    });
}

}  // namespace ops_detail

// softmax(scale · Q Kᵀ + mask) V per head, kv heads shared by groups of H / Hkv query heads.
// q: [B, T, H, Dh], k, v: [B, S, Hkv, Dh] -> [B, T, H, Dh]
inline Var attention(const Var& q, const Var& k, const Var& v, AttentionOptions opt = {}) {
    using backend::cpu::gemm;
    const Tensor& tq = q.value();
    const Tensor& tk = k.value();
    const Tensor& tv = v.value();
    auto shapes = [&] { return mopt::detail::concat("q ", tq.shape(), ", k ", tk.shape(), ", v ", tv.shape()); };
    check(tq.rank() == 4 && tk.rank() == 4 && tv.rank() == 4,
          "attention: q must be 4-D [B, T, H, Dh] and k, v 4-D [B, S, Hkv, Dh]; got ", shapes());
    ops_detail::expect_dtype("attention", tq, DType::f32, "q");
    ops_detail::expect_dtype("attention", tk, DType::f32, "k");
    ops_detail::expect_dtype("attention", tv, DType::f32, "v");
    check(tk.shape() == tv.shape(), "attention: k and v must have the same shape [B, S, Hkv, Dh]; got ", shapes());
    check(tq.dim(0) == tk.dim(0), "attention: batch sizes differ (", tq.dim(0), " vs ", tk.dim(0), "); got ",
          shapes());
    check(tq.dim(3) == tk.dim(3), "attention: head dims differ (", tq.dim(3), " vs ", tk.dim(3), "); got ",
          shapes());
    check(tq.dim(3) > 0, "attention: head dim must be positive; got ", shapes());
    check(tk.dim(2) > 0 && tq.dim(2) % tk.dim(2) == 0, "attention: query heads H = ", tq.dim(2),
          " are not divisible by kv heads Hkv = ", tk.dim(2), "; got ", shapes());
    check(tq.dim(1) <= tk.dim(1), "attention: more queries than keys (T = ", tq.dim(1), " > S = ", tk.dim(1),
          "); the queries are the last T key positions; got ", shapes());
    check(opt.prefix >= 0, "attention: prefix must be >= 0, got ", opt.prefix);

    const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(tq.dim(3)));
    const ops_detail::AttentionDims d{tq.dim(0), tq.dim(1),  tk.dim(1), tq.dim(2), tk.dim(2), tq.dim(3),
                                      tq.dim(2) / tk.dim(2), opt.causal, opt.prefix, scale};
    const std::int64_t T = d.seq_q, S = d.seq_k, Dh = d.head_dim;
    const std::int64_t ldq = d.heads * Dh, ldk = d.kv_heads * Dh;
    Tape& tape = q.tape();

    // P is kept for the backward only when a gradient will flow. Otherwise each thread reuses one
    // [block, S] score buffer that stays in its L2 cache: a [B·Hkv, T, S] buffer was the largest
    // allocation of a no-grad forward (8 MiB per layer at B = 4, T = 256) and streamed through DRAM.
    const bool keep_p = grad_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
    const std::int64_t block_rows = std::min(ops_detail::attention_block, T);
    Tensor prob = keep_p ? tape.alloc({d.batch, d.heads, T, S})
                         : tape.alloc({backend::cpu::max_threads(), block_rows, S});
    Tensor out = tape.alloc(tq.shape());
    const int level = backend::cpu::nesting_level();

    ops_detail::parallel_for(d.batch * d.kv_heads, d.work_per_item(), [&](std::int64_t item) {
        const std::int64_t b = item / d.kv_heads, kvh = item % d.kv_heads;
        const float* kb = tk.f32() + b * S * ldk + kvh * Dh;
        const float* vb = tv.f32() + b * S * ldk + kvh * Dh;
        float* scratch = keep_p ? nullptr : prob.f32() + backend::cpu::thread_slot(level) * block_rows * S;
        for (std::int64_t g = 0; g < d.group; ++g) {
            const std::int64_t h = kvh * d.group + g;
            float* p = keep_p ? prob.f32() + (b * d.heads + h) * T * S : nullptr;
            const float* qh = tq.f32() + b * T * ldq + h * Dh;
            float* oh = out.f32() + b * T * ldq + h * Dh;
            // Query blocks multiply only the keys they can see: a causal mask halves the work.
            for (std::int64_t t0 = 0; t0 < T; t0 += ops_detail::attention_block) {
                const std::int64_t rows = std::min(ops_detail::attention_block, T - t0), kv = d.visible(t0 + rows - 1);
                float* pb = keep_p ? p + t0 * S : scratch;
                // Scores = scale · Q Kᵀ, then the masked softmax in place.
                gemm({.trans_b = true, .m = rows, .n = kv, .k = Dh, .alpha = scale, .a = qh + t0 * ldq, .lda = ldq,
                      .b = kb, .ldb = ldk, .c = pb, .ldc = S});
                ops_detail::attention_softmax_rows(pb, d, t0, rows);
                // O = P V
                gemm({.m = rows, .n = Dh, .k = kv, .a = pb, .lda = S, .b = vb, .ldb = ldk, .c = oh + t0 * ldq,
                      .ldc = ldq});
            }
        }
    });

    Var y = tape.record("attention", out, {q, k, v}, &ops_detail::attention_backward);
    Node& node = tape.node(y);
    if (node.requires_grad) node.saved[0] = prob;
    node.i[0] = opt.causal;
    node.i[1] = opt.prefix;
    node.f[0] = scale;
    return y;
}

}  // namespace mopt::autodiff
