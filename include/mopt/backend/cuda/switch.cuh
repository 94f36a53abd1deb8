#pragma once
// The Switch feed-forward (Fedus et al. 2021; mixture of experts, top-1) of a frozen model on the
// GPU, forward and backward to its input, with the semantics of nn::SwitchFFN<Top1, …, SwiGLU>
// (nn/switch_ffn.hpp):
//
//   logits = x W_rᵀ   p = softmax(logits)   i(r) = argmax_e p[r, e] (ties: the lower index)
//   y[r] = p[r, i] · E_i(x[r])  with  E_e(x) = down_e(silu(gate_e(x)) ⊙ up_e(x))
//   capacity: expert e keeps its first C = max(1, ⌈capacity_factor · N / E⌉) rows in row order (all
//   of them when capacity_factor = 0); a dropped row's output is 0 (the block's residual passes)
//   balance = E · Σ_e f_e P_e   f_e = assigned_e / N (before dropping), P_e = mean_r p[r, e]
//   z = mean_r logsumexp(logits[r])²     aux = aux_loss_coef · balance + z_loss_coef · z
// (aux is the layer's term of the CPU's ForwardOutput::aux_loss; a prompt objective may add a
// multiple of it, train::prompt_step's aux_loss_coef: backward()'s aux_weight.)
//
// Dispatch without the host: the expert of each row, its rank among the earlier rows of the same
// expert, and per-expert counts come from a counting sort on the device (one pass over tiles of 256
// rows with warp match + per-tile counts, a one-block scan over the tiles, one pass placing rows).
// Kept rows are laid out expert-contiguously, each expert's segment padded to a multiple of
// `chunk_rows` rows, so every chunk of chunk_rows rows belongs to one expert. The expert GEMMs are
// then ONE cuBLAS pointer-array batched GEMM per projection over all chunks (cublasGemmBatchedEx:
// uniform shape, device arrays of device pointers; the scan writes each chunk's weight pointer).
// The chunk count is fixed on the host — the largest the padding can need,
// ⌊(min(N, E·C) + E·(chunk_rows − 1)) / chunk_rows⌋ — so nothing is read back, shapes never change,
// and a step can be captured into a CUDA graph; chunks past the last segment multiply zero rows.
// (cublasGemmGroupedBatchedEx needs the per-group sizes on the host; a [E, C, d] capacity layout
// costs E× the FLOPs when nothing is dropped.) Gate and up are one GEMM over [E, 2F, d] weights.
//
// Forward, per layer (N rows, P = chunks · chunk_rows padded rows):
//   router GEMM logits [N, E] (f32 output) → route (softmax, top-1, p, logsumexp, ranks, tile counts)
//   → plan (one block: offsets, segments, chunk → weight pointers, statistics) → assign (slot of each
//   row, the permutation) → gather rows [P, d] (16-byte loads, padding rows zero) → batched GEMM
//   gate|up [P, 2F] → SwiGLU [P, F] → batched GEMM down [P, d] → combine: out = residual + p·y[slot].
// Backward (dX; with dw, pretraining, also every weight's gradient — see backward()):
//   gather d_out rows scaled by p, and dgate[r] = d_out[r] · E_i(x[r]) (block reduction) → batched
//   dgrad GEMM [P, d]·W_down → [P, F] → SwiGLU backward in place over gate|up → batched dgrad GEMM
//   [P, 2F]·W_gate|up → [P, d] → input gradient: dx[r] = dX_sorted[slot] + Σ_e dlogits[r, e] W_r[e]
//   with dlogits = p ⊙ (g − Σ p g) + z-term, g_e = [e = i, kept]·dgate + aux gradient (fused, f32).
//
// What a forward saves for the backward (per layer): the router logits (f32), expert, slot, p and
// logsumexp of each row, the permutation, the gate|up activations (the backward turns them into
// their gradients) and the experts' unscaled outputs. All arrays come from the caching allocator at
// construction; forward and backward allocate nothing and copy nothing between host and device.
//
// T = float or __nv_bfloat16 storage (weights, activations); math, logits and statistics are f32.
// d_model and d_ff must be multiples of 8 (16-byte vectors of bf16 or f32 values).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "mopt/backend/cuda/activation.cuh"
#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/blas.cuh"
#include "mopt/backend/cuda/common.cuh"
#include "mopt/backend/cuda/device.cuh"
#include "mopt/nn/config.hpp"

namespace mopt::backend::cuda {

// The numbers of one Switch layer.
struct SwitchConfig {
    std::int64_t d_model = 0, d_ff = 0, experts = 0;
    float capacity_factor = 0.0f;  // 0: no capacity limit (no row dropped)
    float aux_loss_coef = 0.0f;    // α of the load-balancing term
    float z_loss_coef = 0.0f;      // router z-loss coefficient
    std::int64_t chunk_rows = 64;  // rows per expert GEMM problem (the padding unit of a segment)

    [[nodiscard]] static SwitchConfig of(const nn::ModelConfig& c, std::int64_t chunk_rows = 64) {
        return {.d_model = c.d_model, .d_ff = c.d_ff, .experts = c.num_experts, .capacity_factor = c.capacity_factor,
                .aux_loss_coef = c.aux_loss_coef, .z_loss_coef = c.z_loss_coef, .chunk_rows = chunk_rows};
    }
};

// Rows an expert keeps out of `rows` (nn::SwitchFFN's rule, top-1, in the same float arithmetic).
[[nodiscard]] inline std::int64_t switch_capacity(std::int64_t rows, std::int64_t experts, float capacity_factor) {
    if (capacity_factor <= 0.0f) return rows;
    return std::max<std::int64_t>(
        1, static_cast<std::int64_t>(std::ceil(capacity_factor * static_cast<float>(rows) / static_cast<float>(experts))));
}

// A Switch layer's frozen weights on the device (row-major, nn::Linear's [out, in]).
template <DeviceFloat T>
struct SwitchWeights {
    const T* router = nullptr;   // [E, d]              block_sparse_moe.gate
    const T* gate_up = nullptr;  // [E, 2F, d]: expert e's gate rows (w1), then its up rows (w3)
    const T* down = nullptr;     // [E, d, F]           w2
};

// Where backward() writes a Switch layer's weight gradients (pretraining; f32, overwritten, laid out
// as the weights) and the layer input the forward saw (its rows are gathered again for the experts'
// gradients; the forward's sorted copy is scratch shared by every layer).
template <DeviceFloat T>
struct SwitchWeightGrads {
    float* router = nullptr;   // [E, d]
    float* gate_up = nullptr;  // [E, 2F, d]
    float* down = nullptr;     // [E, d, F]
    const T* x = nullptr;      // [N, d] the forward's x
};

// Owning buffers of one layer's Switch weights (empty in a dense layer of a model).
template <DeviceFloat T>
struct SwitchExpertWeights {
    DeviceBuffer<T> router, gate_up, down;
    std::int64_t index = -1;  // the layer's index among the model's Switch layers; -1: a dense layer

    [[nodiscard]] bool routed() const { return index >= 0; }
    [[nodiscard]] SwitchWeights<T> view() const { return {router.data(), gate_up.data(), down.data()}; }
    [[nodiscard]] std::int64_t values() const {
        return static_cast<std::int64_t>(router.size() + gate_up.size() + down.size());
    }
};

// Uploads host f32 weights rounded to T: router [E, d], gate and up [E, F, d] (each expert's w1 and
// w3), down [E, d, F] (w2). gate and up are interleaved per expert into the [E, 2F, d] layout.
template <DeviceFloat T>
SwitchExpertWeights<T> upload_switch_weights(const std::vector<float>& router, const std::vector<float>& gate,
                                             const std::vector<float>& up, const std::vector<float>& down,
                                             std::int64_t experts, std::int64_t d, std::int64_t f, std::int64_t index) {
    const auto ed = static_cast<std::size_t>(experts * d), efd = static_cast<std::size_t>(experts * f * d);
    check(router.size() == ed && gate.size() == efd && up.size() == efd && down.size() == efd,
          "upload_switch_weights: router ", router.size(), ", gate ", gate.size(), ", up ", up.size(), ", down ",
          down.size(), " values do not match E = ", experts, ", d = ", d, ", F = ", f);
    auto to_t = [](float v) {
        if constexpr (std::is_same_v<T, float>) return v;
        else return __float2bfloat16(v);
    };
    auto convert = [&](const std::vector<float>& v) {
        std::vector<T> out(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_t(v[i]);
        return out;
    };
    SwitchExpertWeights<T> w;
    w.index = index;
    w.router = DeviceBuffer<T>(ed);
    w.router.upload(convert(router));
    std::vector<T> gu(2 * efd);
    const auto block = static_cast<std::size_t>(f * d);
    for (std::size_t e = 0; e < static_cast<std::size_t>(experts); ++e)
        for (std::size_t i = 0; i < block; ++i) {
            gu[2 * e * block + i] = to_t(gate[e * block + i]);
            gu[(2 * e + 1) * block + i] = to_t(up[e * block + i]);
        }
    w.gate_up = DeviceBuffer<T>(2 * efd);
    w.gate_up.upload(gu);
    w.down = DeviceBuffer<T>(efd);
    w.down.upload(convert(down));
    return w;
}

// One layer's routing in the last forward (host copy).
struct SwitchStats {
    std::int64_t tokens = 0;              // N rows routed
    std::vector<std::int64_t> assigned;   // rows whose top-1 is each expert (before the capacity drop)
    std::int64_t dropped = 0;             // rows over capacity (their output is 0)
    std::vector<double> mean_prob;        // P_e, the mean router probability of each expert
    double balance = 0.0;                 // E · Σ f_e P_e (nn::ExpertStats::aux_loss)
    double router_entropy = 0.0;          // mean over rows of −Σ p log p
    double z_loss = 0.0;                  // mean over rows of logsumexp(logits)²
    double aux_loss = 0.0;                // aux_loss_coef · balance + z_loss_coef · z_loss
};

namespace switch_detail {

inline constexpr int tile_rows = 256;  // rows per block of the routing kernels: 8 warps, a thread per row

// Softmax, top-1 (nn::SwitchFFN: argmax of the probabilities, the lower index on ties), p of the
// chosen expert and logsumexp per row; the row's rank among the earlier rows of the tile that chose
// the same expert; per tile: rows per expert, Σ p per expert, Σ entropy, Σ logsumexp².
// logits: f32 [N, E] -> expert, rank: i32 [N]; prob, lse: f32 [N]; tile_counts: i32 [tiles, E];
// tile_sums: f32 [tiles, E + 2]. Blocks of Tile threads; shared: warps·E ints + warps·(E+2) floats.
// (Kernels here are templates, so that the header can be included by several translation units.)
template <int Tile>
__global__ void route_kernel(const float* logits, int rows, int experts, std::int32_t* expert, float* prob, float* lse,
                             std::int32_t* rank, std::int32_t* tile_counts, float* tile_sums) {
    extern __shared__ unsigned char route_shared[];
    constexpr int warps = Tile / 32;
    int* warp_counts = reinterpret_cast<int*>(route_shared);                      // [warps, E]
    float* warp_sums = reinterpret_cast<float*>(warp_counts + warps * experts);  // [warps, E + 2]
    for (int i = static_cast<int>(threadIdx.x); i < warps * experts; i += blockDim.x) warp_counts[i] = 0;
    __syncthreads();

    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    const int r = static_cast<int>(blockIdx.x) * Tile + static_cast<int>(threadIdx.x);
    const bool valid = r < rows;
    const float* row = logits + static_cast<std::int64_t>(valid ? r : 0) * experts;
    float m = -INFINITY;
    if (valid)
        for (int j = 0; j < experts; ++j) m = fmaxf(m, row[j]);
    float s = 0.0f;
    if (valid)
        for (int j = 0; j < experts; ++j) s += expf(row[j] - m);
    const float inv = valid ? 1.0f / s : 0.0f;
    int e = valid ? 0 : -1;  // a NaN row (no p > best) still names a real expert
    float best = -1.0f, entropy = 0.0f;
    for (int j = 0; j < experts; ++j) {  // every lane runs the same E iterations (warp sums inside)
        const float p = valid ? expf(row[j] - m) * inv : 0.0f;
        if (valid && p > best) {
            best = p;
            e = j;
        }
        if (p > 0.0f) entropy -= p * logf(p);
        const float total = warp_sum(p);
        if (lane == 0) warp_sums[warp * (experts + 2) + j] = total;
    }
    const float l = valid ? m + logf(s) : 0.0f;
    const float ent_total = warp_sum(entropy), z_total = warp_sum(l * l);
    if (lane == 0) {
        warp_sums[warp * (experts + 2) + experts] = ent_total;
        warp_sums[warp * (experts + 2) + experts + 1] = z_total;
    }
    // Rank among the lanes of this warp with the same expert, then the earlier warps' counts.
    const unsigned peers = __match_any_sync(full_warp_mask, e);
    const int before = __popc(peers & ((1u << lane) - 1u));
    if (valid && before == 0) warp_counts[warp * experts + e] = __popc(peers);
    __syncthreads();
    if (valid) {
        int offset = 0;
        for (int w = 0; w < warp; ++w) offset += warp_counts[w * experts + e];
        expert[r] = e;
        rank[r] = offset + before;
        prob[r] = best;
        lse[r] = l;
    }
    for (int j = static_cast<int>(threadIdx.x); j < experts; j += blockDim.x) {
        int c = 0;
        for (int w = 0; w < warps; ++w) c += warp_counts[w * experts + j];
        tile_counts[static_cast<std::int64_t>(blockIdx.x) * experts + j] = c;
    }
    for (int j = static_cast<int>(threadIdx.x); j < experts + 2; j += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < warps; ++w) v += warp_sums[w * (experts + 2) + j];
        tile_sums[static_cast<std::int64_t>(blockIdx.x) * (experts + 2) + j] = v;
    }
}

// One block: per expert the exclusive scan of the tile counts (in place: each tile's first rank),
// the total, the kept rows and the segment start; the weight pointers of every chunk; the
// permutation reset to −1; the layer's statistics.
// tile_counts: i32 [tiles, E] (becomes offsets); tile_sums: f32 [tiles, E + 2] ->
// segment: i32 [E + 1] (starts, then the used rows); counts: i32 [E + 1] (assigned, then dropped);
// stats: f32 [E + 4] (P_e, balance, entropy, z, aux); chunk_weights: [2, chunks] (gate|up, down);
// perm: i32 [padded] = −1. Shared: (3E + 1) 4-byte values.
template <class T>
__global__ void plan_kernel(std::int32_t* tile_counts, const float* tile_sums, int tiles, int rows, int experts,
                            int capacity, int chunk_rows, int chunks, int padded, const T* gate_up, const T* down,
                            std::int64_t gate_up_stride, std::int64_t down_stride, void** chunk_weights,
                            std::int32_t* segment, std::int32_t* counts, float* stats, std::int32_t* perm,
                            float aux_loss_coef, float z_loss_coef) {
    extern __shared__ unsigned char plan_shared[];
    int* total = reinterpret_cast<int*>(plan_shared);  // [E]
    int* start = total + experts;                       // [E + 1]
    float* mean_prob = reinterpret_cast<float*>(start + experts + 1);  // [E]
    for (int e = static_cast<int>(threadIdx.x); e < experts; e += blockDim.x) {
        int running = 0;
        float p = 0.0f;
        for (int b = 0; b < tiles; ++b) {
            const int c = tile_counts[static_cast<std::int64_t>(b) * experts + e];
            tile_counts[static_cast<std::int64_t>(b) * experts + e] = running;
            running += c;
            p += tile_sums[static_cast<std::int64_t>(b) * (experts + 2) + e];
        }
        total[e] = running;
        counts[e] = running;
        mean_prob[e] = p / static_cast<float>(rows);
        stats[e] = mean_prob[e];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0, dropped = 0;
        float balance = 0.0f, entropy = 0.0f, z = 0.0f;
        for (int e = 0; e < experts; ++e) {
            const int kept = min(total[e], capacity);
            start[e] = s;
            segment[e] = s;
            s += (kept + chunk_rows - 1) / chunk_rows * chunk_rows;
            dropped += total[e] - kept;
            balance += static_cast<float>(total[e]) / static_cast<float>(rows) * mean_prob[e];
        }
        start[experts] = s;
        segment[experts] = s;
        counts[experts] = dropped;
        for (int b = 0; b < tiles; ++b) {
            entropy += tile_sums[static_cast<std::int64_t>(b) * (experts + 2) + experts];
            z += tile_sums[static_cast<std::int64_t>(b) * (experts + 2) + experts + 1];
        }
        balance *= static_cast<float>(experts);
        entropy /= static_cast<float>(rows);
        z /= static_cast<float>(rows);
        stats[experts] = balance;
        stats[experts + 1] = entropy;
        stats[experts + 2] = z;
        stats[experts + 3] = aux_loss_coef * balance + z_loss_coef * z;
    }
    __syncthreads();
    for (int c = static_cast<int>(threadIdx.x); c < chunks; c += blockDim.x) {
        const int row = c * chunk_rows;
        int e = 0;  // chunks past the last segment multiply zero rows with expert 0's weights
        if (row < start[experts])
            while (row >= start[e + 1]) ++e;
        chunk_weights[c] = const_cast<T*>(gate_up + e * gate_up_stride);
        chunk_weights[chunks + c] = const_cast<T*>(down + e * down_stride);
    }
    for (int s = static_cast<int>(threadIdx.x); s < padded; s += blockDim.x) perm[s] = -1;
}

// slot[r] = segment[e] + (the tile's first rank of e) + rank[r] while that is below the capacity,
// else −1 (dropped); perm[slot] = r. Blocks of Tile threads, one per row.
template <int Tile>
__global__ void assign_kernel(const std::int32_t* expert, const std::int32_t* rank, const std::int32_t* tile_offsets,
                              const std::int32_t* segment, int rows, int experts, int capacity, std::int32_t* slot,
                              std::int32_t* perm) {
    const int r = static_cast<int>(blockIdx.x) * Tile + static_cast<int>(threadIdx.x);
    if (r >= rows) return;
    const int e = expert[r];
    const int pos = tile_offsets[static_cast<std::int64_t>(blockIdx.x) * experts + e] + rank[r];
    const int s = pos < capacity ? segment[e] + pos : -1;
    slot[r] = s;
    if (s >= 0) perm[s] = r;
}

// dst[s] = src[perm[s]], or zeros where perm[s] = −1. One block per row of dst; d: a multiple of vec_width<T>.
template <class T>
__global__ void gather_rows_kernel(const T* src, const std::int32_t* perm, T* dst, int d) {
    const std::int64_t s = blockIdx.x;
    const int t = perm[s], vecs = d / vec_width<T>;
    uint4* out = reinterpret_cast<uint4*>(dst + s * d);
    if (t < 0) {
        for (int v = static_cast<int>(threadIdx.x); v < vecs; v += blockDim.x) out[v] = make_uint4(0, 0, 0, 0);
        return;
    }
    const uint4* in = reinterpret_cast<const uint4*>(src + static_cast<std::int64_t>(t) * d);
    for (int v = static_cast<int>(threadIdx.x); v < vecs; v += blockDim.x) out[v] = in[v];
}

// out[r] = residual[r] + p[r] · y[slot[r]] (residual nullptr: 0; a dropped row adds nothing).
// One block per row; out may alias residual.
template <class T>
__global__ void combine_kernel(const T* y, const std::int32_t* slot, const float* prob, const T* residual, T* out,
                               int d) {
    const std::int64_t r = blockIdx.x;
    const int s = slot[r], vecs = d / vec_width<T>;
    const float p = s >= 0 ? prob[r] : 0.0f;
    for (int v = static_cast<int>(threadIdx.x); v < vecs; v += blockDim.x) {
        float acc[vec_width<T>] = {};
        if (residual) load_vec(residual + r * d + v * vec_width<T>, acc);
        if (s >= 0) {
            float e[vec_width<T>];
            load_vec(y + static_cast<std::int64_t>(s) * d + v * vec_width<T>, e);
#pragma unroll
            for (int k = 0; k < vec_width<T>; ++k) acc[k] += p * e[k];
        }
        store_vec(out + r * d + v * vec_width<T>, acc);
    }
}

// The backward's dispatch: dy_sorted[s] = p[t] · d_out[t] for t = perm[s] (zeros where −1), and
// dgate[t] = d_out[t] · y[s], the gradient of the gate probability. One block per sorted row.
template <class T>
__global__ void gather_grad_kernel(const T* d_out, const std::int32_t* perm, const float* prob, const T* y,
                                   T* dy_sorted, float* dgate, int d) {
    const std::int64_t s = blockIdx.x;
    const int t = perm[s], vecs = d / vec_width<T>;
    T* dst = dy_sorted + s * d;
    if (t < 0) {  // uniform over the block: no thread reaches the block reduction
        for (int v = static_cast<int>(threadIdx.x); v < vecs; v += blockDim.x)
            reinterpret_cast<uint4*>(dst)[v] = make_uint4(0, 0, 0, 0);
        return;
    }
    const float p = prob[t];
    float dot = 0.0f;
    for (int v = static_cast<int>(threadIdx.x); v < vecs; v += blockDim.x) {
        float g[vec_width<T>], e[vec_width<T>];
        load_vec(d_out + static_cast<std::int64_t>(t) * d + v * vec_width<T>, g);
        load_vec(y + s * d + v * vec_width<T>, e);
#pragma unroll
        for (int k = 0; k < vec_width<T>; ++k) {
            dot += g[k] * e[k];
            g[k] *= p;
        }
        store_vec(dst + v * vec_width<T>, g);
    }
    dot = block_sum(dot);
    if (threadIdx.x == 0) dgate[t] = dot;
}

// dx[r] = dX_sorted[slot[r]] (0 when dropped) + Σ_e dlogits[r, e] W_r[e], with the router's
// softmax backward: g_e = [e = expert, kept]·dgate + balance_grad·assigned_e,
// dlogits_e = p_e (g_e − Σ_j p_j g_j) + z_grad·lse·p_e. One block per row; shared: E floats.
template <class T>
__global__ void input_grad_kernel(const T* dx_sorted, const std::int32_t* slot, const std::int32_t* expert,
                                  const float* logits, const float* lse, const float* dgate,
                                  const std::int32_t* assigned, const T* router, T* dx, int experts, int d,
                                  float balance_grad, float z_grad, T* dlogits_out) {
    extern __shared__ float dlogits[];
    const std::int64_t r = blockIdx.x;
    const int s = slot[r];
    if (threadIdx.x < 32) {
        const int lane = static_cast<int>(threadIdx.x), chosen = expert[r];
        const float l = lse[r], gate = s >= 0 ? dgate[r] : 0.0f;
        const float* row = logits + r * experts;
        float dot = 0.0f;
        for (int j = lane; j < experts; j += 32) {
            const float p = expf(row[j] - l);
            dot += p * (balance_grad * static_cast<float>(assigned[j]) + (j == chosen ? gate : 0.0f));
        }
        dot = warp_sum(dot);
        for (int j = lane; j < experts; j += 32) {
            const float p = expf(row[j] - l);
            const float g = balance_grad * static_cast<float>(assigned[j]) + (j == chosen ? gate : 0.0f);
            dlogits[j] = p * (g - dot) + z_grad * l * p;
            if (dlogits_out != nullptr) dlogits_out[r * experts + j] = from_f32<T>(dlogits[j]);
        }
    }
    __syncthreads();
    const int vecs = d / vec_width<T>;
    for (int v = static_cast<int>(threadIdx.x); v < vecs; v += blockDim.x) {
        float acc[vec_width<T>] = {};
        if (s >= 0) load_vec(dx_sorted + static_cast<std::int64_t>(s) * d + v * vec_width<T>, acc);
        for (int j = 0; j < experts; ++j) {
            float w[vec_width<T>];
            load_vec(router + static_cast<std::int64_t>(j) * d + v * vec_width<T>, w);
            const float g = dlogits[j];
#pragma unroll
            for (int k = 0; k < vec_width<T>; ++k) acc[k] += g * w[k];
        }
        store_vec(dx + r * d + v * vec_width<T>, acc);
    }
}

// dst[i] = base + i · stride values: the chunk pointers of a [chunks · chunk_rows, ld] array.
template <class T>
__global__ void chunk_pointers_kernel(void** dst, T* base, std::int64_t stride, int count) {
    for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < count;
         i += static_cast<int>(gridDim.x * blockDim.x))
        dst[i] = base + i * stride;
}

// Threads for a kernel with one block per row of `vecs` 16-byte vectors.
[[nodiscard]] inline int vector_threads(int vecs) {
    return static_cast<int>(std::clamp<std::int64_t>(ceil_div(vecs, 32) * 32, 32, 256));
}

// count problems C_i = A_i op(B_i) of one shape (row-major as gemm(); A never transposed), the
// matrices named by device arrays of device pointers: cublasGemmBatchedEx, C^T = op(B)^T A^T.
inline void gemm_pointer_batched(bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, void* const* a,
                                 std::int64_t lda, void* const* b, std::int64_t ldb, void* const* c, std::int64_t ldc,
                                 DType type, GemmCompute compute, std::int64_t count, cudaStream_t stream) {
    cublasHandle_t h = blas_handle();
    check_cublas(cublasSetStream(h, stream), "cublasSetStream");
    const float alpha = 1.0f, beta = 0.0f;
    const cudaDataType t = blas_detail::data_type(type);
    const cublasComputeType_t ct = compute == GemmCompute::tf32 && type == DType::f32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                                      : CUBLAS_COMPUTE_32F;
    check_cublas(cublasGemmBatchedEx(h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n),
                                     static_cast<int>(m), static_cast<int>(k), &alpha,
                                     const_cast<const void* const*>(b), t, static_cast<int>(ldb),
                                     const_cast<const void* const*>(a), t, static_cast<int>(lda), &beta, c, t,
                                     static_cast<int>(ldc), static_cast<int>(count), ct, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmBatchedEx (switch experts)");
}

}  // namespace switch_detail

// The Switch layers of a model at one row count: what each layer's forward saves for its backward,
// and the scratch they share. Built for N rows and `layers` Switch layers; forward/backward then
// run on `stream` with no allocation and no host↔device copy.
template <DeviceFloat T>
class DeviceSwitchFFN {
public:
    static constexpr DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::bf16;

    DeviceSwitchFFN() = default;
    DeviceSwitchFFN(const SwitchConfig& c, std::int64_t rows, std::int64_t layers, GemmCompute compute,
                    cudaStream_t stream)
        : c_(c), rows_(rows), compute_(compute), stream_(stream) {
        constexpr std::int64_t max_experts = 2048;  // the routing kernels' shared memory
        check(c.experts >= 1 && c.experts <= max_experts, "DeviceSwitchFFN: num_experts = ", c.experts,
              " outside [1, ", max_experts, "]");
        check(c.d_model > 0 && c.d_ff > 0 && c.d_model % 8 == 0 && c.d_ff % 8 == 0, "DeviceSwitchFFN: d_model ",
              c.d_model, " and d_ff ", c.d_ff, " must be positive multiples of 8 (16-byte vectors)");
        check(c.chunk_rows >= 1 && c.chunk_rows <= 4096, "DeviceSwitchFFN: chunk_rows = ", c.chunk_rows,
              " outside [1, 4096]");
        check(c.capacity_factor >= 0.0f, "DeviceSwitchFFN: capacity_factor must be >= 0, got ", c.capacity_factor);
        check(rows >= 1 && layers >= 1, "DeviceSwitchFFN: rows ", rows, " and layers ", layers, " must be >= 1");
        const std::int64_t E = c.experts, d = c.d_model, F = c.d_ff, M = c.chunk_rows;
        capacity_ = std::min(switch_capacity(rows, E, c.capacity_factor), rows);
        const std::int64_t kept_max = std::min(rows, E * capacity_);
        chunks_ = std::max<std::int64_t>(
            1, std::min((kept_max + E * (M - 1)) / M, E * ceil_div(capacity_, M)));
        padded_ = chunks_ * M;
        tiles_ = ceil_div(rows, switch_detail::tile_rows);
        check(padded_ * 2 * F <= (std::int64_t{1} << 40) && padded_ <= INT_MAX && rows * E <= INT_MAX,
              "DeviceSwitchFFN: ", rows, " rows of ", E, " experts are too many for one step");

        auto array = [&](auto tag, std::int64_t n) {
            return DeviceArray<decltype(tag)>(static_cast<std::size_t>(n), stream_);
        };
        for (std::int64_t l = 0; l < layers; ++l) {
            Saved& s = saved_.emplace_back();
            s.logits = array(float{}, rows * E);
            s.expert = array(std::int32_t{}, rows);
            s.slot = array(std::int32_t{}, rows);
            s.prob = array(float{}, rows);
            s.lse = array(float{}, rows);
            s.perm = array(std::int32_t{}, padded_);
            s.hidden = array(T{}, padded_ * 2 * F);
            s.out = array(T{}, padded_ * d);
            s.segment = array(std::int32_t{}, E + 1);
            s.counts = array(std::int32_t{}, E + 1);
            s.stats = array(float{}, E + 4);
            s.pointers = array(static_cast<void*>(nullptr), 4 * chunks_);
            s.hidden.zero(stream_);
            s.out.zero(stream_);
            s.counts.zero(stream_);
            s.stats.zero(stream_);
            fill_pointers(s.pointers.data(), s.hidden.data(), 2 * F);     // [0]: gate|up activations
            fill_pointers(s.pointers.data() + chunks_, s.out.data(), d);  // [1]: expert outputs
        }
        rank_ = array(std::int32_t{}, rows);
        tile_counts_ = array(std::int32_t{}, tiles_ * E);
        tile_sums_ = array(float{}, tiles_ * (E + 2));
        dgate_ = array(float{}, rows);
        d_logits_ = array(T{}, rows * E);
        sorted_in_ = array(T{}, padded_ * d);
        act_ = array(T{}, padded_ * F);
        d_sorted_out_ = array(T{}, padded_ * d);
        d_act_ = array(T{}, padded_ * F);
        d_sorted_in_ = array(T{}, padded_ * d);
        for (DeviceArray<T>* a : {&sorted_in_, &act_, &d_sorted_out_, &d_act_, &d_sorted_in_}) a->zero(stream_);
        scratch_pointers_ = array(static_cast<void*>(nullptr), 5 * chunks_);
        void** p = scratch_pointers_.data();
        fill_pointers(p, sorted_in_.data(), d);
        fill_pointers(p + chunks_, act_.data(), F);
        fill_pointers(p + 2 * chunks_, d_sorted_out_.data(), d);
        fill_pointers(p + 3 * chunks_, d_act_.data(), F);
        fill_pointers(p + 4 * chunks_, d_sorted_in_.data(), d);
    }

    [[nodiscard]] bool reserved() const { return !saved_.empty(); }
    [[nodiscard]] const SwitchConfig& config() const { return c_; }
    [[nodiscard]] std::int64_t rows() const { return rows_; }
    [[nodiscard]] std::int64_t layers() const { return static_cast<std::int64_t>(saved_.size()); }
    [[nodiscard]] std::int64_t capacity() const { return capacity_; }
    [[nodiscard]] std::int64_t chunks() const { return chunks_; }       // GEMM problems per projection
    [[nodiscard]] std::int64_t padded_rows() const { return padded_; }  // rows the expert GEMMs run over

    // out = residual + Switch(x) (residual nullptr: out = Switch(x)); saves what backward(layer) needs.
    // x, residual, out: [N, d] (out may alias residual, not x)
    void forward(std::int64_t layer, const SwitchWeights<T>& w, const T* x, const T* residual, T* out) {
        using namespace switch_detail;
        check(layer >= 0 && layer < layers() && x && out && w.router && w.gate_up && w.down,
              "DeviceSwitchFFN::forward: layer ", layer, " of ", layers(), " or a null pointer");
        Saved& s = saved_[static_cast<std::size_t>(layer)];
        const std::int64_t N = rows_, E = c_.experts, d = c_.d_model, F = c_.d_ff;
        const int n = static_cast<int>(N), e = static_cast<int>(E), tiles = static_cast<int>(tiles_);
        // Router: logits = x W_rᵀ, [N, d] -> f32 [N, E]
        gemm({.trans_a = false, .trans_b = true, .m = N, .n = E, .k = d, .alpha = 1.0f, .beta = 0.0f, .a = x, .lda = d,
              .b = w.router, .ldb = d, .c = s.logits.data(), .ldc = E, .ab_type = dtype, .c_type = DType::f32,
              .compute = compute_, .stream = stream_});
        constexpr int warps = tile_rows / 32;
        route_kernel<tile_rows><<<tiles, tile_rows, static_cast<std::size_t>(warps * (2 * E + 2)) * 4, stream_>>>(
            s.logits.data(), n, e, s.expert.data(), s.prob.data(), s.lse.data(), rank_.data(), tile_counts_.data(),
            tile_sums_.data());
        check_launch("switch route", "[", N, ", ", E, "]");
        plan_kernel<T><<<1, 256, static_cast<std::size_t>(3 * E + 1) * 4, stream_>>>(
            tile_counts_.data(), tile_sums_.data(), tiles, n, e, static_cast<int>(capacity_),
            static_cast<int>(c_.chunk_rows), static_cast<int>(chunks_), static_cast<int>(padded_), w.gate_up, w.down,
            2 * F * d, d * F, s.pointers.data() + 2 * chunks_, s.segment.data(), s.counts.data(), s.stats.data(),
            s.perm.data(), c_.aux_loss_coef, c_.z_loss_coef);
        check_launch("switch plan", "[", E, " experts, ", chunks_, " chunks]");
        assign_kernel<tile_rows><<<tiles, tile_rows, 0, stream_>>>(s.expert.data(), rank_.data(), tile_counts_.data(),
                                                        s.segment.data(), n, e, static_cast<int>(capacity_),
                                                        s.slot.data(), s.perm.data());
        check_launch("switch assign", "[", N, "]");
        const int row_vecs = static_cast<int>(d) / vec_width<T>;
        gather_rows_kernel<<<static_cast<int>(padded_), vector_threads(row_vecs), 0, stream_>>>(
            x, s.perm.data(), sorted_in_.data(), static_cast<int>(d));
        check_launch("switch gather", "[", padded_, ", ", d, "]");
        // Experts: gate|up = x_sorted W_{gate|up}ᵀ per chunk, [M, d] -> [M, 2F]; y = swiglu W_downᵀ, [M, F] -> [M, d]
        void* const* sp = scratch_pointers_.data();
        void* const* lp = s.pointers.data();
        gemm_pointer_batched(true, c_.chunk_rows, 2 * F, d, sp, d, lp + 2 * chunks_, d, lp, 2 * F, dtype, compute_,
                             chunks_, stream_);
        swiglu_forward_packed(s.hidden.data(), act_.data(), padded_, F, stream_, s.segment.data() + E);
        gemm_pointer_batched(true, c_.chunk_rows, d, F, sp + chunks_, F, lp + 3 * chunks_, F, lp + chunks_, d, dtype,
                             compute_, chunks_, stream_);
        combine_kernel<<<n, vector_threads(row_vecs), 0, stream_>>>(s.out.data(), s.slot.data(), s.prob.data(),
                                                                      residual, out, static_cast<int>(d));
        check_launch("switch combine", "[", N, ", ", d, "]");
        s.forwarded = true;
    }

    // dx = d loss / d x of the layer's last forward, given d_out = d loss / d Switch(x), with the
    // objective's aux_weight · aux (0: no auxiliary gradient). Consumes the saved gate|up (they become
    // their gradients): one backward per forward. d_out, dx: [N, d] (distinct)
    // dw (pretraining): also the weights' gradients — per expert dW_down = dyᵀ·h and dW_gate|up =
    // d(gate|up)ᵀ·x over its segment of the sorted rows (h = silu(gate) ⊙ up recomputed; the segments'
    // bounds are read back, one small synchronising copy), and the router's dW_r = dlogitsᵀ·x.
    void backward(std::int64_t layer, const SwitchWeights<T>& w, const T* d_out, T* dx, float aux_weight,
                  const SwitchWeightGrads<T>* dw = nullptr) {
        using namespace switch_detail;
        check(layer >= 0 && layer < layers() && d_out && dx && w.router && w.gate_up && w.down,
              "DeviceSwitchFFN::backward: layer ", layer, " of ", layers(), " or a null pointer");
        Saved& s = saved_[static_cast<std::size_t>(layer)];
        check(s.forwarded, "DeviceSwitchFFN::backward: layer ", layer,
              " has no forward to differentiate (or its backward already ran)");
        s.forwarded = false;
        const std::int64_t N = rows_, E = c_.experts, d = c_.d_model, F = c_.d_ff;
        const int row_vecs = static_cast<int>(d) / vec_width<T>;
        std::vector<std::int32_t> segment;
        if (dw != nullptr) {
            check(dw->router && dw->gate_up && dw->down && dw->x, "DeviceSwitchFFN::backward: a null weight-gradient pointer");
            swiglu_forward_packed(s.hidden.data(), act_.data(), padded_, F, stream_, s.segment.data() + E);  // h again
            segment.resize(static_cast<std::size_t>(E + 1));
            check_cuda(cudaMemcpyAsync(segment.data(), s.segment.data(), segment.size() * sizeof(std::int32_t),
                                       cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync (DeviceSwitchFFN segments)");
            check_cuda(cudaMemsetAsync(dw->gate_up, 0, static_cast<std::size_t>(E * 2 * F * d) * sizeof(float), stream_),
                       "cudaMemsetAsync (DeviceSwitchFFN expert gradients)");
            check_cuda(cudaMemsetAsync(dw->down, 0, static_cast<std::size_t>(E * d * F) * sizeof(float), stream_),
                       "cudaMemsetAsync (DeviceSwitchFFN expert gradients)");
            check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceSwitchFFN segments)");
        }
        // expert e's sorted rows [segment[e], segment[e + 1]) (segment[E]: the rows in use)
        auto per_expert = [&](auto&& f) {
            for (std::int64_t e = 0; e < E; ++e) {
                const std::int64_t begin = segment[static_cast<std::size_t>(e)], end = segment[static_cast<std::size_t>(e + 1)];
                if (end > begin) f(e, begin, end - begin);
            }
        };
        gather_grad_kernel<<<static_cast<int>(padded_), vector_threads(row_vecs), 0, stream_>>>(
            d_out, s.perm.data(), s.prob.data(), s.out.data(), d_sorted_out_.data(), dgate_.data(),
            static_cast<int>(d));
        check_launch("switch gather gradient", "[", padded_, ", ", d, "]");
        void* const* sp = scratch_pointers_.data();
        void* const* lp = s.pointers.data();
        // d act = dy W_down, [M, d] -> [M, F]; SwiGLU backward in place; dx_sorted = d(gate|up) W_{gate|up}, [M, 2F] -> [M, d]
        gemm_pointer_batched(false, c_.chunk_rows, F, d, sp + 2 * chunks_, d, lp + 3 * chunks_, F, sp + 3 * chunks_, F,
                             dtype, compute_, chunks_, stream_);
        if (dw != nullptr)  // d W_down[e] = dy[seg]ᵀ h[seg], [d, rows] [rows, F]
            per_expert([&](std::int64_t e, std::int64_t begin, std::int64_t rows) {
                weight_grad(d_sorted_out_.data() + begin * d, act_.data() + begin * F, dw->down + e * d * F, rows, d, F);
            });
        swiglu_backward_packed(s.hidden.data(), d_act_.data(), s.hidden.data(), padded_, F, stream_,
                               s.segment.data() + E);
        gemm_pointer_batched(false, c_.chunk_rows, d, 2 * F, lp, 2 * F, lp + 2 * chunks_, d, sp + 4 * chunks_, d, dtype,
                             compute_, chunks_, stream_);
        if (dw != nullptr) {  // x gathered again; d W_gate|up[e] = d(gate|up)[seg]ᵀ x[seg], [2F, rows] [rows, d]
            gather_rows_kernel<<<static_cast<int>(padded_), vector_threads(row_vecs), 0, stream_>>>(
                dw->x, s.perm.data(), sorted_in_.data(), static_cast<int>(d));
            check_launch("switch gather (weight gradients)", "[", padded_, ", ", d, "]");
            per_expert([&](std::int64_t e, std::int64_t begin, std::int64_t rows) {
                weight_grad(s.hidden.data() + begin * 2 * F, sorted_in_.data() + begin * d, dw->gate_up + e * 2 * F * d,
                            rows, 2 * F, d);
            });
        }
        const float n = static_cast<float>(N);
        const float balance_grad = aux_weight * c_.aux_loss_coef * static_cast<float>(E) / (n * n);
        const float z_grad = aux_weight * c_.z_loss_coef * 2.0f / n;
        input_grad_kernel<<<static_cast<int>(N), vector_threads(row_vecs), static_cast<std::size_t>(E) * 4, stream_>>>(
            d_sorted_in_.data(), s.slot.data(), s.expert.data(), s.logits.data(), s.lse.data(), dgate_.data(),
            s.counts.data(), w.router, dx, static_cast<int>(E), static_cast<int>(d), balance_grad, z_grad,
            dw != nullptr ? d_logits_.data() : nullptr);
        check_launch("switch input gradient", "[", N, ", ", d, "]");
        if (dw != nullptr) weight_grad(d_logits_.data(), dw->x, dw->router, N, E, d);  // d W_r = dlogitsᵀ x, [E, d]
    }

    // Every layer's routing in its last forward (synchronises the stream).
    [[nodiscard]] std::vector<SwitchStats> stats() const {
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceSwitchFFN::stats)");
        const std::size_t E = static_cast<std::size_t>(c_.experts);
        std::vector<SwitchStats> all;
        for (const Saved& s : saved_) {
            std::vector<std::int32_t> counts(E + 1);
            std::vector<float> stats(E + 4);
            s.counts.download(counts);
            s.stats.download(stats);
            SwitchStats st;
            st.tokens = rows_;
            for (std::size_t e = 0; e < E; ++e) {
                st.assigned.push_back(counts[e]);
                st.mean_prob.push_back(stats[e]);
            }
            st.dropped = counts[E];
            st.balance = stats[E];
            st.router_entropy = stats[E + 1];
            st.z_loss = stats[E + 2];
            st.aux_loss = stats[E + 3];
            all.push_back(std::move(st));
        }
        return all;
    }

private:
    struct Saved {
        DeviceArray<float> logits;                // [N, E] router logits
        DeviceArray<std::int32_t> expert, slot;   // [N] top-1 expert; sorted row or −1 (dropped)
        DeviceArray<float> prob, lse;             // [N] p of the chosen expert; logsumexp of the logits
        DeviceArray<std::int32_t> perm;           // [P] the row in each sorted row, −1: padding
        DeviceArray<T> hidden;                    // [P, 2F] gate | up (their gradients after the backward)
        DeviceArray<T> out;                       // [P, d] unscaled expert outputs
        DeviceArray<std::int32_t> segment;        // [E + 1] segment starts, then the rows in use
        DeviceArray<std::int32_t> counts;         // [E + 1] rows assigned to each expert, then dropped
        DeviceArray<float> stats;                 // [E + 4] P_e, balance, entropy, z, aux
        DeviceArray<void*> pointers;              // [4, chunks] hidden, out, gate|up weight, down weight
        bool forwarded = false;
    };

    // dw = dyᵀ x (f32): the weight gradient of y = x wᵀ. dy: [rows, out], x: [rows, in] -> dw: f32 [out, in]
    void weight_grad(const T* dy, const T* x, float* dw, std::int64_t rows, std::int64_t out, std::int64_t in) const {
        gemm({.trans_a = true, .trans_b = false, .m = out, .n = in, .k = rows, .alpha = 1.0f, .beta = 0.0f, .a = dy,
              .lda = out, .b = x, .ldb = in, .c = dw, .ldc = in, .ab_type = dtype, .c_type = DType::f32,
              .compute = compute_, .stream = stream_});
    }

    // dst[i] = the i-th chunk of a [P, ld] array of T.
    void fill_pointers(void** dst, T* base, std::int64_t ld) {
        switch_detail::chunk_pointers_kernel<<<static_cast<int>(ceil_div(chunks_, 256)), 256, 0, stream_>>>(
            dst, base, c_.chunk_rows * ld, static_cast<int>(chunks_));
        check_launch("switch chunk pointers", "[", chunks_, "]");
    }

    SwitchConfig c_{};
    std::int64_t rows_ = 0, capacity_ = 0, chunks_ = 0, padded_ = 0, tiles_ = 0;
    GemmCompute compute_ = GemmCompute::f32;
    cudaStream_t stream_ = nullptr;
    std::vector<Saved> saved_;
    DeviceArray<std::int32_t> rank_, tile_counts_;  // [N]; [tiles, E] (then each tile's first ranks)
    DeviceArray<float> tile_sums_, dgate_;          // [tiles, E + 2]; [N]
    DeviceArray<T> d_logits_;                       // [N, E] the router logits' gradient (weight gradients)
    DeviceArray<T> sorted_in_, act_, d_sorted_out_, d_act_, d_sorted_in_;  // [P, d|F]
    DeviceArray<void*> scratch_pointers_;           // [5, chunks]: their chunks, in that order
};

}  // namespace mopt::backend::cuda
