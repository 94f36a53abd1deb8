#pragma once
// Rotary position embedding (Su et al., RoFormer, 2021, eq. 34) on the GPU, matching
// mopt/autodiff/ops/rope.hpp: pair i of a head, at position p = start_pos + t, is rotated by
//   angle = p · theta^(−2i/Dh),   (a, b) -> (a cos − b sin, a sin + b cos)
// with pairs (i, i + Dh/2) in the half style (Hugging Face Llama) and (2i, 2i + 1) in the
// interleaved style (llama2.c / Meta). The backward rotates the gradient back by −angle (a
// rotation's transpose is its inverse).
//
// The table [2, seq, Dh/2] (cos, then sin) is built once per sequence length and start position,
// in double like the CPU op (p · freq reaches 1e4+ where a float angle has lost the digits the
// sine needs), and shared by every layer, batch entry and head.
//
// The half style moves 16 bytes per access (V = 4 f32 or 8 bf16 pairs per thread) when half is a
// multiple of V; the interleaved style and odd sizes take one pair per thread.
//
// x, y, dy, dx: f32 or bf16 (math in f32); outputs are overwritten; y may alias x, dx may alias dy.
#include <cuda_runtime.h>

#include <cstdint>

#include "mopt/backend/cuda/common.cuh"

namespace mopt::backend::cuda {

// half: pairs (i, i + Dh/2); interleaved: pairs (2i, 2i + 1) — as autodiff::RopeStyle.
enum class RopeStyle { half, interleaved };

namespace rope_detail {

template <class Real>
__global__ void rope_table_kernel(float* table, std::int64_t seq, int half, int head_dim, Real theta,
                                  std::int64_t start_pos) {
    const std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
    if (idx >= seq * half) return;
    const std::int64_t t = idx / half;
    const int i = static_cast<int>(idx % half);
    const Real inv_freq = pow(theta, Real(-2) * static_cast<Real>(i) / static_cast<Real>(head_dim));
    const Real angle = static_cast<Real>(start_pos + t) * inv_freq;
    table[idx] = static_cast<float>(cos(angle));
    table[seq * half + idx] = static_cast<float>(sin(angle));
}

// One thread per rotation pair. first_step, partner: pair i is (i·first_step, i·first_step + partner).
template <class T>
__global__ void rope_rotate_kernel(const T* x, T* y, const float* table, std::int64_t pairs, std::int64_t seq,
                                   int heads, int half, int first_step, int partner, float sign) {
    const float* cos_t = table;
    const float* sin_t = table + seq * half;
    for (std::int64_t p = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; p < pairs;
         p += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const int i = static_cast<int>(p % half);
        const std::int64_t head_row = p / half;  // (b·seq + t)·heads + h
        const std::int64_t t = (head_row / heads) % seq;
        const std::int64_t a = head_row * (2 * half) + static_cast<std::int64_t>(i) * first_step, b = a + partner;
        const float c = cos_t[t * half + i], s = sign * sin_t[t * half + i];
        const float xa = to_f32(x[a]), xb = to_f32(x[b]);
        y[a] = from_f32<T>(xa * c - xb * s);
        y[b] = from_f32<T>(xa * s + xb * c);
    }
}

// The half style with 16-byte accesses: a unit is V consecutive pairs (i..i+V−1, partners + half)
// of one head row, so the index arithmetic runs once per V pairs. V divides half.
template <int V, class T>
__global__ void rope_half_vec_kernel(const T* x, T* y, const float* table, std::int64_t units, std::int64_t seq,
                                     int heads, int half, float sign) {
    const int half_units = half / V;
    for (std::int64_t u = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; u < units;
         u += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t head_row = u / half_units;  // (b·seq + t)·heads + h
        const int i = static_cast<int>(u - head_row * half_units) * V;
        const std::int64_t t = (head_row / heads) % seq;
        const std::int64_t a = head_row * (2 * half) + i, b = a + half;
        float xa[V], xb[V], c[V], sn[V], ya[V], yb[V];
        load_vec(x + a, xa);
        load_vec(x + b, xb);
#pragma unroll
        for (int k = 0; k < V; k += 4) {
            load_vec(table + t * half + i + k, c + k);
            load_vec(table + (seq + t) * half + i + k, sn + k);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float sk = sign * sn[k];
            ya[k] = xa[k] * c[k] - xb[k] * sk;
            yb[k] = xa[k] * sk + xb[k] * c[k];
        }
        store_vec(y + a, ya);
        store_vec(y + b, yb);
    }
}

inline void check_rope(const char* op, const void* x, const void* y, const float* table, std::int64_t batch,
                       std::int64_t seq, std::int64_t heads, std::int64_t head_dim) {
    check(batch >= 0 && seq >= 0 && heads >= 0 && head_dim > 0 && head_dim % 2 == 0, "cuda::", op,
          ": x must be [batch, seq, heads, head_dim] with an even head_dim, got [", batch, ", ", seq, ", ", heads, ", ",
          head_dim, "]");
    check(heads <= INT_MAX && head_dim <= INT_MAX, "cuda::", op, ": heads or head_dim of [", batch, ", ", seq, ", ",
          heads, ", ", head_dim, "] exceeds 2^31 - 1");
    check(batch * seq * heads == 0 || (x && y && table), "cuda::", op, ": null x, y or table pointer for [", batch,
          ", ", seq, ", ", heads, ", ", head_dim, "]");
}

template <class T>
void rotate(const char* op, const T* x, T* y, const float* table, std::int64_t batch, std::int64_t seq,
            std::int64_t heads, std::int64_t head_dim, RopeStyle style, float sign, cudaStream_t stream) {
    check_rope(op, x, y, table, batch, seq, heads, head_dim);
    const std::int64_t half = head_dim / 2, pairs = batch * seq * heads * half;
    if (pairs == 0) return;
    const bool half_style = style == RopeStyle::half;
    constexpr int V = vec_width<T>;
    if (half_style && half % V == 0 && is_vec_aligned(x) && is_vec_aligned(y) && is_vec_aligned(table)) {
        const std::int64_t units = pairs / V;
        rope_half_vec_kernel<V><<<elementwise_blocks(units), elementwise_threads, 0, stream>>>(
            x, y, table, units, seq, static_cast<int>(heads), static_cast<int>(half), sign);
        check_launch(op, "[", batch, ", ", seq, ", ", heads, ", ", head_dim, "]");
        return;
    }
    rope_rotate_kernel<<<elementwise_blocks(pairs), elementwise_threads, 0, stream>>>(
        x, y, table, pairs, seq, static_cast<int>(heads), static_cast<int>(half), half_style ? 1 : 2,
        half_style ? static_cast<int>(half) : 1, sign);
    check_launch(op, "[", batch, ", ", seq, ", ", heads, ", ", head_dim, "]");
}

}  // namespace rope_detail

// Positions start_pos + t for t < seq -> table: [2, seq, head_dim/2] (cos, then sin)
inline void rope_table(float* table, std::int64_t seq, std::int64_t head_dim, float theta = 10000.0f,
                       std::int64_t start_pos = 0, cudaStream_t stream = nullptr) {
    check(seq >= 0 && head_dim > 0 && head_dim % 2 == 0 && head_dim <= INT_MAX, "cuda::rope_table: seq ", seq,
          " must be >= 0 and head_dim ", head_dim, " positive and even");
    check(theta > 0.0f, "cuda::rope_table: theta must be positive, got ", theta);
    check(start_pos >= 0, "cuda::rope_table: start_pos must be >= 0, got ", start_pos);
    const std::int64_t entries = seq * (head_dim / 2);
    if (entries == 0) return;
    check(table != nullptr, "cuda::rope_table: null table for seq ", seq, ", head_dim ", head_dim);
    rope_detail::rope_table_kernel<double><<<static_cast<unsigned>(ceil_div(entries, 256)), 256, 0, stream>>>(
        table, seq, static_cast<int>(head_dim / 2), static_cast<int>(head_dim), static_cast<double>(theta), start_pos);
    check_launch("rope_table", "[2, ", seq, ", ", head_dim / 2, "]");
}

// x: [batch, seq, heads, head_dim], table: [2, seq, head_dim/2] -> y: [batch, seq, heads, head_dim]
template <DeviceFloat T>
void rope_forward(const T* x, T* y, const float* table, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                  std::int64_t head_dim, RopeStyle style = RopeStyle::half, cudaStream_t stream = nullptr) {
    rope_detail::rotate("rope_forward", x, y, table, batch, seq, heads, head_dim, style, 1.0f, stream);
}

// dy: [batch, seq, heads, head_dim], table: [2, seq, head_dim/2] -> dx: [batch, seq, heads, head_dim]
template <DeviceFloat T>
void rope_backward(const T* dy, T* dx, const float* table, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                   std::int64_t head_dim, RopeStyle style = RopeStyle::half, cudaStream_t stream = nullptr) {
    rope_detail::rotate("rope_backward", dy, dx, table, batch, seq, heads, head_dim, style, -1.0f, stream);
}

}  // namespace mopt::backend::cuda
