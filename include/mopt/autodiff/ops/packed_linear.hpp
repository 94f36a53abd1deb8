#pragma once
// packed_linear: y = x Ŵᵀ with a frozen packed weight (compress/packed_weight.hpp: int8/int4/…
// codes, N:M or CSR), computed from the packed form. Only dx flows back (dx = dy Ŵ); the node
// keeps a pointer to the weight in Node::context, so the weight — owned by the model — must
// outlive the tape step.
#include "mopt/autodiff/ops/common.hpp"
#include "mopt/compress/packed_weight.hpp"

namespace mopt::autodiff {

namespace ops_detail {
inline void packed_linear_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const auto& w = *static_cast<const compress::PackedWeight*>(n.context);
    compress::matmul_backward(w, n.grad.f32(), n.grad.shape().rows(), tape.grad_of(n, 0).f32());
}
}  // namespace ops_detail

// x: [..., in], w: packed [out, in] -> [..., out]
inline Var packed_linear(const Var& x, const compress::PackedWeight& w) {
    const Tensor& tx = x.value();
    ops_detail::expect_dtype("packed_linear", tx, DType::f32, "input");
    check(tx.rank() >= 1 && tx.shape().back() == w.in(), "packed_linear: input ", tx.shape(), " does not match the ",
          w.format(), " weight [", w.out(), ", ", w.in(), "]");
    Tape& tape = x.tape();
    Tensor y = tape.alloc(tx.shape().with(-1, w.out()));
    compress::matmul(w, tx.f32(), tx.shape().rows(), y.f32());
    Var v = tape.record("packed_linear", y, {x}, &ops_detail::packed_linear_backward);
    tape.node(v).context = &w;
    return v;
}

}  // namespace mopt::autodiff
