#pragma once
// Fused attention on the GPU, forward and backward: FlashAttention-2 (Dao, 2023, "FlashAttention-2:
// Faster Attention with Better Parallelism and Work Partitioning", Alg. 1 and 2). Same semantics as
// the CPU op mopt/autodiff/ops/attention.hpp: q: [B, T, H, Dh], k, v: [B, S, Hkv, Dh]; query head h
// reads kv head h / (H / Hkv) (GQA); the queries are the last T of the S key positions; with
// `causal` query t sees keys [0, visible(t)), visible(t) = min(S, max(S - T + t + 1, prefix)) (the
// causal limit and the always-visible soft-prompt prefix are both leading ranges, so their union is
// one); without it every key. scale 0 means 1/sqrt(Dh).
//
// Forward (Alg. 1): a block owns 64 query rows of one (batch, head) and streams 64-key tiles of K
// and V through shared memory, only up to the last key its rows can see. The softmax is online
// (Milakov & Gimelshein, 2018): a running row max m and sum l; each tile rescales the output
// accumulator by exp(m_old - m_new), and O is divided by l once at the end. Only the row
// logsumexp lse = m + log l ([B, H, T], f32) is saved for the backward, never the T x S matrix P.
//
// Backward (Alg. 2): delta = rowsum(dO ⊙ O) first; then P = exp(scale·QKᵀ - lse) is recomputed tile
// by tile and dS = P ⊙ (dP - delta), dP = dO Vᵀ.
//  - dK, dV: a block owns 64 keys of one (batch, kv head) and loops over the query heads of its GQA
//    group and the query tiles that see those keys, accumulating dV += Pᵀ dO and dK += scale·dSᵀ Q
//    in registers and writing them once: no two blocks share a dK/dV row (the CPU op's split), so
//    there are no atomics and GQA needs no per-head copies to sum.
//  - dQ: a separate pass, a block per 64 query rows looping over key tiles, dQ += scale·dS K. It
//    recomputes S and dP (7 tile products instead of FA2's 5 with atomic dQ) but is deterministic
//    (runs are bitwise reproducible), needs no f32 dQ workspace or memset, and writes dQ once in
//    the input dtype.
//
// Masking: keys >= visible(t) score -inf (forward) or get P = 0 (backward); rows and keys past the
// end of T or S are zero-filled in shared memory so no garbage reaches a product, and a row whose
// scores so far are all -inf uses 0 as its max so exp never sees (-inf) - (-inf).
//
// Three code paths, chosen by AttentionOptions::kernel:
//  - Reference (f32 and bf16 inputs): one block of Dh threads per query row (forward, dQ) or key
//    (dK, dV), a plain loop over the keys (queries) with an online softmax, each dot product a
//    block reduction, thread d owning output column d. Slow; the yardstick the fast paths are
//    tested against on the device, and a fallback.
//  - SIMT (f32 and bf16 inputs, converted to f32 in shared memory): 256 threads, each owns a 4 x 4
//    micro-tile of the 64 x 64 score tile and the same 4 rows of the output accumulator, so the
//    online-softmax rescale is thread-local; row reductions are half-warp shuffles.
//  - Tensor cores (bf16 inputs, sm_80+): mma.sync m16n8k16 bf16 -> f32, 4 warps x 16 rows. P and dS
//    stay in registers: an m16n8 f32 accumulator pair has the layout of an m16k16 A operand, so
//    they feed the next product without going through shared memory (FA2 §3.3). V, dO, Q and K as
//    the B operand of P V, Pᵀ dO, dSᵀ Q and dS K are transposed on load by ldmatrix.trans.
// Softmax, statistics and accumulation are f32 in all three.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "mopt/backend/cuda/device.cuh"
#include "mopt/error.hpp"

namespace mopt::backend::cuda {

// Sizes of one call: q, out, grad_out, dq: [batch, seq_q, heads, head_dim];
// k, v, dk, dv: [batch, seq_k, kv_heads, head_dim]; lse, delta: [batch, heads, seq_q] f32.
struct AttentionShape {
    std::int64_t batch = 1, seq_q = 0, seq_k = 0, heads = 1, kv_heads = 1, head_dim = 64;
};

enum class AttentionKernel {
    automatic,    // tensor cores for bf16 with 16-byte aligned pointers, SIMT otherwise
    simt,         // f32 CUDA cores (f32 or bf16 inputs)
    tensor_core,  // mma.sync bf16 (bf16 inputs only)
    reference,    // one block per row, plain loops (f32 or bf16 inputs): slow, for checking
};

// As mopt::autodiff::AttentionOptions, plus the choice of code path.
struct AttentionOptions {
    bool causal = true;
    std::int64_t prefix = 0;  // the first `prefix` key positions are visible to every query
    float scale = 0.0f;       // 0 -> 1/sqrt(head_dim)
    AttentionKernel kernel = AttentionKernel::automatic;
};

// T: float or __nv_bfloat16. All pointers are device memory.
template <class T>
struct AttentionForwardArgs {
    const T* q = nullptr;  // [B, T, H, Dh]
    const T* k = nullptr;  // [B, S, Hkv, Dh]
    const T* v = nullptr;  // [B, S, Hkv, Dh]
    T* out = nullptr;      // [B, T, H, Dh]
    float* lse = nullptr;  // [B, H, T] row logsumexp of the scaled scores, for the backward
};

template <class T>
struct AttentionBackwardArgs {
    const T* q = nullptr;         // [B, T, H, Dh]
    const T* k = nullptr;         // [B, S, Hkv, Dh]
    const T* v = nullptr;         // [B, S, Hkv, Dh]
    const T* out = nullptr;       // [B, T, H, Dh] the forward's output
    const T* grad_out = nullptr;  // [B, T, H, Dh]
    const float* lse = nullptr;   // [B, H, T] the forward's logsumexp
    float* delta = nullptr;       // [B, H, T] scratch: rowsum(dO ⊙ O)
    T* dq = nullptr;              // [B, T, H, Dh] overwritten; null: not computed
    T* dk = nullptr;              // [B, S, Hkv, Dh] overwritten; null: not computed
    T* dv = nullptr;              // [B, S, Hkv, Dh] overwritten; null: not computed
};

namespace attention_detail {

using bf16 = __nv_bfloat16;

inline constexpr int kTile = 64;          // query rows and keys per tile (Br = Bc)
inline constexpr int kSimtThreads = 256;  // 16 x 16 threads, each 4 rows x 4 columns of a tile
inline constexpr int kPStride = kTile + 4;  // SIMT P/dS tile row stride: rows 4 apart land 16 banks apart
inline constexpr int kMmaThreads = 128;   // 4 warps x 16 rows
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// What the kernels need to know; scores are kept in log2 units (scale · log2 e) so exp is exp2.
struct Params {
    int batch, seq_q, seq_k, heads, kv_heads, group, prefix;
    bool causal;
    float scale, scale_log2;

    // Keys [0, visible(t)) are seen by query t (< seq_q).
    __host__ __device__ int visible(int t) const {
        if (!causal) return seq_k;
        const int v = seq_k - seq_q + t + 1 > prefix ? seq_k - seq_q + t + 1 : prefix;
        return v < seq_k ? v : seq_k;
    }
    // As visible(), and no key for a row past the end.
    __host__ __device__ int row_limit(int t) const { return t < seq_q ? visible(t) : 0; }
    // The first query that sees key c (every later one does too).
    __host__ __device__ int first_query(int c) const {
        if (!causal || c < prefix) return 0;
        const int t = c - (seq_k - seq_q);
        return t > 0 ? t : 0;
    }
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_float(float x) {
    if constexpr (std::is_same_v<T, float>)
        return x;
    else
        return __float2bfloat16_rn(x);
}

// --------------------------------------------------------------- reference path (one row per block)
// blockDim.x = Dh (32, 64 or 128): thread d owns column d of the row it writes.

// Σ over the block of x, returned to every thread. red: kMaxWarps floats of shared memory.
inline constexpr int kMaxWarps = 4;
__device__ __forceinline__ float block_sum(float x, float* red) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    const int warps = blockDim.x / 32;
    __syncthreads();  // the previous call's totals are read
    if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = x;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += red[w];
    return total;
}

// grid (T, H, B). out[b, t, h, :] and lse[b, h, t].
template <class T>
__global__ void forward_reference(Params p, const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse) {
    __shared__ float red[kMaxWarps];
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = threadIdx.x, Dh = blockDim.x;
    const int kvh = h / p.group;
    const std::int64_t q_at = ((std::int64_t{b} * p.seq_q + t) * p.heads + h) * Dh + d;
    const float qd = to_float(q[q_at]);
    float m = -INFINITY, l = 0.0f, acc = 0.0f;
    const int keys = p.visible(t);
    for (int j = 0; j < keys; ++j) {
        const std::int64_t kv_at = ((std::int64_t{b} * p.seq_k + j) * p.kv_heads + kvh) * Dh + d;
        const float s = block_sum(qd * to_float(k[kv_at]), red) * p.scale;
        const float m_new = fmaxf(m, s);
        const float alpha = expf(m - m_new);  // m = -inf on the first key: alpha = 0
        const float e = expf(s - m_new);
        l = l * alpha + e;
        acc = acc * alpha + e * to_float(v[kv_at]);
        m = m_new;
    }
    out[q_at] = from_float<T>(acc / l);  // keys >= 1: every query sees key 0
    if (d == 0) lse[(std::int64_t{b} * p.heads + h) * p.seq_q + t] = m + logf(l);
}

// grid (T, H, B). dq[b, t, h, :] = scale Σ_j dS_j k_j, dS_j = P_j (dO·v_j - dO·O).
template <class T>
__global__ void dq_reference(Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const T* __restrict__ out, const T* __restrict__ grad_out, const float* __restrict__ lse,
                             T* __restrict__ dq) {
    __shared__ float red[kMaxWarps];
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, d = threadIdx.x, Dh = blockDim.x;
    const int kvh = h / p.group;
    const std::int64_t q_at = ((std::int64_t{b} * p.seq_q + t) * p.heads + h) * Dh + d;
    const float qd = to_float(q[q_at]), god = to_float(grad_out[q_at]);
    const float delta = block_sum(god * to_float(out[q_at]), red);
    const float row_lse = lse[(std::int64_t{b} * p.heads + h) * p.seq_q + t];
    float acc = 0.0f;
    const int keys = p.visible(t);
    for (int j = 0; j < keys; ++j) {
        const std::int64_t kv_at = ((std::int64_t{b} * p.seq_k + j) * p.kv_heads + kvh) * Dh + d;
        const float kd = to_float(k[kv_at]);
        const float pr = expf(block_sum(qd * kd, red) * p.scale - row_lse);
        const float dp = block_sum(god * to_float(v[kv_at]), red);
        acc += pr * (dp - delta) * kd;
    }
    dq[q_at] = from_float<T>(acc * p.scale);
}

// grid (S, Hkv, B). For key j: dv = Σ P_tj dO_t, dk = scale Σ dS_tj q_t over the query heads of
// the group and the queries t that see key j.
template <class T>
__global__ void dkdv_reference(Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const T* __restrict__ out, const T* __restrict__ grad_out,
                               const float* __restrict__ lse, T* __restrict__ dk, T* __restrict__ dv) {
    __shared__ float red[kMaxWarps];
    const int j = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, d = threadIdx.x, Dh = blockDim.x;
    const std::int64_t kv_at = ((std::int64_t{b} * p.seq_k + j) * p.kv_heads + kvh) * Dh + d;
    const float kd = to_float(k[kv_at]), vd = to_float(v[kv_at]);
    float dk_acc = 0.0f, dv_acc = 0.0f;
    for (int h = kvh * p.group; h < (kvh + 1) * p.group; ++h)
        for (int t = 0; t < p.seq_q; ++t) {
            if (j >= p.visible(t)) continue;  // the same for the whole block
            const std::int64_t q_at = ((std::int64_t{b} * p.seq_q + t) * p.heads + h) * Dh + d;
            const float qd = to_float(q[q_at]), god = to_float(grad_out[q_at]);
            const float row_lse = lse[(std::int64_t{b} * p.heads + h) * p.seq_q + t];
            const float pr = expf(block_sum(qd * kd, red) * p.scale - row_lse);
            const float dp = block_sum(god * vd, red);
            const float delta = block_sum(god * to_float(out[q_at]), red);
            dv_acc += pr * god;
            dk_acc += pr * (dp - delta) * qd;
        }
    if (dk) dk[kv_at] = from_float<T>(dk_acc * p.scale);
    if (dv) dv[kv_at] = from_float<T>(dv_acc);
}

// ---------------------------------------------------------------- SIMT path (f32 in shared memory)
// Tiles are [64][Dh + 1] floats: the +1 puts the 16 rows a half-warp reads at one d in 16 banks.
// Thread (ty, tx) = (tid / 16, tid % 16) owns tile rows ty·4 + i and columns tx + 16·j.

// dst: [64][Dh + 1] <- src rows [0, rows) with row stride `stride`; rows past the end are zeros.
template <int Dh, class T>
__device__ __forceinline__ void simt_load_tile(float* dst, const T* src, std::int64_t stride, int rows) {
    for (int i = threadIdx.x; i < kTile * Dh; i += kSimtThreads) {
        const int r = i / Dh, d = i % Dh;
        dst[r * (Dh + 1) + d] = r < rows ? to_float(src[r * stride + d]) : 0.0f;
    }
}

// s[i][j] = Σ_d a[ty·4 + i][d] · b[tx + 16·j][d]; a, b: [64][Dh + 1]
template <int Dh>
__device__ __forceinline__ void simt_scores(float (&s)[4][4], const float* a, const float* b, int ty, int tx) {
    constexpr int ld = Dh + 1;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
    const float* ar = a + ty * 4 * ld;
    const float* br = b + tx * ld;
#pragma unroll 4
    for (int d = 0; d < Dh; ++d) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = ar[i * ld + d];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = br[j * 16 * ld + d];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) s[i][j] = fmaf(av[i], bv[j], s[i][j]);
    }
}

// acc[i][c] += Σ_j p[ty·4 + i][j] · x[j][tx + 16·c]; p: [64][kPStride], x: [64][Dh + 1]
template <int Dh>
__device__ __forceinline__ void simt_accumulate(float (&acc)[4][Dh / 16], const float* p, const float* x, int ty,
                                                int tx) {
    constexpr int ld = Dh + 1;
    const float* pr = p + ty * 4 * kPStride;
    const float* xc = x + tx;
#pragma unroll 4
    for (int j = 0; j < kTile; ++j) {
        float pv[4], xv[Dh / 16];
#pragma unroll
        for (int i = 0; i < 4; ++i) pv[i] = pr[i * kPStride + j];
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) xv[c] = xc[j * ld + 16 * c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < Dh / 16; ++c) acc[i][c] = fmaf(pv[i], xv[c], acc[i][c]);
    }
}

// Max / sum over the 16 threads of a half-warp (one tile row).
__device__ __forceinline__ float half_warp_max(float x) {
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}
__device__ __forceinline__ float half_warp_sum(float x) {
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

// grid (query tiles, H, B); smem: Q, K, V [64][Dh + 1], P [64][kPStride]
template <int Dh, class T>
__global__ void __launch_bounds__(kSimtThreads, 1)
    forward_simt(Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 T* __restrict__ out, float* __restrict__ lse) {
    extern __shared__ float smem_f32[];
    constexpr int ld = Dh + 1;
    float* qs = smem_f32;
    float* ks = qs + kTile * ld;
    float* vs = ks + kTile * ld;
    float* ps = vs + kTile * ld;

    const int t0 = (gridDim.x - 1 - blockIdx.x) * kTile;  // the longest causal rows start first
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.group;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int rows = min(kTile, p.seq_q - t0);
    const std::int64_t q_stride = std::int64_t{p.heads} * Dh, kv_stride = std::int64_t{p.kv_heads} * Dh;
    const std::int64_t q_off = (std::int64_t{b} * p.seq_q + t0) * q_stride + std::int64_t{h} * Dh;
    const std::int64_t kv_base = std::int64_t{b} * p.seq_k * kv_stride + std::int64_t{kvh} * Dh;
    simt_load_tile<Dh>(qs, q + q_off, q_stride, rows);

    int limit[4];
    float m[4], l[4], acc[4][Dh / 16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        limit[i] = p.row_limit(t0 + ty * 4 + i);
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) acc[i][c] = 0.0f;
    }
    const int kv_end = p.visible(t0 + rows - 1);  // visible() grows with t: the block's last row sees most
    for (int c0 = 0; c0 < kv_end; c0 += kTile) {
        __syncthreads();  // the previous tile's K, V, P are no longer read (and Q is loaded)
        const int keys = min(kTile, p.seq_k - c0);
        simt_load_tile<Dh>(ks, k + kv_base + c0 * kv_stride, kv_stride, keys);
        simt_load_tile<Dh>(vs, v + kv_base + c0 * kv_stride, kv_stride, keys);
        __syncthreads();
        float s[4][4];
        simt_scores<Dh>(s, qs, ks, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                s[i][j] = c0 + tx + 16 * j < limit[i] ? s[i][j] * p.scale_log2 : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            const float m_new = fmaxf(m[i], half_warp_max(mx));
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: exp2(-inf) = 0
            const float alpha = exp2f(m[i] - m_use);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float e = exp2f(s[i][j] - m_use);
                ps[(ty * 4 + i) * kPStride + tx + 16 * j] = e;
                sum += e;
            }
            l[i] = l[i] * alpha + half_warp_sum(sum);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < Dh / 16; ++c) acc[i][c] *= alpha;
        }
        __syncthreads();  // the whole P tile is written
        simt_accumulate<Dh>(acc, ps, vs, ty, tx);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        if (r >= rows) continue;
        const float inv = 1.0f / l[i];  // l > 0: every query sees key 0
        T* o = out + q_off + r * q_stride;
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) o[tx + 16 * c] = from_float<T>(acc[i][c] * inv);
        if (tx == 0) lse[(std::int64_t{b} * p.heads + h) * p.seq_q + t0 + r] = (m[i] + log2f(l[i])) * kLn2;
    }
}

// grid (key tiles, Hkv, B); smem: K, V, Q, dO [64][Dh + 1], P/dS [64][kPStride], lse, delta [64]
template <int Dh, class T>
__global__ void __launch_bounds__(kSimtThreads, 1)
    dkdv_simt(Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const T* __restrict__ grad_out, const float* __restrict__ lse, const float* __restrict__ delta,
              T* __restrict__ dk, T* __restrict__ dv) {
    extern __shared__ float smem_f32[];
    constexpr int ld = Dh + 1;
    float* ks = smem_f32;
    float* vs = ks + kTile * ld;
    float* qs = vs + kTile * ld;
    float* dos = qs + kTile * ld;
    float* ps = dos + kTile * ld;
    float* lse_s = ps + kTile * kPStride;
    float* delta_s = lse_s + kTile;

    const int c0 = blockIdx.x * kTile, kvh = blockIdx.y, b = blockIdx.z;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int keys = min(kTile, p.seq_k - c0);
    const std::int64_t q_stride = std::int64_t{p.heads} * Dh, kv_stride = std::int64_t{p.kv_heads} * Dh;
    const std::int64_t kv_off = (std::int64_t{b} * p.seq_k + c0) * kv_stride + std::int64_t{kvh} * Dh;
    simt_load_tile<Dh>(ks, k + kv_off, kv_stride, keys);
    simt_load_tile<Dh>(vs, v + kv_off, kv_stride, keys);

    float dk_acc[4][Dh / 16], dv_acc[4][Dh / 16];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) dk_acc[i][c] = dv_acc[i][c] = 0.0f;

    const int t_begin = p.first_query(c0);  // earlier queries see none of these keys
    for (int gi = 0; gi < p.group; ++gi) {
        const int h = kvh * p.group + gi;
        for (int t0 = t_begin; t0 < p.seq_q; t0 += kTile) {
            const int rows = min(kTile, p.seq_q - t0);
            const std::int64_t q_off = (std::int64_t{b} * p.seq_q + t0) * q_stride + std::int64_t{h} * Dh;
            __syncthreads();  // the previous tile's Q, dO, P/dS, lse, delta are no longer read
            simt_load_tile<Dh>(qs, q + q_off, q_stride, rows);
            simt_load_tile<Dh>(dos, grad_out + q_off, q_stride, rows);
            if (threadIdx.x < kTile) {
                const int r = threadIdx.x;
                const std::int64_t row = (std::int64_t{b} * p.heads + h) * p.seq_q + t0 + r;
                lse_s[r] = r < rows ? lse[row] * kLog2e : 0.0f;
                delta_s[r] = r < rows ? delta[row] : 0.0f;
            }
            __syncthreads();
            // Transposed tiles: row = key ty·4 + i, column = query tx + 16·j.
            float s[4][4], ds[4][4];
            simt_scores<Dh>(s, ks, qs, ty, tx);   // Sᵀ = K Qᵀ
            simt_scores<Dh>(ds, vs, dos, ty, tx);  // dPᵀ = V dOᵀ
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int key = c0 + ty * 4 + i, r = tx + 16 * j;
                    const float pr = key < p.row_limit(t0 + r) ? exp2f(s[i][j] * p.scale_log2 - lse_s[r]) : 0.0f;
                    ps[(ty * 4 + i) * kPStride + r] = pr;
                    ds[i][j] = pr * (ds[i][j] - delta_s[r]);  // dSᵀ = Pᵀ ⊙ (dPᵀ - delta)
                }
            __syncthreads();
            simt_accumulate<Dh>(dv_acc, ps, dos, ty, tx);  // dV += Pᵀ dO
            __syncthreads();
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) ps[(ty * 4 + i) * kPStride + tx + 16 * j] = ds[i][j];
            __syncthreads();
            simt_accumulate<Dh>(dk_acc, ps, qs, ty, tx);  // dK += dSᵀ Q (scaled below)
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        if (r >= keys) continue;
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) {
            const std::int64_t at = kv_off + r * kv_stride + tx + 16 * c;
            if (dk) dk[at] = from_float<T>(dk_acc[i][c] * p.scale);
            if (dv) dv[at] = from_float<T>(dv_acc[i][c]);
        }
    }
}

// grid (query tiles, H, B); smem: Q, dO, K, V [64][Dh + 1], dS [64][kPStride]
template <int Dh, class T>
__global__ void __launch_bounds__(kSimtThreads, 1)
    dq_simt(Params p, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
            const T* __restrict__ grad_out, const float* __restrict__ lse, const float* __restrict__ delta,
            T* __restrict__ dq) {
    extern __shared__ float smem_f32[];
    constexpr int ld = Dh + 1;
    float* qs = smem_f32;
    float* dos = qs + kTile * ld;
    float* ks = dos + kTile * ld;
    float* vs = ks + kTile * ld;
    float* ps = vs + kTile * ld;

    const int t0 = (gridDim.x - 1 - blockIdx.x) * kTile;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.group;
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int rows = min(kTile, p.seq_q - t0);
    const std::int64_t q_stride = std::int64_t{p.heads} * Dh, kv_stride = std::int64_t{p.kv_heads} * Dh;
    const std::int64_t q_off = (std::int64_t{b} * p.seq_q + t0) * q_stride + std::int64_t{h} * Dh;
    const std::int64_t kv_base = std::int64_t{b} * p.seq_k * kv_stride + std::int64_t{kvh} * Dh;
    simt_load_tile<Dh>(qs, q + q_off, q_stride, rows);
    simt_load_tile<Dh>(dos, grad_out + q_off, q_stride, rows);

    int limit[4];
    float lse2[4], dlt[4], acc[4][Dh / 16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        const std::int64_t row = (std::int64_t{b} * p.heads + h) * p.seq_q + t0 + r;
        limit[i] = p.row_limit(t0 + r);
        lse2[i] = r < rows ? lse[row] * kLog2e : 0.0f;
        dlt[i] = r < rows ? delta[row] : 0.0f;
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) acc[i][c] = 0.0f;
    }
    const int kv_end = p.visible(t0 + rows - 1);
    for (int c0 = 0; c0 < kv_end; c0 += kTile) {
        __syncthreads();
        const int keys = min(kTile, p.seq_k - c0);
        simt_load_tile<Dh>(ks, k + kv_base + c0 * kv_stride, kv_stride, keys);
        simt_load_tile<Dh>(vs, v + kv_base + c0 * kv_stride, kv_stride, keys);
        __syncthreads();
        float s[4][4], ds[4][4];
        simt_scores<Dh>(s, qs, ks, ty, tx);    // S = Q Kᵀ
        simt_scores<Dh>(ds, dos, vs, ty, tx);  // dP = dO Vᵀ
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float pr = c0 + tx + 16 * j < limit[i] ? exp2f(s[i][j] * p.scale_log2 - lse2[i]) : 0.0f;
                ps[(ty * 4 + i) * kPStride + tx + 16 * j] = pr * (ds[i][j] - dlt[i]);
            }
        __syncthreads();
        simt_accumulate<Dh>(acc, ps, ks, ty, tx);  // dQ += dS K (scaled below)
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        if (r >= rows) continue;
#pragma unroll
        for (int c = 0; c < Dh / 16; ++c) dq[q_off + r * q_stride + tx + 16 * c] = from_float<T>(acc[i][c] * p.scale);
    }
}

// delta = rowsum(dO ⊙ O): one warp per (b, t, h) row. out, grad_out: [B, T, H, Dh] -> delta: [B, H, T]
template <int Dh, class T>
__global__ void row_delta(Params p, const T* __restrict__ out, const T* __restrict__ grad_out,
                          float* __restrict__ delta) {
    const std::int64_t row = std::int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= std::int64_t{p.batch} * p.seq_q * p.heads) return;  // whole warps leave together
    const T* o = out + row * Dh;
    const T* g = grad_out + row * Dh;
    float sum = 0.0f;
#pragma unroll
    for (int d = lane; d < Dh; d += 32) sum = fmaf(to_float(o[d]), to_float(g[d]), sum);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
        const std::int64_t h = row % p.heads, bt = row / p.heads;
        const std::int64_t t = bt % p.seq_q, b = bt / p.seq_q;
        delta[(b * p.heads + h) * p.seq_q + t] = sum;
    }
}

// ------------------------------------------------------- tensor-core path (bf16, mma.sync m16n8k16)
// Tiles are [64][Dh + 8] bf16: rows stay 16-byte aligned for uint4 loads and ldmatrix, and the 8
// rows of one fragment load fall in distinct banks. Fragment layouts (PTX ISA, mma.m16n8k16, lane =
// 4·g + t): A 16x16 row-major holds (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
// B 16x8 holds (k 2t..2t+1, n g), (k 2t+8.., n g); C 16x8 holds (g, 2t..2t+1), (g+8, 2t..2t+1).

__device__ __forceinline__ void mma_bf16(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                         std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ std::uint32_t ld_u32(const bf16* p) { return *reinterpret_cast<const std::uint32_t*>(p); }

// Two floats as one bf16x2 register, `lo` in the low half (the lower column / k index).
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    return u;
}

// A operand: the 16 x 16 block at `tile` of a row-major [rows][ld] array.
__device__ __forceinline__ void load_a(std::uint32_t (&a)[4], const bf16* tile, int ld, int lane) {
    const bf16* p = tile + (lane >> 2) * ld + 2 * (lane & 3);
    a[0] = ld_u32(p);
    a[1] = ld_u32(p + 8 * ld);
    a[2] = ld_u32(p + 8);
    a[3] = ld_u32(p + 8 * ld + 8);
}

// B operand (k16 x n8) from an [n][k] row-major block: B[k][n] = tile[n][k].
__device__ __forceinline__ void load_b(std::uint32_t& b0, std::uint32_t& b1, const bf16* tile, int ld, int lane) {
    const bf16* p = tile + (lane >> 2) * ld + 2 * (lane & 3);
    b0 = ld_u32(p);
    b1 = ld_u32(p + 8);
}

// B operands of two adjacent n8 blocks (k16 x n16) from a [k][n] row-major block, transposed by
// ldmatrix: b[0], b[1] for columns 0-7, b[2], b[3] for columns 8-15. Lane l gives the address of
// row l % 8 of matrix l / 8 (matrices: k 0-7 | k 8-15 of n 0-7, then the same of n 8-15).
__device__ __forceinline__ void load_b_trans(std::uint32_t (&b)[4], const bf16* tile, int ld, int lane) {
    const bf16* p = tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8;
    const auto addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                 : "r"(addr));
}

// The A operand (16 rows x 16 k) made of two m16n8 accumulators: columns 0-7 and 8-15 of k.
__device__ __forceinline__ void accumulators_to_a(std::uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// dst: [64][Dh + 8] <- src rows [0, rows) with row stride `stride`, 16 bytes at a time; zeros past the end.
template <int Dh>
__device__ __forceinline__ void mma_load_tile(bf16* dst, const bf16* src, std::int64_t stride, int rows) {
    constexpr int chunks = Dh / 8;
    for (int i = threadIdx.x; i < kTile * chunks; i += kMmaThreads) {
        const int r = i / chunks, c = i % chunks;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r < rows) x = *reinterpret_cast<const uint4*>(src + r * stride + c * 8);
        *reinterpret_cast<uint4*>(dst + r * (Dh + 8) + c * 8) = x;
    }
}

// Sum over the 4 lanes of a quad (the lanes that hold one accumulator row).
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// grid (query tiles, H, B); smem: Q, K, V [64][Dh + 8] bf16. Warp w owns query rows 16w..16w+15.
template <int Dh>
__global__ void __launch_bounds__(kMmaThreads)
    forward_mma(Params p, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                bf16* __restrict__ out, float* __restrict__ lse) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int ld = Dh + 8;
    bf16* qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* ks = qs + kTile * ld;
    bf16* vs = ks + kTile * ld;

    const int t0 = (gridDim.x - 1 - blockIdx.x) * kTile;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int rows = min(kTile, p.seq_q - t0);
    const std::int64_t q_stride = std::int64_t{p.heads} * Dh, kv_stride = std::int64_t{p.kv_heads} * Dh;
    const std::int64_t q_off = (std::int64_t{b} * p.seq_q + t0) * q_stride + std::int64_t{h} * Dh;
    const std::int64_t kv_base = std::int64_t{b} * p.seq_k * kv_stride + std::int64_t{kvh} * Dh;
    mma_load_tile<Dh>(qs, q + q_off, q_stride, rows);

    // This lane's two rows: r = 16w + g (accumulator entries 0, 1) and r + 8 (entries 2, 3).
    const int r0 = warp * 16 + g;
    const int limit[2] = {p.row_limit(t0 + r0), p.row_limit(t0 + r0 + 8)};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this lane's share of the row sum
    float o[Dh / 8][4];
#pragma unroll
    for (int n = 0; n < Dh / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    const int kv_end = p.visible(t0 + rows - 1);
    for (int c0 = 0; c0 < kv_end; c0 += kTile) {
        __syncthreads();
        const int keys = min(kTile, p.seq_k - c0);
        mma_load_tile<Dh>(ks, k + kv_base + c0 * kv_stride, kv_stride, keys);
        mma_load_tile<Dh>(vs, v + kv_base + c0 * kv_stride, kv_stride, keys);
        __syncthreads();

        float s[kTile / 8][4];  // S = Q Kᵀ: 16 rows x 64 keys, key 8j + 2t + (e & 1)
#pragma unroll
        for (int j = 0; j < kTile / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < Dh / 16; ++kk) {
            std::uint32_t a[4];
            load_a(a, qs + warp * 16 * ld + kk * 16, ld, lane);
#pragma unroll
            for (int j = 0; j < kTile / 8; ++j) {
                std::uint32_t b0, b1;
                load_b(b0, b1, ks + j * 8 * ld + kk * 16, ld, lane);
                mma_bf16(s[j], a, b0, b1);
            }
        }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < kTile / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = c0 + j * 8 + 2 * t + (e & 1);
                s[j][e] = key < limit[e >> 1] ? s[j][e] * p.scale_log2 : -INFINITY;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
            }
        float m_use[2], alpha[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float m_new = fmaxf(m[i], quad_max(mx[i]));
            m_use[i] = m_new == -INFINITY ? 0.0f : m_new;
            alpha[i] = exp2f(m[i] - m_use[i]);
            m[i] = m_new;
            l[i] *= alpha[i];
        }
#pragma unroll
        for (int j = 0; j < kTile / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = exp2f(s[j][e] - m_use[e >> 1]);
                l[e >> 1] += s[j][e];
            }
#pragma unroll
        for (int n = 0; n < Dh / 8; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        // O += P V, P straight from the accumulators, 16 keys per step.
#pragma unroll
        for (int kk = 0; kk < kTile / 16; ++kk) {
            std::uint32_t a[4];
            accumulators_to_a(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < Dh / 8; n += 2) {
                std::uint32_t bv[4];
                load_b_trans(bv, vs + kk * 16 * ld + n * 8, ld, lane);
                mma_bf16(o[n], a, bv[0], bv[1]);
                mma_bf16(o[n + 1], a, bv[2], bv[3]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = r0 + 8 * i;
        const float total = quad_sum(l[i]);  // all lanes take part in the shuffle before any leaves
        if (r >= rows) continue;
        const float inv = 1.0f / total;
        bf16* orow = out + q_off + r * q_stride;
#pragma unroll
        for (int n = 0; n < Dh / 8; ++n)
            *reinterpret_cast<std::uint32_t*>(orow + n * 8 + 2 * t) =
                pack_bf16(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        if (t == 0) lse[(std::int64_t{b} * p.heads + h) * p.seq_q + t0 + r] = (m[i] + log2f(total)) * kLn2;
    }
}

// grid (key tiles, Hkv, B); smem: K, V, Q, dO [64][Dh + 8] bf16, lse, delta [64] f32.
// Warp w owns keys 16w..16w+15; each step takes 16 queries so Sᵀ, dPᵀ stay 8 registers each.
template <int Dh>
__global__ void __launch_bounds__(kMmaThreads)
    dkdv_mma(Params p, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
             const bf16* __restrict__ grad_out, const float* __restrict__ lse, const float* __restrict__ delta,
             bf16* __restrict__ dk, bf16* __restrict__ dv) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int ld = Dh + 8;
    bf16* ks = reinterpret_cast<bf16*>(smem_raw);
    bf16* vs = ks + kTile * ld;
    bf16* qs = vs + kTile * ld;
    bf16* dos = qs + kTile * ld;
    float* lse_s = reinterpret_cast<float*>(dos + kTile * ld);
    float* delta_s = lse_s + kTile;

    const int c0 = blockIdx.x * kTile, kvh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int keys = min(kTile, p.seq_k - c0);
    const std::int64_t q_stride = std::int64_t{p.heads} * Dh, kv_stride = std::int64_t{p.kv_heads} * Dh;
    const std::int64_t kv_off = (std::int64_t{b} * p.seq_k + c0) * kv_stride + std::int64_t{kvh} * Dh;
    mma_load_tile<Dh>(ks, k + kv_off, kv_stride, keys);
    mma_load_tile<Dh>(vs, v + kv_off, kv_stride, keys);

    const int key[2] = {c0 + warp * 16 + g, c0 + warp * 16 + g + 8};  // accumulator rows
    float dk_acc[Dh / 8][4], dv_acc[Dh / 8][4];
#pragma unroll
    for (int n = 0; n < Dh / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;

    const int t_begin = p.first_query(c0);
    for (int gi = 0; gi < p.group; ++gi) {
        const int h = kvh * p.group + gi;
        for (int t0 = t_begin; t0 < p.seq_q; t0 += kTile) {
            const int rows = min(kTile, p.seq_q - t0);
            const std::int64_t q_off = (std::int64_t{b} * p.seq_q + t0) * q_stride + std::int64_t{h} * Dh;
            __syncthreads();
            mma_load_tile<Dh>(qs, q + q_off, q_stride, rows);
            mma_load_tile<Dh>(dos, grad_out + q_off, q_stride, rows);
            if (threadIdx.x < kTile) {
                const int r = threadIdx.x;
                const std::int64_t row = (std::int64_t{b} * p.heads + h) * p.seq_q + t0 + r;
                lse_s[r] = r < rows ? lse[row] * kLog2e : 0.0f;
                delta_s[r] = r < rows ? delta[row] : 0.0f;
            }
            __syncthreads();
#pragma unroll 1
            for (int jj = 0; jj < kTile / 16; ++jj) {  // queries 16jj .. 16jj + 15 of the tile
                float s[2][4] = {}, dp[2][4] = {};     // Sᵀ = K Qᵀ, dPᵀ = V dOᵀ: 16 keys x 16 queries
#pragma unroll
                for (int kk = 0; kk < Dh / 16; ++kk) {
                    std::uint32_t ak[4], av[4];
                    load_a(ak, ks + warp * 16 * ld + kk * 16, ld, lane);
                    load_a(av, vs + warp * 16 * ld + kk * 16, ld, lane);
#pragma unroll
                    for (int jh = 0; jh < 2; ++jh) {
                        std::uint32_t b0, b1;
                        load_b(b0, b1, qs + (jj * 16 + jh * 8) * ld + kk * 16, ld, lane);
                        mma_bf16(s[jh], ak, b0, b1);
                        load_b(b0, b1, dos + (jj * 16 + jh * 8) * ld + kk * 16, ld, lane);
                        mma_bf16(dp[jh], av, b0, b1);
                    }
                }
#pragma unroll
                for (int jh = 0; jh < 2; ++jh)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r = jj * 16 + jh * 8 + 2 * t + (e & 1);
                        const float pr =
                            key[e >> 1] < p.row_limit(t0 + r) ? exp2f(s[jh][e] * p.scale_log2 - lse_s[r]) : 0.0f;
                        s[jh][e] = pr;
                        dp[jh][e] = pr * (dp[jh][e] - delta_s[r]);  // dSᵀ
                    }
                std::uint32_t a_p[4], a_ds[4];
                accumulators_to_a(a_p, s[0], s[1]);
                accumulators_to_a(a_ds, dp[0], dp[1]);
#pragma unroll
                for (int n = 0; n < Dh / 8; n += 2) {
                    std::uint32_t bx[4];
                    load_b_trans(bx, dos + jj * 16 * ld + n * 8, ld, lane);  // dV += Pᵀ dO
                    mma_bf16(dv_acc[n], a_p, bx[0], bx[1]);
                    mma_bf16(dv_acc[n + 1], a_p, bx[2], bx[3]);
                    load_b_trans(bx, qs + jj * 16 * ld + n * 8, ld, lane);  // dK += dSᵀ Q
                    mma_bf16(dk_acc[n], a_ds, bx[0], bx[1]);
                    mma_bf16(dk_acc[n + 1], a_ds, bx[2], bx[3]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = warp * 16 + g + 8 * i;
        if (r >= keys) continue;
        const std::int64_t at = kv_off + r * kv_stride + 2 * t;
#pragma unroll
        for (int n = 0; n < Dh / 8; ++n) {
            if (dk)
                *reinterpret_cast<std::uint32_t*>(dk + at + n * 8) =
                    pack_bf16(dk_acc[n][2 * i] * p.scale, dk_acc[n][2 * i + 1] * p.scale);
            if (dv)
                *reinterpret_cast<std::uint32_t*>(dv + at + n * 8) = pack_bf16(dv_acc[n][2 * i], dv_acc[n][2 * i + 1]);
        }
    }
}

// grid (query tiles, H, B); smem: Q, dO, K, V [64][Dh + 8] bf16. Warp w owns query rows 16w..16w+15.
template <int Dh>
__global__ void __launch_bounds__(kMmaThreads)
    dq_mma(Params p, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
           const bf16* __restrict__ grad_out, const float* __restrict__ lse, const float* __restrict__ delta,
           bf16* __restrict__ dq) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int ld = Dh + 8;
    bf16* qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* dos = qs + kTile * ld;
    bf16* ks = dos + kTile * ld;
    bf16* vs = ks + kTile * ld;

    const int t0 = (gridDim.x - 1 - blockIdx.x) * kTile;
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / p.group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int rows = min(kTile, p.seq_q - t0);
    const std::int64_t q_stride = std::int64_t{p.heads} * Dh, kv_stride = std::int64_t{p.kv_heads} * Dh;
    const std::int64_t q_off = (std::int64_t{b} * p.seq_q + t0) * q_stride + std::int64_t{h} * Dh;
    const std::int64_t kv_base = std::int64_t{b} * p.seq_k * kv_stride + std::int64_t{kvh} * Dh;
    mma_load_tile<Dh>(qs, q + q_off, q_stride, rows);
    mma_load_tile<Dh>(dos, grad_out + q_off, q_stride, rows);

    const int r0 = warp * 16 + g;
    int limit[2];
    float lse2[2], dlt[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = r0 + 8 * i;
        const std::int64_t row = (std::int64_t{b} * p.heads + h) * p.seq_q + t0 + r;
        limit[i] = p.row_limit(t0 + r);
        lse2[i] = r < rows ? lse[row] * kLog2e : 0.0f;
        dlt[i] = r < rows ? delta[row] : 0.0f;
    }
    float acc[Dh / 8][4];
#pragma unroll
    for (int n = 0; n < Dh / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    const int kv_end = p.visible(t0 + rows - 1);
    for (int c0 = 0; c0 < kv_end; c0 += kTile) {
        __syncthreads();
        const int keys = min(kTile, p.seq_k - c0);
        mma_load_tile<Dh>(ks, k + kv_base + c0 * kv_stride, kv_stride, keys);
        mma_load_tile<Dh>(vs, v + kv_base + c0 * kv_stride, kv_stride, keys);
        __syncthreads();
#pragma unroll 1
        for (int jj = 0; jj < kTile / 16; ++jj) {  // keys 16jj .. 16jj + 15 of the tile
            float s[2][4] = {}, dp[2][4] = {};     // S = Q Kᵀ, dP = dO Vᵀ: 16 rows x 16 keys
#pragma unroll
            for (int kk = 0; kk < Dh / 16; ++kk) {
                std::uint32_t aq[4], ado[4];
                load_a(aq, qs + warp * 16 * ld + kk * 16, ld, lane);
                load_a(ado, dos + warp * 16 * ld + kk * 16, ld, lane);
#pragma unroll
                for (int jh = 0; jh < 2; ++jh) {
                    std::uint32_t b0, b1;
                    load_b(b0, b1, ks + (jj * 16 + jh * 8) * ld + kk * 16, ld, lane);
                    mma_bf16(s[jh], aq, b0, b1);
                    load_b(b0, b1, vs + (jj * 16 + jh * 8) * ld + kk * 16, ld, lane);
                    mma_bf16(dp[jh], ado, b0, b1);
                }
            }
#pragma unroll
            for (int jh = 0; jh < 2; ++jh)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = c0 + jj * 16 + jh * 8 + 2 * t + (e & 1), i = e >> 1;
                    const float pr = key < limit[i] ? exp2f(s[jh][e] * p.scale_log2 - lse2[i]) : 0.0f;
                    dp[jh][e] = pr * (dp[jh][e] - dlt[i]);  // dS
                }
            std::uint32_t a_ds[4];
            accumulators_to_a(a_ds, dp[0], dp[1]);
#pragma unroll
            for (int n = 0; n < Dh / 8; n += 2) {
                std::uint32_t bk[4];
                load_b_trans(bk, ks + jj * 16 * ld + n * 8, ld, lane);  // dQ += dS K
                mma_bf16(acc[n], a_ds, bk[0], bk[1]);
                mma_bf16(acc[n + 1], a_ds, bk[2], bk[3]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = r0 + 8 * i;
        if (r >= rows) continue;
        bf16* row = dq + q_off + r * q_stride + 2 * t;
#pragma unroll
        for (int n = 0; n < Dh / 8; ++n)
            *reinterpret_cast<std::uint32_t*>(row + n * 8) =
                pack_bf16(acc[n][2 * i] * p.scale, acc[n][2 * i + 1] * p.scale);
    }
}

// ------------------------------------------------------------------------------------- host side

inline std::string describe(const AttentionShape& s) {
    return mopt::detail::concat("q [B, T, H, Dh] = [", s.batch, ", ", s.seq_q, ", ", s.heads, ", ", s.head_dim,
                                "], k, v [B, S, Hkv, Dh] = [", s.batch, ", ", s.seq_k, ", ", s.kv_heads, ", ",
                                s.head_dim, "]");
}

// Validates the call and turns it into kernel parameters. `op` names the public function.
inline Params make_params(const char* op, const AttentionShape& s, const AttentionOptions& opt) {
    check(s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128, op, ": head_dim ", s.head_dim,
          " is not supported (32, 64 or 128); ", describe(s));
    check(s.batch >= 0 && s.seq_q >= 0 && s.seq_k >= 0, op, ": negative size; ", describe(s));
    check(s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0, op, ": query heads H = ", s.heads,
          " are not divisible by kv heads Hkv = ", s.kv_heads, "; ", describe(s));
    check(s.seq_q <= s.seq_k, op, ": more queries than keys (T = ", s.seq_q, " > S = ", s.seq_k,
          "); the queries are the last T key positions; ", describe(s));
    check(opt.prefix >= 0, op, ": prefix must be >= 0, got ", opt.prefix);
    check(s.batch <= 65535 && s.heads <= 65535, op, ": batch and heads must be <= 65535 (grid limits); ", describe(s));
    check(s.seq_k <= (std::int64_t{1} << 30), op, ": sequence longer than 2^30; ", describe(s));
    const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    return {static_cast<int>(s.batch),
            static_cast<int>(s.seq_q),
            static_cast<int>(s.seq_k),
            static_cast<int>(s.heads),
            static_cast<int>(s.kv_heads),
            static_cast<int>(s.heads / s.kv_heads),
            static_cast<int>(opt.prefix < s.seq_k ? opt.prefix : s.seq_k),  // visible() clamps at S anyway
            opt.causal,
            scale,
            scale * kLog2e};
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Whether this call runs on tensor cores (an explicit choice, or `automatic` with bf16 and aligned
// pointers); checks that an explicit choice is possible.
template <class T, class... Ptrs>
bool use_tensor_cores(const char* op, const AttentionOptions& opt, const Ptrs*... ptrs) {
    const bool aligned = (aligned16(ptrs) && ...);
    if (opt.kernel == AttentionKernel::tensor_core) {
        check(std::is_same_v<T, bf16>, op, ": the tensor-core kernel takes bf16 inputs (f32 runs on the SIMT kernel)");
        check(aligned, op, ": the tensor-core kernel needs 16-byte aligned q, k, v, out, gradient pointers");
    }
    if constexpr (!std::is_same_v<T, bf16>)
        return false;
    else
        return opt.kernel == AttentionKernel::tensor_core || (opt.kernel == AttentionKernel::automatic && aligned);
}

template <class F>
void with_head_dim(std::int64_t head_dim, F&& f) {
    switch (head_dim) {
        case 32: f(std::integral_constant<int, 32>{}); break;
        case 64: f(std::integral_constant<int, 64>{}); break;
        default: f(std::integral_constant<int, 128>{}); break;  // make_params admits only 32, 64, 128
    }
}

// Launches `kernel` with `smem` bytes of dynamic shared memory; a failure names the kernel and the shape.
template <class... KernelArgs, class... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, std::size_t smem, cudaStream_t stream,
            const char* name, const AttentionShape& shape, Args... args) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    auto fail_if = [&](cudaError_t status, const char* step) {
        if (status != cudaSuccess)
            check(false, "cuda::attention ", name, ": ", step, " failed (", smem, " bytes of shared memory): ",
                  cudaGetErrorString(status), "; ", describe(shape));
    };
    fail_if(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
            "cudaFuncSetAttribute");
    kernel<<<grid, threads, smem, stream>>>(args...);
    fail_if(cudaGetLastError(), "launch");
}

inline unsigned tiles(std::int64_t n) { return static_cast<unsigned>((n + kTile - 1) / kTile); }
inline std::size_t simt_tile_bytes(int dh) { return sizeof(float) * kTile * (dh + 1); }
inline std::size_t mma_tile_bytes(int dh) { return sizeof(bf16) * kTile * (dh + 8); }
inline constexpr std::size_t kSimtPBytes = sizeof(float) * kTile * kPStride;

}  // namespace attention_detail

// out = softmax(scale · Q Kᵀ + mask) V per head, and the row logsumexp for the backward.
// q: [B, T, H, Dh], k, v: [B, S, Hkv, Dh] -> out: [B, T, H, Dh], lse: [B, H, T]
template <class T>
void attention_forward(const AttentionForwardArgs<T>& a, const AttentionShape& s, const AttentionOptions& opt = {},
                       cudaStream_t stream = nullptr) {
    namespace ad = attention_detail;
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, ad::bf16>, "attention_forward: T is float or bf16");
    constexpr const char* op = "cuda::attention_forward";
    const ad::Params p = ad::make_params(op, s, opt);
    if (s.batch == 0 || s.seq_q == 0) return;
    check(a.q && a.k && a.v && a.out && a.lse, op, ": q, k, v, out and lse must all be given; ", ad::describe(s));
    const auto dh_threads = static_cast<int>(s.head_dim);
    if (opt.kernel == AttentionKernel::reference) {
        const dim3 rows(static_cast<unsigned>(s.seq_q), static_cast<unsigned>(s.heads), static_cast<unsigned>(s.batch));
        ad::launch(ad::forward_reference<T>, rows, dh_threads, 0, stream, "forward_reference", s, p, a.q, a.k, a.v,
                   a.out, a.lse);
        return;
    }
    const dim3 grid(ad::tiles(s.seq_q), static_cast<unsigned>(s.heads), static_cast<unsigned>(s.batch));
    const bool tc = ad::use_tensor_cores<T>(op, opt, a.q, a.k, a.v, a.out);
    ad::with_head_dim(s.head_dim, [&](auto dh) {
        constexpr int Dh = decltype(dh)::value;
        if constexpr (std::is_same_v<T, ad::bf16>) {
            if (tc) {
                ad::launch(ad::forward_mma<Dh>, grid, ad::kMmaThreads, 3 * ad::mma_tile_bytes(Dh), stream,
                           "forward_mma", s, p, a.q, a.k, a.v, a.out, a.lse);
                return;
            }
        }
        ad::launch(ad::forward_simt<Dh, T>, grid, ad::kSimtThreads, 3 * ad::simt_tile_bytes(Dh) + ad::kSimtPBytes,
                   stream, "forward_simt", s, p, a.q, a.k, a.v, a.out, a.lse);
    });
}

// Gradients of attention_forward from the forward's out and lse; dq, dk, dv are overwritten (a null
// one is skipped). delta is f32 scratch of [B, H, T].
// grad_out: [B, T, H, Dh] -> dq: [B, T, H, Dh], dk, dv: [B, S, Hkv, Dh]
template <class T>
void attention_backward(const AttentionBackwardArgs<T>& a, const AttentionShape& s, const AttentionOptions& opt = {},
                        cudaStream_t stream = nullptr) {
    namespace ad = attention_detail;
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, ad::bf16>, "attention_backward: T is float or bf16");
    constexpr const char* op = "cuda::attention_backward";
    const ad::Params p = ad::make_params(op, s, opt);
    if (s.batch == 0 || s.seq_k == 0 || (!a.dq && !a.dk && !a.dv)) return;
    check(a.q && a.k && a.v && a.out && a.grad_out && a.lse && a.delta, op,
          ": q, k, v, out, grad_out, lse and delta must all be given; ", ad::describe(s));
    if (opt.kernel == AttentionKernel::reference) {  // needs no delta: each block recomputes its own
        const auto dh_threads = static_cast<int>(s.head_dim);
        const auto batch = static_cast<unsigned>(s.batch);
        const dim3 keys(static_cast<unsigned>(s.seq_k), static_cast<unsigned>(s.kv_heads), batch);
        const dim3 rows(static_cast<unsigned>(s.seq_q), static_cast<unsigned>(s.heads), batch);
        if (a.dk || a.dv)
            ad::launch(ad::dkdv_reference<T>, keys, dh_threads, 0, stream, "dkdv_reference", s, p, a.q, a.k, a.v, a.out,
                       a.grad_out, a.lse, a.dk, a.dv);
        if (a.dq)
            ad::launch(ad::dq_reference<T>, rows, dh_threads, 0, stream, "dq_reference", s, p, a.q, a.k, a.v, a.out,
                       a.grad_out, a.lse, a.dq);
        return;
    }
    const dim3 q_grid(ad::tiles(s.seq_q), static_cast<unsigned>(s.heads), static_cast<unsigned>(s.batch));
    const dim3 kv_grid(ad::tiles(s.seq_k), static_cast<unsigned>(s.kv_heads), static_cast<unsigned>(s.batch));
    const auto rows = static_cast<std::uint64_t>(s.batch * s.seq_q * s.heads);
    const dim3 delta_grid(static_cast<unsigned>((rows + 7) / 8));
    const bool tc = ad::use_tensor_cores<T>(op, opt, a.q, a.k, a.v, a.out, a.grad_out, a.dq ? a.dq : a.q,
                                            a.dk ? a.dk : a.k, a.dv ? a.dv : a.v);
    ad::with_head_dim(s.head_dim, [&](auto dh) {
        constexpr int Dh = decltype(dh)::value;
        ad::launch(ad::row_delta<Dh, T>, delta_grid, 256, 0, stream, "row_delta", s, p, a.out, a.grad_out,
                   a.delta);
        if constexpr (std::is_same_v<T, ad::bf16>) {
            if (tc) {
                const std::size_t tile = ad::mma_tile_bytes(Dh);
                if (a.dk || a.dv)
                    ad::launch(ad::dkdv_mma<Dh>, kv_grid, ad::kMmaThreads, 4 * tile + 2 * ad::kTile * sizeof(float),
                               stream, "dkdv_mma", s, p, a.q, a.k, a.v, a.grad_out, a.lse, a.delta, a.dk, a.dv);
                if (a.dq)
                    ad::launch(ad::dq_mma<Dh>, q_grid, ad::kMmaThreads, 4 * tile, stream, "dq_mma", s, p, a.q,
                               a.k, a.v, a.grad_out, a.lse, a.delta, a.dq);
                return;
            }
        }
        const std::size_t tile = ad::simt_tile_bytes(Dh);
        if (a.dk || a.dv)
            ad::launch(ad::dkdv_simt<Dh, T>, kv_grid, ad::kSimtThreads,
                       4 * tile + ad::kSimtPBytes + 2 * ad::kTile * sizeof(float), stream, "dkdv_simt", s, p,
                       a.q, a.k, a.v, a.grad_out, a.lse, a.delta, a.dk, a.dv);
        if (a.dq)
            ad::launch(ad::dq_simt<Dh, T>, q_grid, ad::kSimtThreads, 4 * tile + ad::kSimtPBytes, stream,
                       "dq_simt", s, p, a.q, a.k, a.v, a.grad_out, a.lse, a.delta, a.dq);
    });
}

}  // namespace mopt::backend::cuda
