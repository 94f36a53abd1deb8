#pragma once
// AdamW on the GPU: train::AdamW's update (Loshchilov & Hutter 2019, decoupled weight decay, bias
// correction) in the same f32 arithmetic, for weights that train where they live — the pretraining
// step of nn::Transformer<…, backend::Cuda> (transformer.cuh) — with the pieces of gradient
// clipping by global norm around it:
//
//   add_scaled(y, x, a):     y += a·x                  (the backward's gradient into the accumulated one)
//   sum_squares(g, out):     *out += Σ g²  (f64)       (clip_grad_norm's norm, one scalar read back)
//   adamw_update(…, s):      g = s.grad_scale · g      (clip_grad_norm's factor)
//                            m = β₁m + (1−β₁)g,  v = β₂v + (1−β₂)g²
//                            w −= lr·((m/bc₁) / (√(v/bc₂) + ε) + λ·w)     (train::AdamW::step)
//                            copy = w rounded to the storage type       (bf16 weights: w is the f32 master)
//   round_to(copy, w):       copy = w rounded                          (a master's first upload)
//
// bc₁ = 1 − β₁ᵗ and bc₂ = 1 − β₂ᵗ come from the host as train::AdamW computes them.
#include <cstdint>

#include "mopt/backend/cuda/common.cuh"

namespace mopt::backend::cuda {

// One AdamW step's scalars (the optimizer's options at this step and the clipping factor).
struct AdamWStep {
    float lr = 0.0f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f;
    float bc1 = 1.0f, bc2 = 1.0f;  // bias corrections 1 − β₁ᵗ, 1 − β₂ᵗ
    float grad_scale = 1.0f;       // the clipping factor (1: unclipped)
};

namespace adamw_detail {

// Kernels are templates (float only) so that every translation unit may hold them (header-only).
template <class F>
__global__ void add_scaled_kernel(F* y, const F* x, std::int64_t n, F a) {
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
        y[i] += a * x[i];
}

template <class F>
__global__ void sum_squares_kernel(const F* g, std::int64_t n, double* out) {
    double s = 0.0;
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
        s += static_cast<double>(g[i]) * static_cast<double>(g[i]);
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// copy == nullptr: w is the stored weight itself (f32 storage, norm gains).
template <class T>
__global__ void adamw_kernel(float* w, float* m, float* v, const float* grad, std::int64_t n, AdamWStep s, T* copy) {
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const float g = grad[i] * s.grad_scale;
        const float mi = s.beta1 * m[i] + (1.0f - s.beta1) * g;
        const float vi = s.beta2 * v[i] + (1.0f - s.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float update = (mi / s.bc1) / (sqrtf(vi / s.bc2) + s.eps);
        float wi = w[i];
        wi -= s.lr * (update + s.weight_decay * wi);
        w[i] = wi;
        if (copy != nullptr) copy[i] = from_f32<T>(wi);
    }
}

template <class T>
__global__ void round_kernel(T* copy, const float* w, std::int64_t n) {
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
        copy[i] = from_f32<T>(w[i]);
}

}  // namespace adamw_detail

inline void add_scaled(float* y, const float* x, std::int64_t n, float a, cudaStream_t stream) {
    if (n == 0) return;
    adamw_detail::add_scaled_kernel<float><<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(y, x, n, a);
    check_launch("add_scaled", "[", n, "]");
}

// *out += Σ g² over g[0, n) (out: one device double, zeroed by the caller).
inline void sum_squares(const float* g, std::int64_t n, double* out, cudaStream_t stream) {
    if (n == 0) return;
    adamw_detail::sum_squares_kernel<float><<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(g, n, out);
    check_launch("sum_squares", "[", n, "]");
}

// One AdamW step of n weights w (f32) with moments m, v and gradient grad; copy (if not null)
// receives the new weights rounded to T.
template <class T>
void adamw_update(float* w, float* m, float* v, const float* grad, std::int64_t n, const AdamWStep& s, T* copy,
                  cudaStream_t stream) {
    if (n == 0) return;
    adamw_detail::adamw_kernel<T><<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(w, m, v, grad, n, s, copy);
    check_launch("adamw_update", "[", n, "]");
}

template <class T>
void round_to(T* copy, const float* w, std::int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    adamw_detail::round_kernel<T><<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(copy, w, n);
    check_launch("round_to", "[", n, "]");
}

}  // namespace mopt::backend::cuda
