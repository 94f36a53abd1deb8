#pragma once
// CPU reference for the CUDA attention tests: mopt's autodiff attention op (forward, and backward
// through its tape) behind plain std::vector<float> interfaces, compiled by g++ so the CUDA test file
// never includes the CPU, Eigen or xtensor headers.
#include <cstdint>
#include <vector>

namespace mopt::cuda_test {

struct AttentionCase {
    std::int64_t batch, seq_q, seq_k, heads, kv_heads, head_dim;
    bool causal = true;
    std::int64_t prefix = 0;
    float scale = 0.0f;  // 0 -> 1/sqrt(head_dim)
};

struct AttentionReference {
    std::vector<float> out;  // [B, T, H, Dh]
    std::vector<float> lse;  // [B, H, T] logsumexp of each row's visible scaled scores
    std::vector<float> dq;   // [B, T, H, Dh]
    std::vector<float> dk;   // [B, S, Hkv, Dh]
    std::vector<float> dv;   // [B, S, Hkv, Dh]
};

// q, grad_out: [B, T, H, Dh], k, v: [B, S, Hkv, Dh] -> out and lse from the forward, dq, dk, dv from
// Tape::backward(out, grad_out).
AttentionReference attention_reference(const AttentionCase& c, const std::vector<float>& q,
                                       const std::vector<float>& k, const std::vector<float>& v,
                                       const std::vector<float>& grad_out);

}  // namespace mopt::cuda_test
