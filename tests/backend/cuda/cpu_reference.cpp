// The CPU side of the CUDA kernel tests (see cpu_reference.hpp): each reference runs mopt's CPU op,
// and each backward is the tape's vector-Jacobian product for a given upstream gradient.
#include "cpu_reference.hpp"

#include <mopt/autodiff/ops.hpp>
#include <mopt/autodiff/tape.hpp>
#include <mopt/backend/cpu/gemm.hpp>
#include <mopt/tensor/tensor.hpp>

#include <span>

namespace mopt::cuda_test::ref {

namespace {

using autodiff::Tape;
using autodiff::Var;

Tensor tensor(Shape shape, const Floats& values) { return Tensor::from(shape, std::span<const float>(values)); }

Floats values(const Tensor& t) {
    const auto s = t.span();
    return {s.begin(), s.end()};
}

autodiff::RopeOptions rope_options(float theta, std::int64_t start_pos, bool interleaved) {
    return {.theta = theta,
            .start_pos = start_pos,
            .style = interleaved ? autodiff::RopeStyle::interleaved : autodiff::RopeStyle::half};
}

Var apply(Act f, const Var& x) {
    switch (f) {
        case Act::relu: return autodiff::relu(x);
        case Act::gelu: return autodiff::gelu(x);
        case Act::silu: return autodiff::silu(x);
    }
    return x;
}

}  // namespace

Floats gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, float beta,
            const Floats& a, std::int64_t lda, const Floats& b, std::int64_t ldb, Floats c, std::int64_t ldc) {
    backend::cpu::gemm({.trans_a = trans_a, .trans_b = trans_b, .m = m, .n = n, .k = k, .alpha = alpha, .beta = beta,
                        .a = a.data(), .lda = lda, .b = b.data(), .ldb = ldb, .c = c.data(), .ldc = ldc});
    return c;
}

NormForward rms_norm_forward(const Floats& x, const Floats& weight, std::int64_t rows, std::int64_t d, float eps) {
    Tape tape;
    const Var y =
        autodiff::rms_norm(tape.input(tensor({rows, d}, x), false), tape.input(tensor({d}, weight), false), eps);
    return {.y = values(y.value()), .mean = {}, .rstd = values(tape.node(y).saved[0])};
}

NormGrads rms_norm_backward(const Floats& x, const Floats& weight, const Floats& dy, std::int64_t rows, std::int64_t d,
                            float eps) {
    Tape tape;
    const Var vx = tape.input(tensor({rows, d}, x)), vw = tape.input(tensor({d}, weight));
    tape.backward(autodiff::rms_norm(vx, vw, eps), tensor({rows, d}, dy));
    return {.dx = values(vx.grad()), .dweight = values(vw.grad()), .dbias = {}};
}

NormForward layer_norm_forward(const Floats& x, const Floats& weight, const Floats& bias, std::int64_t rows,
                               std::int64_t d, float eps) {
    Tape tape;
    const Var y = autodiff::layer_norm(tape.input(tensor({rows, d}, x), false), tape.input(tensor({d}, weight), false),
                                       tape.input(tensor({d}, bias), false), eps);
    const autodiff::Node& node = tape.node(y);
    return {.y = values(y.value()), .mean = values(node.saved[0]), .rstd = values(node.saved[1])};
}

NormGrads layer_norm_backward(const Floats& x, const Floats& weight, const Floats& bias, const Floats& dy,
                              std::int64_t rows, std::int64_t d, float eps) {
    Tape tape;
    const Var vx = tape.input(tensor({rows, d}, x)), vw = tape.input(tensor({d}, weight)),
              vb = tape.input(tensor({d}, bias));
    tape.backward(autodiff::layer_norm(vx, vw, vb, eps), tensor({rows, d}, dy));
    return {.dx = values(vx.grad()), .dweight = values(vw.grad()), .dbias = values(vb.grad())};
}

Floats rope_forward(const Floats& x, std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t head_dim,
                    float theta, std::int64_t start_pos, bool interleaved) {
    Tape tape;
    const Var y = autodiff::rope(tape.input(tensor({batch, seq, heads, head_dim}, x), false),
                                 rope_options(theta, start_pos, interleaved));
    return values(y.value());
}

Floats rope_backward(const Floats& x, const Floats& dy, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                     std::int64_t head_dim, float theta, std::int64_t start_pos, bool interleaved) {
    Tape tape;
    const Shape shape{batch, seq, heads, head_dim};
    const Var vx = tape.input(tensor(shape, x));
    tape.backward(autodiff::rope(vx, rope_options(theta, start_pos, interleaved)), tensor(shape, dy));
    return values(vx.grad());
}

Floats activation_forward(Act f, const Floats& x) {
    Tape tape;
    const auto n = static_cast<std::int64_t>(x.size());
    return values(apply(f, tape.input(tensor({n}, x), false)).value());
}

Floats activation_backward(Act f, const Floats& x, const Floats& dy) {
    Tape tape;
    const auto n = static_cast<std::int64_t>(x.size());
    const Var vx = tape.input(tensor({n}, x));
    tape.backward(apply(f, vx), tensor({n}, dy));
    return values(vx.grad());
}

Floats swiglu_forward(const Floats& gate, const Floats& up) {
    Tape tape;
    const auto n = static_cast<std::int64_t>(gate.size());
    return values(autodiff::swiglu(tape.input(tensor({n}, gate), false), tape.input(tensor({n}, up), false)).value());
}

SwigluGrads swiglu_backward(const Floats& gate, const Floats& up, const Floats& dy) {
    Tape tape;
    const auto n = static_cast<std::int64_t>(gate.size());
    const Var vg = tape.input(tensor({n}, gate)), vu = tape.input(tensor({n}, up));
    tape.backward(autodiff::swiglu(vg, vu), tensor({n}, dy));
    return {.d_gate = values(vg.grad()), .d_up = values(vu.grad())};
}

CrossEntropy cross_entropy(const Floats& logits, const std::vector<std::int32_t>& targets, std::int64_t rows,
                           std::int64_t vocab, std::int32_t ignore_index) {
    Tape tape;
    const Var vx = tape.input(tensor({rows, vocab}, logits));
    const Tensor t = Tensor::from({rows}, std::span<const std::int32_t>(targets));
    const Var loss = autodiff::cross_entropy(vx, t, ignore_index);
    tape.backward(loss);
    return {.loss = loss.item(), .dlogits = values(vx.grad())};
}

}  // namespace mopt::cuda_test::ref
