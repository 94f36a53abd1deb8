#pragma once
// The CPU references of the CUDA kernel tests: mopt's own CPU ops behind plain float-vector
// interfaces, compiled by g++ (cpu_reference.cpp) so that the .cu test files never include the
// CPU, Eigen or xtensor headers. Forwards call the autodiff ops; backwards build the op on a tape,
// back-propagate the given upstream gradient and return the input gradients. Shapes are row-major
// and given as in the CUDA API they are compared with.
#include <cstdint>
#include <vector>

namespace mopt::cuda_test::ref {

using Floats = std::vector<float>;

// C = alpha * op(A) op(B) + beta * C through mopt::backend::cpu::gemm; returns the new C.
// a: [m, k] or [k, m] with lda, b: [k, n] or [n, k] with ldb, c: [m, ldc]
Floats gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, float beta,
            const Floats& a, std::int64_t lda, const Floats& b, std::int64_t ldb, Floats c, std::int64_t ldc);

struct NormForward {
    Floats y, mean, rstd;  // mean is empty for RMSNorm
};
struct NormGrads {
    Floats dx, dweight, dbias;  // dbias is empty for RMSNorm
};

// x: [rows, d], weight: [d] -> y: [rows, d], rstd: [rows]
NormForward rms_norm_forward(const Floats& x, const Floats& weight, std::int64_t rows, std::int64_t d, float eps);
// x, dy: [rows, d], weight: [d] -> dx: [rows, d], dweight: [d]
NormGrads rms_norm_backward(const Floats& x, const Floats& weight, const Floats& dy, std::int64_t rows, std::int64_t d,
                            float eps);
// x: [rows, d], weight, bias: [d] -> y: [rows, d], mean, rstd: [rows]
NormForward layer_norm_forward(const Floats& x, const Floats& weight, const Floats& bias, std::int64_t rows,
                               std::int64_t d, float eps);
// x, dy: [rows, d], weight, bias: [d] -> dx: [rows, d], dweight, dbias: [d]
NormGrads layer_norm_backward(const Floats& x, const Floats& weight, const Floats& bias, const Floats& dy,
                              std::int64_t rows, std::int64_t d, float eps);

// x: [batch, seq, heads, head_dim] -> rope(x) with positions start_pos + t
Floats rope_forward(const Floats& x, std::int64_t batch, std::int64_t seq, std::int64_t heads, std::int64_t head_dim,
                    float theta, std::int64_t start_pos, bool interleaved);
// x, dy: [batch, seq, heads, head_dim] -> dx
Floats rope_backward(const Floats& x, const Floats& dy, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                     std::int64_t head_dim, float theta, std::int64_t start_pos, bool interleaved);

enum class Act { relu, gelu, silu };
// x: [n] -> f(x)
Floats activation_forward(Act f, const Floats& x);
// x, dy: [n] -> dx
Floats activation_backward(Act f, const Floats& x, const Floats& dy);
// gate, up: [n] -> silu(gate) ⊙ up
Floats swiglu_forward(const Floats& gate, const Floats& up);
struct SwigluGrads {
    Floats d_gate, d_up;
};
// gate, up, dy: [n] -> d_gate, d_up
SwigluGrads swiglu_backward(const Floats& gate, const Floats& up, const Floats& dy);

struct CrossEntropy {
    float loss = 0.0f;
    Floats dlogits;  // d loss / d logits (the upstream gradient is 1)
};
// logits: [rows, vocab], targets: [rows] -> mean loss over non-ignored targets and dlogits
CrossEntropy cross_entropy(const Floats& logits, const std::vector<std::int32_t>& targets, std::int64_t rows,
                           std::int64_t vocab, std::int32_t ignore_index);

}  // namespace mopt::cuda_test::ref
