#pragma once
// Knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): the
// cross-entropy of the student's softened distribution against a teacher's soft targets,
//
//   p_r = softmax(t_r / τ)                     the teacher's targets, a constant (no gradient)
//   L   = τ² · (1/count) Σ_r −Σ_v p_r[v] · log softmax(z_r / τ)[v]
//       = τ² · (1/count) Σ_r [H(p_r) + KL(p_r ‖ softmax(z_r / τ))]
//   dL/dz_r = (τ/count) · (softmax(z_r / τ) − p_r)
//
// The τ² keeps the gradient's size independent of τ. Rows whose target is ignore_index (when
// targets are given) are left out of the mean exactly as cross_entropy leaves them out. Like
// cross_entropy it is a fused row kernel: per row the student's and the teacher's max and
// log Σ exp(x − max) are kept ([rows, 4]), and both softmaxes are recomputed in the backward rather
// than stored ([rows, V] each). The entropy term makes L ≥ 0 but not 0 when student == teacher;
// the gradient is then exactly 0.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mopt/autodiff/ops/common.hpp"

namespace mopt::autodiff {

struct SoftCrossEntropyOptions {
    float temperature = 1.0f;          // τ > 0: both distributions are softmax(logits / τ)
    const Tensor* targets = nullptr;   // i32 [...] (the logits' shape without V): rows equal to
    std::int32_t ignore_index = -100;  // ignore_index are left out; null: every row counts
};

namespace ops_detail {

// max and log Σ exp(x − max) of x / τ over one row of n values.
inline void scaled_row_stats(const float* x, std::int64_t n, float inv_tau, float& row_max, float& log_sum) {
    const float m = *std::max_element(x, x + n) * inv_tau;
    double sum = 0.0;  // ≥ 1 (the max contributes exp(0))
    for (std::int64_t j = 0; j < n; ++j) sum += std::exp(x[j] * inv_tau - m);
    row_max = m;
    log_sum = static_cast<float>(std::log(sum));
}

// saved[0]: teacher logits, saved[1]: targets (undefined: all rows), saved[2]: per-row stats
// [student max, student log-sum, teacher max, teacher log-sum] of logits / τ;
// f[0]: τ / count (the gradient's scale), f[1]: 1/τ; i[0]: ignore_index.
inline void soft_cross_entropy_backward(Tape& tape, Node& n) {
    if (!tape.wants_grad(n, 0)) return;
    const Tensor& logits = tape.value_of(n, 0);
    const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
    const float* z = logits.f32();
    const float* t = n.saved[0].f32();
    const std::int32_t* targets = n.saved[1].defined() ? n.saved[1].data<std::int32_t>() : nullptr;
    const float* stats = n.saved[2].f32();
    const auto ignore_index = static_cast<std::int32_t>(n.i[0]);
    const float scale = n.grad.f32()[0] * static_cast<float>(n.f[0]);
    const auto inv_tau = static_cast<float>(n.f[1]);
    float* gz = tape.grad_of(n, 0).f32();
    parallel_for(rows, 8 * vocab, [&](std::int64_t r) {
        if (targets != nullptr && targets[r] == ignore_index) return;
        const float* zr = z + r * vocab;
        const float* tr = t + r * vocab;
        float* dzr = gz + r * vocab;
        const float* s = stats + 4 * r;
        const float zoff = s[0] + s[1], toff = s[2] + s[3];  // log Σ exp(x/τ) of each row
        for (std::int64_t j = 0; j < vocab; ++j)
            dzr[j] += scale * (std::exp(zr[j] * inv_tau - zoff) - std::exp(tr[j] * inv_tau - toff));
    });
}

}  // namespace ops_detail

// Soft-target cross-entropy of `logits` (the student) against softmax(teacher_logits / τ), scaled
// by τ², mean over the counted rows (see the top of this file). The teacher's logits are data: no
// gradient reaches them. logits: [..., V] f32, teacher_logits: the same shape f32 -> [] (scalar)
inline Var soft_cross_entropy(const Var& logits, const Tensor& teacher_logits, const SoftCrossEntropyOptions& o = {}) {
    const Tensor& tz = logits.value();
    ops_detail::expect_dtype("soft_cross_entropy", tz, DType::f32, "logits");
    ops_detail::expect_dtype("soft_cross_entropy", teacher_logits, DType::f32, "teacher logits");
    check(tz.rank() >= 1 && tz.shape().back() > 0,
          "soft_cross_entropy: logits must have a non-empty last (vocabulary) axis, got shape ", tz.shape());
    check(teacher_logits.shape() == tz.shape(), "soft_cross_entropy: teacher logits of shape ", teacher_logits.shape(),
          " do not match the student's logits of shape ", tz.shape());
    check(std::isfinite(o.temperature) && o.temperature > 0.0f, "soft_cross_entropy: temperature = ", o.temperature,
          " must be positive");
    const std::int64_t vocab = tz.shape().back(), rows = tz.shape().rows();
    const std::int32_t* pt = nullptr;
    if (o.targets != nullptr) {
        const Tensor& targets = *o.targets;
        bool shape_ok = targets.rank() == tz.rank() - 1;
        for (int a = 0; shape_ok && a < targets.rank(); ++a) shape_ok = targets.dim(a) == tz.dim(a);
        check(shape_ok, "soft_cross_entropy: targets of shape ", targets.shape(), " do not match logits of shape ",
              tz.shape(), " (expected the logits' shape without its last axis)");
        ops_detail::expect_dtype("soft_cross_entropy", targets, DType::i32, "targets");
        pt = targets.data<std::int32_t>();
    }
    std::int64_t count = rows;
    if (pt != nullptr) count = std::count_if(pt, pt + rows, [&](std::int32_t t) { return t != o.ignore_index; });
    check(count > 0, "soft_cross_entropy: all ", rows, " targets equal ignore_index (", o.ignore_index,
          "); the mean loss over no rows is undefined");

    Tape& tape = logits.tape();
    const float tau = o.temperature, inv_tau = 1.0f / tau;
    Tensor stats = tape.alloc(Shape{rows, 4});
    Tensor row_loss = tape.alloc(Shape{rows});
    const float* pz = tz.f32();
    const float* ptl = teacher_logits.f32();
    float* ps = stats.f32();
    float* pl = row_loss.f32();
    ops_detail::parallel_for(rows, 8 * vocab, [&](std::int64_t r) {
        float* s = ps + 4 * r;
        if (pt != nullptr && pt[r] == o.ignore_index) {
            std::fill_n(s, 4, 0.0f);
            pl[r] = 0.0f;
            return;
        }
        const float* zr = pz + r * vocab;
        const float* tr = ptl + r * vocab;
        ops_detail::scaled_row_stats(zr, vocab, inv_tau, s[0], s[1]);
        ops_detail::scaled_row_stats(tr, vocab, inv_tau, s[2], s[3]);
        // −Σ p_v log q_v = Σ p_v ((max_z − z_v/τ) + log Σ_z): a sum of non-negative terms, no cancellation.
        const double toff = static_cast<double>(s[2]) + s[3];
        double acc = 0.0;
        for (std::int64_t j = 0; j < vocab; ++j) {
            const double p = std::exp(static_cast<double>(tr[j] * inv_tau) - toff);
            acc += p * ((static_cast<double>(s[0]) - zr[j] * inv_tau) + s[1]);
        }
        pl[r] = static_cast<float>(acc);
    });
    double total = 0.0;
    for (std::int64_t r = 0; r < rows; ++r) total += pl[r];

    Tensor out = tape.alloc(Shape{});
    out.f32()[0] = static_cast<float>(static_cast<double>(tau) * tau * total / static_cast<double>(count));
    Var y = tape.record("soft_cross_entropy", out, {logits}, &ops_detail::soft_cross_entropy_backward);
    Node& node = tape.node(y);
    node.saved[0] = teacher_logits;
    if (o.targets != nullptr) node.saved[1] = *o.targets;
    node.saved[2] = stats;
    node.f[0] = static_cast<double>(tau) / static_cast<double>(count);
    node.f[1] = inv_tau;
    node.i[0] = o.ignore_index;
    return y;
}

}  // namespace mopt::autodiff
