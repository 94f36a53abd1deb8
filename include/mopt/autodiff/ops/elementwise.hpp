#pragma once
// Element-wise arithmetic with broadcasting of a row vector, scaling, reshaping and scalar
// reductions. Element-wise loops are xtensor expressions over adapted buffers.
#include "mopt/autodiff/ops/common.hpp"
#include "mopt/tensor/xview.hpp"

namespace mopt::autodiff {

namespace ops_detail {
enum class Arith : std::int64_t { add, sub, mul };

// b broadcasts when it has as many elements as a's last extent (a row vector [d] or [1, d]).
inline bool broadcasts(const Tensor& a, const Tensor& b) {
    return !(a.shape() == b.shape()) && a.rank() >= 1 && b.numel() == a.shape().back() &&
           b.shape().back() == a.shape().back();
}

inline void arith_backward(Tape& tape, Node& n) {
    const auto kind = static_cast<Arith>(n.i[0]);
    const bool bcast = n.i[1] != 0;
    const Tensor& a = tape.value_of(n, 0);
    const Tensor& b = tape.value_of(n, 1);
    const std::int64_t d = a.shape().back(), rows = a.shape().rows();
    const float* g = n.grad.f32();
    if (tape.wants_grad(n, 0)) {
        float* ga = tape.grad_of(n, 0).f32();
        if (kind == Arith::mul) {
            auto x_ga = rows_of(ga, 0, rows, d);
            if (bcast) x_ga += rows_of(g, 0, rows, d) * flat(b);
            else x_ga += rows_of(g, 0, rows, d) * rows_of(b);
        } else {
            add_into(ga, g, a.numel());
        }
    }
    if (tape.wants_grad(n, 1)) {
        float* gb = tape.grad_of(n, 1).f32();
        const float sign = kind == Arith::sub ? -1.0f : 1.0f;
        if (bcast) {
            // Sum over the broadcast rows.
            auto x_gb = flat(gb, 0, d);
            if (kind == Arith::mul) x_gb += xt::sum(rows_of(g, 0, rows, d) * rows_of(a), {0});
            else x_gb += sign * xt::sum(rows_of(g, 0, rows, d), {0});
        } else {
            auto x_gb = flat(gb, 0, b.numel());
            if (kind == Arith::mul) x_gb += flat(g, 0, b.numel()) * flat(a);
            else x_gb += sign * flat(g, 0, b.numel());
        }
    }
}

inline Var arith(const char* op, Arith kind, const Var& a, const Var& b) {
    const Tensor& ta = a.value();
    const Tensor& tb = b.value();
    const bool bcast = broadcasts(ta, tb);
    check(bcast || ta.shape() == tb.shape(), op, ": shapes ", ta.shape(), " and ", tb.shape(),
          " neither match nor broadcast a row vector over the last axis");
    Tape& tape = a.tape();
    Tensor out = tape.alloc(ta.shape());
    const std::int64_t d = ta.shape().back();
    parallel_chunks(ta.shape().rows(), [&](std::int64_t r0, std::int64_t r1) {
        auto y = rows_of(out.f32(), r0, r1, d);
        auto x = rows_of(ta.f32(), r0, r1, d);
        auto run = [&](const auto& rhs) {
            switch (kind) {
                case Arith::add: xt::noalias(y) = x + rhs; break;
                case Arith::sub: xt::noalias(y) = x - rhs; break;
                case Arith::mul: xt::noalias(y) = x * rhs; break;
            }
        };
        if (bcast) run(flat(tb.f32(), 0, d));
        else run(rows_of(tb.f32(), r0, r1, d));
    });
    Var y = tape.record(op, out, {a, b}, &arith_backward);
    tape.node(y).i[0] = static_cast<std::int64_t>(kind);
    tape.node(y).i[1] = bcast;
    return y;
}
}  // namespace ops_detail

// a + b; b may be a row vector [d] broadcast over a's rows. a: [..., d], b: [..., d] or [d] -> a's shape
inline Var add(const Var& a, const Var& b) { return ops_detail::arith("add", ops_detail::Arith::add, a, b); }
// a - b with the same broadcasting as add.
inline Var sub(const Var& a, const Var& b) { return ops_detail::arith("sub", ops_detail::Arith::sub, a, b); }
// a ⊙ b with the same broadcasting as add.
inline Var mul(const Var& a, const Var& b) { return ops_detail::arith("mul", ops_detail::Arith::mul, a, b); }

inline Var operator+(const Var& a, const Var& b) { return add(a, b); }
inline Var operator-(const Var& a, const Var& b) { return sub(a, b); }
inline Var operator*(const Var& a, const Var& b) { return mul(a, b); }

// s * x. x: any shape -> same shape
inline Var scale(const Var& x, float s) {
    Tape& tape = x.tape();
    const Tensor& tx = x.value();
    Tensor out = tape.alloc(tx.shape());
    ops_detail::parallel_chunks(tx.numel(), [&](std::int64_t b, std::int64_t e) {
        xt::noalias(flat(out.f32(), b, e)) = s * flat(tx.f32(), b, e);
    });
    Var y = tape.record("scale", out, {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        auto g = flat(t.grad_of(n, 0));
        g += static_cast<float>(n.f[0]) * flat(n.grad);
    });
    tape.node(y).f[0] = s;
    return y;
}

// Each row of x times its own scalar: y[r, :] = s[r] · x[r, :] (a router's gate value applied to
// the expert output of its token). x: [..., d], s: [rows of x] (any shape with that many elements)
inline Var scale_rows(const Var& x, const Var& s) {
    const Tensor& tx = x.value();
    const Tensor& ts = s.value();
    check(tx.rank() >= 1 && ts.numel() == tx.shape().rows(), "scale_rows: x of shape ", tx.shape(), " has ",
          tx.rank() >= 1 ? tx.shape().rows() : 0, " rows but s of shape ", ts.shape(), " has ", ts.numel(),
          " scalars");
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape());
    const std::int64_t d = tx.shape().back();
    ops_detail::parallel_for(tx.shape().rows(), d, [&](std::int64_t r) {
        const float sr = ts.f32()[r];
        const float* xr = tx.f32() + r * d;
        float* yr = out.f32() + r * d;
        for (std::int64_t j = 0; j < d; ++j) yr[j] = sr * xr[j];
    });
    return tape.record("scale_rows", out, {x, s}, [](Tape& t, Node& n) {
        const Tensor& xv = t.value_of(n, 0);
        const Tensor& sv = t.value_of(n, 1);
        const std::int64_t dd = xv.shape().back(), rows = xv.shape().rows();
        const float* g = n.grad.f32();
        float* gx = t.wants_grad(n, 0) ? t.grad_of(n, 0).f32() : nullptr;
        float* gs = t.wants_grad(n, 1) ? t.grad_of(n, 1).f32() : nullptr;
        ops_detail::parallel_for(rows, dd, [&](std::int64_t r) {
            const float* gr = g + r * dd;
            if (gx != nullptr) {
                const float sr = sv.f32()[r];
                for (std::int64_t j = 0; j < dd; ++j) gx[r * dd + j] += sr * gr[j];
            }
            if (gs != nullptr) {
                const float* xr = xv.f32() + r * dd;
                double dot = 0.0;
                for (std::int64_t j = 0; j < dd; ++j) dot += static_cast<double>(gr[j]) * xr[j];
                gs[r] += static_cast<float>(dot);
            }
        });
    });
}

// The same elements with new extents (no copy). x: any shape -> shape (same numel)
inline Var reshape(const Var& x, Shape shape) {
    Tape& tape = x.tape();
    check(shape.numel() == x.value().numel(), "reshape: cannot view shape ", x.shape(), " as ", shape);
    return tape.record("reshape", x.value().reshape(shape), {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        ops_detail::add_into(t.grad_of(n, 0).f32(), n.grad.f32(), n.grad.numel());
    });
}

// Sum of all elements. x: any shape -> [] (scalar)
inline Var sum(const Var& x) {
    Tape& tape = x.tape();
    Tensor out = tape.alloc(Shape{});
    const float* p = x.value().f32();
    const std::int64_t n = x.value().numel();
    double total = 0.0;  // double: a float running sum loses digits over millions of terms
#pragma omp parallel for reduction(+ : total) schedule(static) if (n >= (1 << 16) && !backend::cpu::in_parallel_region())
    for (std::int64_t i = 0; i < n; ++i) total += p[i];
    out.f32()[0] = static_cast<float>(total);
    return tape.record("sum", out, {x}, [](Tape& t, Node& nd) {
        if (!t.wants_grad(nd, 0)) return;
        float* g = t.grad_of(nd, 0).f32();
        const float gy = nd.grad.f32()[0];
        ops_detail::parallel_chunks(t.value_of(nd, 0).numel(), [&](std::int64_t b, std::int64_t e) {
            flat(g, b, e) += gy;
        });
    });
}

// Mean of all elements. x: any shape -> [] (scalar)
inline Var mean(const Var& x) { return scale(sum(x), 1.0f / static_cast<float>(std::max<std::int64_t>(x.value().numel(), 1))); }

}  // namespace mopt::autodiff
