#pragma once
// Softmax over the last axis and the fused log-softmax + negative log-likelihood loss.
// Both are fused row kernels written as plain loops over rows with parallel_for: each row needs
// its max and its sum of exponentials before any output can be written (two reductions feeding
// back into the row), and rows are independent, so they parallelise without synchronisation.
// Stability: every exponent is x − max(row) ≤ 0, so exp never overflows and the row sum is ≥ 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>

#include "mopt/autodiff/ops/common.hpp"
#include "mopt/backend/cpu/vector_math.hpp"

namespace mopt::autodiff {

namespace ops_detail {

inline void softmax_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const std::int64_t cols = n.value.shape().back(), rows = n.value.shape().rows();
    const float* y = n.value.f32();  // the output is all the backward needs
    const float* g = n.grad.f32();
    float* gx = tape.grad_of(n, 0).f32();
    // dx = y ⊙ (g − ⟨g, y⟩) per row
    parallel_for(rows, 4 * cols, [&](std::int64_t r) {
        const float* yr = y + r * cols;
        const float* gr = g + r * cols;
        float* dxr = gx + r * cols;
        double dot = 0.0;
        for (std::int64_t j = 0; j < cols; ++j) dot += static_cast<double>(gr[j]) * yr[j];
        const float dotf = static_cast<float>(dot);
        for (std::int64_t j = 0; j < cols; ++j) dxr[j] += yr[j] * (gr[j] - dotf);
    });
}

// "position 5 ([1, 2])": the flat index of a target and its index along each axis.
inline std::string describe_position(const Shape& shape, std::int64_t flat_index) {
    std::ostringstream os;
    os << flat_index;
    if (shape.rank() > 1) {
        std::int64_t idx[Shape::max_rank] = {};
        std::int64_t rest = flat_index;
        for (int a = shape.rank() - 1; a >= 0; --a) {
            idx[a] = rest % shape[a];
            rest /= shape[a];
        }
        os << " ([";
        for (int a = 0; a < shape.rank(); ++a) os << (a ? ", " : "") << idx[a];
        os << "])";
    }
    return os.str();
}

// saved[0]: targets (i32), saved[1]: per-row [max, log Σ exp(x − max)]; f[0]: 1/count; i[0]: ignore_index.
inline void cross_entropy_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const Tensor& logits = tape.value_of(n, 0);
    const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
    const float* x = logits.f32();
    const std::int32_t* targets = n.saved[0].data<std::int32_t>();
    const float* stats = n.saved[1].f32();
    const auto ignore_index = static_cast<std::int32_t>(n.i[0]);
    const float scale = n.grad.f32()[0] * static_cast<float>(n.f[0]);  // g / count
    float* gx = tape.grad_of(n, 0).f32();
    // dlogits = (softmax − onehot)·g/count; softmax is recomputed rather than stored ([rows, V]
    // would dominate the step's memory for a large vocabulary). Ignored rows get nothing.
    parallel_for(rows, 4 * vocab, [&](std::int64_t r) {
        const std::int32_t t = targets[r];
        if (t == ignore_index) return;
        const float* xr = x + r * vocab;
        float* dxr = gx + r * vocab;
        // (x − max) is exact for logits of similar magnitude, so large logits lose nothing here.
        const float row_max = stats[2 * r], log_sum = stats[2 * r + 1];
        auto dx = flat(dxr, 0, vocab);
        dx += scale * xt::exp((flat(xr, 0, vocab) - row_max) - log_sum);
        dxr[t] -= scale;
    });
}

}  // namespace ops_detail

// Softmax over the last axis. x: [..., n] -> [..., n]
inline Var softmax(const Var& x) {
    const Tensor& tx = x.value();
    check(tx.rank() >= 1 && tx.shape().back() > 0, "softmax: input must have a non-empty last axis, got shape ",
          tx.shape());
    const std::int64_t cols = tx.shape().back(), rows = tx.shape().rows();
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape());
    const float* px = tx.f32();
    float* py = out.f32();
    ops_detail::parallel_for(rows, 8 * cols, [&](std::int64_t r) {
        const float* xr = px + r * cols;
        float* yr = py + r * cols;
        std::copy_n(xr, cols, yr);
        backend::cpu::softmax_row(yr, cols);
    });
    return tape.record("softmax", out, {x}, &ops_detail::softmax_backward);
}

// log Σ_j exp(x_j) over the last axis, computed as max + log Σ exp(x − max); the router z-loss of
// Zoph et al. (ST-MoE) squares it. x: [..., n] -> [..., 1]
inline Var logsumexp(const Var& x) {
    const Tensor& tx = x.value();
    check(tx.rank() >= 1 && tx.shape().back() > 0, "logsumexp: input must have a non-empty last axis, got shape ",
          tx.shape());
    const std::int64_t cols = tx.shape().back(), rows = tx.shape().rows();
    Tape& tape = x.tape();
    Tensor out = tape.alloc(tx.shape().with(-1, 1));
    ops_detail::parallel_for(rows, 8 * cols, [&](std::int64_t r) {
        const float* xr = tx.f32() + r * cols;
        const float m = *std::max_element(xr, xr + cols);
        double acc = 0.0;
        for (std::int64_t j = 0; j < cols; ++j) acc += std::exp(static_cast<double>(xr[j] - m));
        out.f32()[r] = m + static_cast<float>(std::log(acc));
    });
    return tape.record("logsumexp", out, {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        const Tensor& xv = t.value_of(n, 0);
        const std::int64_t c = xv.shape().back(), rws = xv.shape().rows();
        float* gx = t.grad_of(n, 0).f32();
        // d lse / d x_j = softmax(x)_j
        ops_detail::parallel_for(rws, 8 * c, [&](std::int64_t r) {
            const float* xr = xv.f32() + r * c;
            const float lse = n.value.f32()[r], g = n.grad.f32()[r];
            for (std::int64_t j = 0; j < c; ++j) gx[r * c + j] += g * std::exp(xr[j] - lse);
        });
    });
}

// Fused log-softmax + negative log-likelihood, mean over the targets that are not ignore_index:
// L = (1/count) Σ_r [log Σ_j exp(x_rj) − x_r,t_r]. Fusing avoids materialising log-probabilities
// [rows, V]; the per-row log-sum-exp is split as max + log Σ exp(x − max) so it stays exact for
// logits around ±1e4. logits: [..., V] f32, targets: [...] i32 -> [] (scalar)
inline Var cross_entropy(const Var& logits, const Tensor& targets, std::int32_t ignore_index = -100) {
    const Tensor& tl = logits.value();
    ops_detail::expect_dtype("cross_entropy", tl, DType::f32, "logits");
    check(tl.rank() >= 1 && tl.shape().back() > 0,
          "cross_entropy: logits must have a non-empty last (vocabulary) axis, got shape ", tl.shape());
    bool shape_ok = targets.rank() == tl.rank() - 1;
    for (int a = 0; shape_ok && a < targets.rank(); ++a) shape_ok = targets.dim(a) == tl.dim(a);
    check(shape_ok, "cross_entropy: targets of shape ", targets.shape(), " do not match logits of shape ", tl.shape(),
          " (expected the logits' shape without its last axis)");
    ops_detail::expect_dtype("cross_entropy", targets, DType::i32, "targets");
    const std::int64_t vocab = tl.shape().back(), rows = tl.shape().rows();
    const std::int32_t* pt = targets.data<std::int32_t>();

    // Validated up front on one thread: an exception must not escape an OpenMP region.
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int32_t t = pt[r];
        if (t == ignore_index) continue;
        if (t < 0 || t >= vocab)  // the message is built only on failure (check evaluates its arguments)
            check(false, "cross_entropy: target ", t, " at position ",
                  ops_detail::describe_position(targets.shape(), r), " of targets ", targets.shape(),
                  " is outside [0, ", vocab, ") for logits ", tl.shape(), " (V = ", vocab,
                  ") and is not ignore_index (", ignore_index, ")");
        ++count;
    }
    check(count > 0, "cross_entropy: all ", rows, " targets of shape ", targets.shape(), " equal ignore_index (",
          ignore_index, "); the mean loss over no targets is undefined");

    Tape& tape = logits.tape();
    Tensor stats = tape.alloc(Shape{rows, 2});  // per row: max, log Σ exp(x − max)
    Tensor row_loss = tape.alloc(Shape{rows});
    const float* px = tl.f32();
    float* ps = stats.f32();
    float* pl = row_loss.f32();
    ops_detail::parallel_for(rows, 4 * vocab, [&](std::int64_t r) {
        const std::int32_t t = pt[r];
        if (t == ignore_index) {
            ps[2 * r] = ps[2 * r + 1] = pl[r] = 0.0f;
            return;
        }
        const float* xr = px + r * vocab;
        const float row_max = *std::max_element(xr, xr + vocab);
        double sum = 0.0;  // ≥ 1 (the max contributes exp(0)), so the log is finite
        for (std::int64_t j = 0; j < vocab; ++j) sum += std::exp(xr[j] - row_max);
        const double log_sum = std::log(sum);
        ps[2 * r] = row_max;
        ps[2 * r + 1] = static_cast<float>(log_sum);
        // (max − x_t) + log Σ: no cancellation of two large log-sum-exp and logit values.
        pl[r] = static_cast<float>((static_cast<double>(row_max) - xr[t]) + log_sum);
    });
    double total = 0.0;
    for (std::int64_t r = 0; r < rows; ++r) total += pl[r];

    Tensor out = tape.alloc(Shape{});
    out.f32()[0] = static_cast<float>(total / static_cast<double>(count));
    Var y = tape.record("cross_entropy", out, {logits}, &ops_detail::cross_entropy_backward);
    Node& node = tape.node(y);
    node.saved[0] = targets;
    node.saved[1] = stats;
    node.f[0] = 1.0 / static_cast<double>(count);
    node.i[0] = ignore_index;
    return y;
}

}  // namespace mopt::autodiff
