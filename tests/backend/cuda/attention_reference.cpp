// The CPU side of tests/backend/cuda/attention.cu (see attention_reference.hpp).
#include "attention_reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <mopt/autodiff/ops/attention.hpp>
#include <mopt/autodiff/tape.hpp>

namespace mopt::cuda_test {

namespace {

// The row logsumexp the CUDA forward saves, computed from its definition in double: the CPU op
// keeps no such statistic. The mask is written as the CPU op's test states it.
std::vector<float> logsumexp_rows(const AttentionCase& c, const std::vector<float>& q, const std::vector<float>& k) {
    const std::int64_t B = c.batch, T = c.seq_q, S = c.seq_k, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
    const double scale = c.scale != 0.0f ? c.scale : 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<float> lse(static_cast<std::size_t>(B * H * T));
    std::vector<double> w(static_cast<std::size_t>(S));
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < H; ++h) {
            const std::int64_t kh = h / (H / Hkv);
            for (std::int64_t t = 0; t < T; ++t) {
                const std::int64_t pos = S - T + t;
                double mx = -std::numeric_limits<double>::infinity();
                for (std::int64_t j = 0; j < S; ++j) {
                    w[j] = -std::numeric_limits<double>::infinity();
                    if (c.causal && j > pos && j >= c.prefix) continue;
                    double s = 0;
                    for (std::int64_t i = 0; i < D; ++i)
                        s += static_cast<double>(q[((b * T + t) * H + h) * D + i]) *
                             k[((b * S + j) * Hkv + kh) * D + i];
                    w[j] = s * scale;
                    mx = std::max(mx, w[j]);
                }
                double total = 0;
                for (std::int64_t j = 0; j < S; ++j) total += std::exp(w[j] - mx);
                lse[(b * H + h) * T + t] = static_cast<float>(mx + std::log(total));
            }
        }
    return lse;
}

}  // namespace

AttentionReference attention_reference(const AttentionCase& c, const std::vector<float>& q,
                                       const std::vector<float>& k, const std::vector<float>& v,
                                       const std::vector<float>& grad_out) {
    using namespace mopt::autodiff;
    const Shape q_shape{c.batch, c.seq_q, c.heads, c.head_dim}, kv_shape{c.batch, c.seq_k, c.kv_heads, c.head_dim};
    Tape tape;
    Var vq = tape.input(Tensor::from(q_shape, q)), vk = tape.input(Tensor::from(kv_shape, k)),
        vv = tape.input(Tensor::from(kv_shape, v));
    Var y = attention(vq, vk, vv, {.causal = c.causal, .prefix = c.prefix, .scale = c.scale});
    tape.backward(y, Tensor::from(q_shape, grad_out));
    return {y.value().to_vector(), logsumexp_rows(c, q, k), vq.grad().to_vector(), vk.grad().to_vector(),
            vv.grad().to_vector()};
}

}  // namespace mopt::cuda_test
