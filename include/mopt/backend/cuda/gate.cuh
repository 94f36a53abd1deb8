#pragma once
// The Mixture of Prompts' gate on the GPU (prompt/gate.hpp, prompt/mixture_of_prompts.hpp; Dun et
// al., "Sweeping Heterogeneity with Smart MoPs", Algorithm 1), forward and backward:
//
//   avg = mean of the hidden states entering L_int over their non-prompt rows        f32 [B, d]
//   h   = ReLU(avg W₁ᵀ)      W₁ "gate.w1" f32 [d_g, d]                                 f32 [B, d_g]
//   z   = h W₂ᵀ              W₂ "gate.w2" f32 [E, d_g]                                 f32 [B, E]
//   g   = softmax(z)         top_k > 0 (evaluation only): the k largest (ties: the lower expert),
//                            renormalised to sum 1, the others 0 (prompt::top_k_renormalised)
//
// and the scaling of the experts' prompt rows at the input of every layer ℓ ≥ L_int
// (prompt::scale_row_groups): row e·p + j of sequence b is multiplied by g[b, e].
//
// Backward: the gate sees only frozen rows (nothing trainable lies below L_int), so d avg is not
// formed; the gradients are those of W₁ and W₂:
//   dg[b, e] = Σ over layers ℓ ≥ L_int, rows j of expert e ⟨dy_ℓ[b, e·p + j], x_ℓ[b, e·p + j]⟩
//   dz = g ⊙ (dg − ⟨g, dg⟩),  dW₂ = dzᵀ h,  dh = (dz W₂) ⊙ [h > 0],  dW₁ = dhᵀ avg.
// The gate's sizes are small (B·E and d_g·d values), so its kernels favour simplicity: one block
// per sequence for the MLP, one block per (sequence, expert) for the scaling's backward.
#include <cuda_runtime.h>

#include <cstdint>

#include "mopt/backend/cuda/common.cuh"

namespace mopt::backend::cuda {

namespace gate_detail {

inline constexpr int mean_columns = 32, mean_lanes = 8;  // a mean block: 32 columns × 8 row lanes

// avg[b, j] = (1/(S − from)) Σ_{s = from}^{S−1} x[b, s, j]. grid (B, ⌈d/32⌉), block 32 × 8
template <class T>
__global__ void mean_rows_kernel(const T* x, float* avg, int seq, int from, int d) {
    __shared__ float partial[mean_lanes][mean_columns];
    const int b = blockIdx.x, j = blockIdx.y * mean_columns + threadIdx.x;
    float s = 0.0f;
    if (j < d)
        for (int r = from + static_cast<int>(threadIdx.y); r < seq; r += mean_lanes)
            s += to_f32(x[(static_cast<std::int64_t>(b) * seq + r) * d + j]);
    partial[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < d) {
        float total = 0.0f;
        for (int lane = 0; lane < mean_lanes; ++lane) total += partial[lane][threadIdx.x];
        avg[static_cast<std::int64_t>(b) * d + j] = total * (1.0f / static_cast<float>(seq - from));
    }
}

// One block per sequence b: h = ReLU(avg W₁ᵀ), z = h W₂ᵀ, g = softmax(z) (top-k when top_k > 0).
// Dynamic shared memory: d + d_g + E floats.
template <class F>
__global__ void gate_forward_kernel(const F* avg, const F* w1, const F* w2, F* h, F* z, F* g, int d, int gate_dim,
                                    int experts, int top_k) {
    extern __shared__ float shared[];
    float* a = shared;              // [d]
    float* hs = a + d;              // [d_g]
    float* zs = hs + gate_dim;      // [E]
    const int b = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int j = threadIdx.x; j < d; j += blockDim.x) a[j] = avg[static_cast<std::int64_t>(b) * d + j];
    __syncthreads();
    for (int i = warp; i < gate_dim; i += warps) {
        float s = 0.0f;
        for (int j = lane; j < d; j += 32) s += w1[static_cast<std::int64_t>(i) * d + j] * a[j];
        s = warp_sum(s);
        if (lane == 0) hs[i] = s > 0.0f ? s : 0.0f;
    }
    __syncthreads();
    for (int e = warp; e < experts; e += warps) {
        float s = 0.0f;
        for (int i = lane; i < gate_dim; i += 32) s += w2[static_cast<std::int64_t>(e) * gate_dim + i] * hs[i];
        s = warp_sum(s);
        if (lane == 0) zs[e] = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < gate_dim; i += blockDim.x) h[static_cast<std::int64_t>(b) * gate_dim + i] = hs[i];
    if (threadIdx.x != 0) return;
    float* gb = g + static_cast<std::int64_t>(b) * experts;
    float m = zs[0];
    for (int e = 1; e < experts; ++e) m = fmaxf(m, zs[e]);
    float sum = 0.0f;
    for (int e = 0; e < experts; ++e) sum += expf(zs[e] - m);
    for (int e = 0; e < experts; ++e) {
        z[static_cast<std::int64_t>(b) * experts + e] = zs[e];
        gb[e] = expf(zs[e] - m) / sum;
    }
    if (top_k <= 0 || top_k >= experts) return;
    // Keep the k largest (the first maximum on ties, as a stable sort by descending value): mark
    // them by negating their value + 2 (values lie in [0, 1]), then renormalise.
    float kept = 0.0f;
    for (int round = 0; round < top_k; ++round) {
        int best = -1;
        for (int e = 0; e < experts; ++e)
            if (gb[e] >= 0.0f && (best < 0 || gb[e] > gb[best])) best = e;
        kept += gb[best];
        gb[best] = -(gb[best] + 2.0f);
    }
    for (int e = 0; e < experts; ++e)
        gb[e] = gb[e] < 0.0f ? (kept > 0.0f ? (-gb[e] - 2.0f) / kept : 1.0f / static_cast<float>(top_k)) : 0.0f;
}

// saved[b, r] = x[b, r]; x[b, r] *= g[b, r / p] for the K = E·p prompt rows r of each sequence.
// x: [B, S, d], saved: [B, K, d]
template <class T>
__global__ void scale_rows_kernel(T* x, T* saved, const float* g, std::int64_t batch, int seq, int experts,
                                  int per_expert, int d) {
    const std::int64_t prompt_values = static_cast<std::int64_t>(experts) * per_expert * d;
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < batch * prompt_values;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t b = i / prompt_values, within = i % prompt_values;
        const int e = static_cast<int>(within / d) / per_expert;
        const std::int64_t at = b * seq * d + within;
        const T v = x[at];
        saved[i] = v;
        x[at] = from_f32<T>(g[b * experts + e] * to_f32(v));
    }
}

// One block per (b, e): dg[b, e] (+)= Σ ⟨dy, saved⟩ over the group's rows, then dy *= g[b, e] in
// place (dy becomes the gradient of the unscaled rows). dy: [B, S, d], saved: [B, K, d]
template <class T>
__global__ void scale_rows_backward_kernel(T* dy, const T* saved, const float* g, float* dg, int seq, int experts,
                                           int per_expert, int d, int accumulate) {
    const int b = blockIdx.x / experts, e = blockIdx.x % experts;
    const std::int64_t group = static_cast<std::int64_t>(per_expert) * d;
    const std::int64_t first = static_cast<std::int64_t>(e) * group;  // within the sequence
    T* dyg = dy + static_cast<std::int64_t>(b) * seq * d + first;
    const T* xg = saved + static_cast<std::int64_t>(b) * experts * group + first;
    const float ge = g[b * experts + e];
    float dot = 0.0f;
    for (std::int64_t i = threadIdx.x; i < group; i += blockDim.x) {
        const float gy = to_f32(dyg[i]);
        dot += gy * to_f32(xg[i]);
        dyg[i] = from_f32<T>(ge * gy);
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) dg[blockIdx.x] = accumulate ? dg[blockIdx.x] + dot : dot;
}

// dW₁ [d_g, d] and dW₂ [E, d_g] from dg: every block forms dz and dh in shared memory (B·(E + d_g)
// values), then the grid strides over the weights' entries. Dynamic shared memory: B·(E + d_g) floats.
template <class F>
__global__ void gate_backward_kernel(const F* avg, const F* h, const F* g, const F* dg, const F* w2, F* dw1, F* dw2,
                                     int batch, int d, int gate_dim, int experts) {
    extern __shared__ float shared[];
    float* dz = shared;                 // [B, E]
    float* dh = dz + batch * experts;   // [B, d_g]
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        float s = 0.0f;
        for (int e = 0; e < experts; ++e) s += g[b * experts + e] * dg[b * experts + e];
        for (int e = 0; e < experts; ++e) dz[b * experts + e] = g[b * experts + e] * (dg[b * experts + e] - s);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < batch * gate_dim; i += blockDim.x) {
        const int b = i / gate_dim, k = i % gate_dim;
        float s = 0.0f;
        for (int e = 0; e < experts; ++e) s += dz[b * experts + e] * w2[e * gate_dim + k];
        dh[i] = h[i] > 0.0f ? s : 0.0f;
    }
    __syncthreads();
    const std::int64_t w1_values = static_cast<std::int64_t>(gate_dim) * d;
    const std::int64_t total = w1_values + static_cast<std::int64_t>(experts) * gate_dim;
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        float s = 0.0f;
        if (i < w1_values) {
            const int k = static_cast<int>(i / d), j = static_cast<int>(i % d);
            for (int b = 0; b < batch; ++b) s += dh[b * gate_dim + k] * avg[static_cast<std::int64_t>(b) * d + j];
            dw1[i] = s;
        } else {
            const int e = static_cast<int>((i - w1_values) / gate_dim), k = static_cast<int>((i - w1_values) % gate_dim);
            for (int b = 0; b < batch; ++b) s += dz[b * experts + e] * h[b * gate_dim + k];
            dw2[i - w1_values] = s;
        }
    }
}

}  // namespace gate_detail

// The gate's sizes: B sequences, d_model, d_g, E experts of p prompt rows each.
struct GateShape {
    std::int64_t batch = 1, d_model = 0, gate_dim = 0, experts = 0, per_expert = 0;
};

// avg[b] = mean of x[b, from:S] over its rows. x: [B, S, d] -> avg: f32 [B, d]
template <class T>
void gate_mean(const T* x, float* avg, std::int64_t batch, std::int64_t seq, std::int64_t from, std::int64_t d,
               cudaStream_t stream) {
    check(batch >= 1 && from >= 0 && from < seq && d >= 1 && seq <= INT_MAX && batch <= INT_MAX,
          "cuda::gate_mean: batch ", batch, ", rows [", from, ", ", seq, ") and d ", d, " must be non-empty");
    const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(ceil_div(d, gate_detail::mean_columns)));
    gate_detail::mean_rows_kernel<<<grid, dim3(gate_detail::mean_columns, gate_detail::mean_lanes), 0, stream>>>(
        x, avg, static_cast<int>(seq), static_cast<int>(from), static_cast<int>(d));
    check_launch("cuda::gate_mean", "[", batch, ", ", seq, ", ", d, "]");
}

// h, z, g of the gate MLP. avg: f32 [B, d], w1: f32 [d_g, d], w2: f32 [E, d_g] -> h [B, d_g], z, g [B, E]
inline void gate_forward(const float* avg, const float* w1, const float* w2, float* h, float* z, float* g,
                         const GateShape& s, std::int64_t top_k, cudaStream_t stream) {
    check(s.batch >= 1 && s.d_model >= 1 && s.gate_dim >= 1 && s.experts >= 1 && top_k >= 0 && top_k <= s.experts,
          "cuda::gate_forward: batch ", s.batch, ", d ", s.d_model, ", d_g ", s.gate_dim, ", experts ", s.experts,
          " must be >= 1 and top_k ", top_k, " in [0, experts]");
    const std::size_t shared = static_cast<std::size_t>(s.d_model + s.gate_dim + s.experts) * sizeof(float);
    check(shared <= 48 * 1024, "cuda::gate_forward: d + d_g + E = ", s.d_model + s.gate_dim + s.experts,
          " floats exceed a block's 48 KiB of shared memory");
    gate_detail::gate_forward_kernel<float><<<static_cast<unsigned>(s.batch), 256, shared, stream>>>(
        avg, w1, w2, h, z, g, static_cast<int>(s.d_model), static_cast<int>(s.gate_dim), static_cast<int>(s.experts),
        static_cast<int>(top_k));
    check_launch("cuda::gate_forward", "[", s.batch, ", ", s.experts, "]");
}

// Scales the E·p prompt rows at the front of each sequence by their expert's gate value, in place,
// keeping the unscaled rows in `saved`. x: [B, S, d], saved: [B, E·p, d], g: f32 [B, E]
template <class T>
void scale_prompt_rows(T* x, T* saved, const float* g, const GateShape& s, std::int64_t seq, cudaStream_t stream) {
    check(s.experts * s.per_expert <= seq && seq <= INT_MAX, "cuda::scale_prompt_rows: ", s.experts, " x ",
          s.per_expert, " prompt rows do not fit in ", seq, " positions");
    const std::int64_t n = s.batch * s.experts * s.per_expert * s.d_model;
    gate_detail::scale_rows_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream>>>(
        x, saved, g, s.batch, static_cast<int>(seq), static_cast<int>(s.experts), static_cast<int>(s.per_expert),
        static_cast<int>(s.d_model));
    check_launch("cuda::scale_prompt_rows", "[", s.batch, ", ", s.experts * s.per_expert, ", ", s.d_model, "]");
}

// The backward of scale_prompt_rows: dg (+)= the group dot products, dy *= g on the prompt rows.
// dy: [B, S, d] (in place), saved: [B, E·p, d], g, dg: f32 [B, E]
template <class T>
void scale_prompt_rows_backward(T* dy, const T* saved, const float* g, float* dg, bool accumulate, const GateShape& s,
                                std::int64_t seq, cudaStream_t stream) {
    check(s.batch * s.experts <= INT_MAX && seq <= INT_MAX, "cuda::scale_prompt_rows_backward: too many groups");
    gate_detail::scale_rows_backward_kernel<<<static_cast<unsigned>(s.batch * s.experts), 256, 0, stream>>>(
        dy, saved, g, dg, static_cast<int>(seq), static_cast<int>(s.experts), static_cast<int>(s.per_expert),
        static_cast<int>(s.d_model), accumulate ? 1 : 0);
    check_launch("cuda::scale_prompt_rows_backward", "[", s.batch, ", ", s.experts, "]");
}

// dW₁ [d_g, d] and dW₂ [E, d_g] (overwritten) from dg = d loss / d g [B, E] and the forward's avg, h, g.
inline void gate_backward(const float* avg, const float* h, const float* g, const float* dg, const float* w2,
                          float* dw1, float* dw2, const GateShape& s, cudaStream_t stream) {
    const std::size_t shared = static_cast<std::size_t>(s.batch * (s.experts + s.gate_dim)) * sizeof(float);
    check(shared <= 48 * 1024, "cuda::gate_backward: B·(E + d_g) = ", s.batch * (s.experts + s.gate_dim),
          " floats exceed a block's 48 KiB of shared memory");
    const std::int64_t n = s.gate_dim * s.d_model + s.experts * s.gate_dim;
    gate_detail::gate_backward_kernel<float><<<static_cast<unsigned>(std::min<std::int64_t>(ceil_div(n, 256), 132)),
                                               256, shared, stream>>>(
        avg, h, g, dg, w2, dw1, dw2, static_cast<int>(s.batch), static_cast<int>(s.d_model),
        static_cast<int>(s.gate_dim), static_cast<int>(s.experts));
    check_launch("cuda::gate_backward", "[", s.gate_dim, ", ", s.d_model, "]");
}

}  // namespace mopt::backend::cuda
