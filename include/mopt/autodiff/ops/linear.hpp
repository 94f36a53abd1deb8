#pragma once
// Linear layers and batched matrix products through BLAS (backend/cpu/gemm.hpp).
#include <optional>

#include "mopt/autodiff/ops/common.hpp"
#include "mopt/backend/cpu/gemm.hpp"

namespace mopt::autodiff {

namespace ops_detail {
inline void linear_backward(Tape& tape, Node& n) {
    using backend::cpu::gemm;
    const Tensor& x = tape.value_of(n, 0);
    const Tensor& w = tape.value_of(n, 1);
    const std::int64_t rows = x.shape().rows(), in = w.dim(1), out = w.dim(0);
    const float* g = n.grad.f32();
    if (tape.wants_grad(n, 0))  // dx += dy W
        gemm({.m = rows, .n = in, .k = out, .beta = 1.0f, .a = g, .lda = out, .b = w.f32(), .ldb = in,
              .c = tape.grad_of(n, 0).f32(), .ldc = in});
    if (tape.wants_grad(n, 1))  // dW += dyᵀ x  (skipped for frozen weights)
        gemm({.trans_a = true, .m = out, .n = in, .k = rows, .beta = 1.0f, .a = g, .lda = out, .b = x.f32(),
              .ldb = in, .c = tape.grad_of(n, 1).f32(), .ldc = in});
    if (n.num_in > 2 && tape.wants_grad(n, 2)) {  // db += Σ_rows dy
        float* gb = tape.grad_of(n, 2).f32();
        for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t o = 0; o < out; ++o) gb[o] += g[r * out + o];
    }
}
}  // namespace ops_detail

// y = x Wᵀ (+ b). x: [..., in], W: [out, in], b: [out] -> [..., out]
inline Var linear(const Var& x, const Var& w, std::optional<Var> b = std::nullopt) {
    using backend::cpu::gemm;
    const Tensor& tx = x.value();
    const Tensor& tw = w.value();
    check(tw.rank() == 2 && tx.rank() >= 1 && tx.shape().back() == tw.dim(1), "linear: input ", tx.shape(),
          " does not match weight ", tw.shape(), " (expected [..., ", tw.rank() == 2 ? tw.dim(1) : -1, "])");
    const std::int64_t rows = tx.shape().rows(), in = tw.dim(1), out = tw.dim(0);
    Tape& tape = x.tape();
    Tensor y = tape.alloc(tx.shape().with(-1, out));
    float beta = 0.0f;
    if (b) {
        const Tensor& tb = b->value();
        check(tb.numel() == out, "linear: bias ", tb.shape(), " does not match weight ", tw.shape());
        for (std::int64_t r = 0; r < rows; ++r) std::copy_n(tb.f32(), out, y.f32() + r * out);
        beta = 1.0f;
    }
    gemm({.trans_b = true, .m = rows, .n = out, .k = in, .beta = beta, .a = tx.f32(), .lda = in, .b = tw.f32(),
          .ldb = in, .c = y.f32(), .ldc = out});
    return b ? tape.record("linear", y, {x, w, *b}, &ops_detail::linear_backward)
             : tape.record("linear", y, {x, w}, &ops_detail::linear_backward);
}

namespace ops_detail {
inline void matmul_backward(Tape& tape, Node& n) {
    using backend::cpu::gemm;
    const bool ta = n.i[0] != 0, tb = n.i[1] != 0;
    const std::int64_t batch = n.i[2], m = n.grad.dim(-2), nn = n.grad.dim(-1);
    const Tensor& a = tape.value_of(n, 0);
    const Tensor& b = tape.value_of(n, 1);
    const std::int64_t k = ta ? a.dim(-2) : a.dim(-1);
    const std::int64_t sa = a.numel() / batch, sb = b.numel() / batch, sc = m * nn;
    const std::int64_t lda = a.dim(-1), ldb = b.dim(-1);
    const float* g = n.grad.f32();
    float* ga = tape.wants_grad(n, 0) ? tape.grad_of(n, 0).f32() : nullptr;
    float* gb = tape.wants_grad(n, 1) ? tape.grad_of(n, 1).f32() : nullptr;
    for (std::int64_t p = 0; p < batch; ++p) {
        // C = op(A) op(B): d op(A) = dC op(B)ᵀ, d op(B) = op(A)ᵀ dC.
        if (ga) {
            if (!ta) gemm({.trans_b = !tb, .m = m, .n = k, .k = nn, .beta = 1.0f, .a = g + p * sc, .lda = nn,
                           .b = b.f32() + p * sb, .ldb = ldb, .c = ga + p * sa, .ldc = lda});
            else gemm({.trans_a = tb, .trans_b = true, .m = k, .n = m, .k = nn, .beta = 1.0f, .a = b.f32() + p * sb,
                       .lda = ldb, .b = g + p * sc, .ldb = nn, .c = ga + p * sa, .ldc = lda});
        }
        if (gb) {
            if (!tb) gemm({.trans_a = !ta, .m = k, .n = nn, .k = m, .beta = 1.0f, .a = a.f32() + p * sa, .lda = lda,
                           .b = g + p * sc, .ldb = nn, .c = gb + p * sb, .ldc = ldb});
            else gemm({.trans_a = true, .trans_b = ta, .m = nn, .n = k, .k = m, .beta = 1.0f, .a = g + p * sc,
                       .lda = nn, .b = a.f32() + p * sa, .ldb = lda, .c = gb + p * sb, .ldc = ldb});
        }
    }
}
}  // namespace ops_detail

// Batched C = op(A) op(B), op = transpose when the flag is set; leading axes are the batch.
// a: [..., m, k] (or [..., k, m] if trans_a), b: [..., k, n] (or [..., n, k]) -> [..., m, n]
inline Var matmul(const Var& a, const Var& b, bool trans_a = false, bool trans_b = false) {
    using backend::cpu::gemm;
    const Tensor& ta = a.value();
    const Tensor& tb = b.value();
    check(ta.rank() >= 2 && ta.rank() == tb.rank(), "matmul: shapes ", ta.shape(), " and ", tb.shape(),
          " must both be at least 2-D and of the same rank");
    for (int d = 0; d + 2 < ta.rank(); ++d)
        check(ta.dim(d) == tb.dim(d), "matmul: batch axes of ", ta.shape(), " and ", tb.shape(), " differ");
    const std::int64_t m = trans_a ? ta.dim(-1) : ta.dim(-2), k = trans_a ? ta.dim(-2) : ta.dim(-1);
    const std::int64_t kb = trans_b ? tb.dim(-1) : tb.dim(-2), n = trans_b ? tb.dim(-2) : tb.dim(-1);
    check(k == kb, "matmul: inner extents differ: ", ta.shape(), (trans_a ? "ᵀ" : ""), " x ", tb.shape(),
          (trans_b ? "ᵀ" : ""));
    const std::int64_t batch = ta.numel() / (ta.dim(-1) * ta.dim(-2) > 0 ? ta.dim(-1) * ta.dim(-2) : 1);
    Tape& tape = a.tape();
    Tensor c = tape.alloc(ta.shape().with(-2, m).with(-1, n));
    for (std::int64_t p = 0; p < batch; ++p)
        gemm({.trans_a = trans_a, .trans_b = trans_b, .m = m, .n = n, .k = k, .a = ta.f32() + p * m * k,
              .lda = ta.dim(-1), .b = tb.f32() + p * k * n, .ldb = tb.dim(-1), .c = c.f32() + p * m * n, .ldc = n});
    Var y = tape.record("matmul", c, {a, b}, &ops_detail::matmul_backward);
    Node& node = tape.node(y);
    node.i = {trans_a, trans_b, batch, 0};
    return y;
}

}  // namespace mopt::autodiff
