#pragma once
// LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the last axis on the GPU,
// forward and backward, matching mopt/autodiff/ops/norm.hpp:
//   layer_norm: y = (x − μ)·rstd ⊙ w + b,  rstd = 1/√(mean((x − μ)²) + eps)   (two-pass variance)
//   rms_norm:   y = x·rstd ⊙ w,            rstd = 1/√(mean(x²) + eps)
// With x̂ = (x − μ)·rstd (μ = 0 for RMSNorm) and ĝ = dy ⊙ w:
//   dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))   (RMSNorm: no mean(ĝ) term)
//   dw = Σ_rows dy ⊙ x̂,  db = Σ_rows dy
//
// Forward: one block per row; the row's statistics are block reductions and the row is read again
// (from L1/L2) to write y. The per-row μ and rstd are saved (f32) for the backward, which
// recomputes x̂ from them rather than storing it.
// Backward: one fused kernel reads x and dy once per row for dx and the weight/bias gradients. The
// column sums over rows would be an atomic storm if every row added into dw; instead each block
// owns a chunk of rows and keeps its partial column sums in shared memory (each thread owns the
// same columns throughout, so no atomics and no barriers), writes them out once, and a second
// small kernel adds the partials of all blocks (deterministic order).
//
// x, y, dy, dx: f32 or bf16 (storage; all math in f32). weight, bias, μ, rstd, dw, db: f32.
// Outputs are overwritten, not accumulated (except by rms_norm_backward_accumulate: dx +=). y may
// alias x and dx may alias dy.
#include <cuda_runtime.h>

#include <cstdint>

#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/common.cuh"

namespace mopt::backend::cuda {

namespace norm_detail {

template <class T>
__global__ void __launch_bounds__(1024)
    rms_norm_forward_kernel(const T* x, const float* weight, T* y, float* rstd, int d, float eps) {
    const std::int64_t offset = static_cast<std::int64_t>(blockIdx.x) * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = to_f32(x[offset + j]);
        ss += v * v;
    }
    const float rs = 1.0f / sqrtf(block_sum(ss) / static_cast<float>(d) + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        y[offset + j] = from_f32<T>(to_f32(x[offset + j]) * rs * weight[j]);
    if (rstd && threadIdx.x == 0) rstd[blockIdx.x] = rs;
}

// The same with 16-byte accesses: thread j owns vectors j, j + blockDim.x, ... of its row (V | d).
template <int V, class T>
__global__ void __launch_bounds__(1024)
    rms_norm_forward_vec_kernel(const T* x, const float* weight, T* y, float* rstd, int d, float eps) {
    const std::int64_t offset = static_cast<std::int64_t>(blockIdx.x) * d;
    float ss = 0.0f;
    for (int j = threadIdx.x * V; j < d; j += blockDim.x * V) {
        float v[V];
        load_vec(x + offset + j, v);
#pragma unroll
        for (int k = 0; k < V; ++k) ss += v[k] * v[k];
    }
    const float rs = 1.0f / sqrtf(block_sum(ss) / static_cast<float>(d) + eps);
    for (int j = threadIdx.x * V; j < d; j += blockDim.x * V) {
        float v[V], w[V];
        load_vec(x + offset + j, v);
#pragma unroll
        for (int k = 0; k < V; k += 4) load_vec(weight + j + k, w + k);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] *= rs * w[k];
        store_vec(y + offset + j, v);
    }
    if (rstd && threadIdx.x == 0) rstd[blockIdx.x] = rs;
}

// RMSNorm's input gradient alone (no weight gradient), one block per row, 16-byte accesses:
// dx = rstd·(ĝ − x̂·mean(ĝ ⊙ x̂)), ĝ = dy ⊙ w, added to dx when accumulate.
template <int V, class T>
__global__ void __launch_bounds__(1024) rms_norm_backward_vec_kernel(const T* x, const float* weight,
                                                                     const float* rstd, const T* dy, T* dx, int d,
                                                                     bool accumulate) {
    const std::int64_t offset = static_cast<std::int64_t>(blockIdx.x) * d;
    const float rs = rstd[blockIdx.x];
    float s_gx = 0.0f;
    for (int j = threadIdx.x * V; j < d; j += blockDim.x * V) {
        float xv[V], g[V], w[V];
        load_vec(x + offset + j, xv);
        load_vec(dy + offset + j, g);
#pragma unroll
        for (int k = 0; k < V; k += 4) load_vec(weight + j + k, w + k);
#pragma unroll
        for (int k = 0; k < V; ++k) s_gx += g[k] * w[k] * xv[k] * rs;
    }
    const float mean_gx = block_sum(s_gx) / static_cast<float>(d);
    for (int j = threadIdx.x * V; j < d; j += blockDim.x * V) {
        float xv[V], g[V], w[V], out[V];
        load_vec(x + offset + j, xv);
        load_vec(dy + offset + j, g);
#pragma unroll
        for (int k = 0; k < V; k += 4) load_vec(weight + j + k, w + k);
        if (accumulate) load_vec(dx + offset + j, out);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float v = rs * (g[k] * w[k] - xv[k] * rs * mean_gx);
            out[k] = accumulate ? out[k] + v : v;
        }
        store_vec(dx + offset + j, out);
    }
}

// Threads for one block per row of d values taken V at a time: whole warps, one vector each.
[[nodiscard]] inline int vec_row_threads(std::int64_t d, int v) {
    return static_cast<int>(std::clamp<std::int64_t>(ceil_div(ceil_div(d, v), 32) * 32, 32, 1024));
}

template <class T>
__global__ void __launch_bounds__(1024) layer_norm_forward_kernel(const T* x, const float* weight, const float* bias,
                                                                  T* y, float* mean, float* rstd, int d, float eps) {
    const std::int64_t offset = static_cast<std::int64_t>(blockIdx.x) * d;
    // Two passes (mean, then centred squares), as the CPU op: E[x²] − E[x]² cancels when |μ| ≫ σ.
    float s = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += to_f32(x[offset + j]);
    const float mu = block_sum(s) / static_cast<float>(d);
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = to_f32(x[offset + j]) - mu;
        ss += v * v;
    }
    const float rs = 1.0f / sqrtf(block_sum(ss) / static_cast<float>(d) + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = (to_f32(x[offset + j]) - mu) * rs * weight[j];
        y[offset + j] = from_f32<T>(bias ? v + bias[j] : v);
    }
    if (threadIdx.x == 0) {
        if (mean) mean[blockIdx.x] = mu;
        if (rstd) rstd[blockIdx.x] = rs;
    }
}

// Block b handles rows [b·rows_per_block, (b+1)·rows_per_block). partial_w / partial_b: [blocks, d]
// or null when that gradient is not wanted; dx null when the input gradient is not wanted.
template <class T, bool Centred>
__global__ void __launch_bounds__(512)
    norm_backward_kernel(const T* x, const float* weight, const float* mean, const float* rstd, const T* dy, T* dx,
                         float* partial_w, float* partial_b, int rows, int d, int rows_per_block, bool accumulate) {
    extern __shared__ float norm_column_sums[];  // [d] weight sums, then [d] bias sums
    float* sum_w = partial_w ? norm_column_sums : nullptr;
    float* sum_b = partial_b ? norm_column_sums + (partial_w ? d : 0) : nullptr;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (sum_w) sum_w[j] = 0.0f;
        if (sum_b) sum_b[j] = 0.0f;
    }
    const int r0 = static_cast<int>(blockIdx.x) * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    for (int r = r0; r < r1; ++r) {
        const std::int64_t offset = static_cast<std::int64_t>(r) * d;
        const float mu = Centred ? mean[r] : 0.0f, rs = rstd[r];
        float s_g = 0.0f, s_gx = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float xh = (to_f32(x[offset + j]) - mu) * rs;
            const float g = to_f32(dy[offset + j]);
            const float gh = g * weight[j];
            s_g += gh;
            s_gx += gh * xh;
            if (sum_w) sum_w[j] += g * xh;
            if (sum_b) sum_b[j] += g;
        }
        if (!dx) continue;  // uniform over the block: the reductions below are reached by all or none
        const float mean_gx = block_sum(s_gx) / static_cast<float>(d);
        const float mean_g = Centred ? block_sum(s_g) / static_cast<float>(d) : 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float xh = (to_f32(x[offset + j]) - mu) * rs;
            const float gh = to_f32(dy[offset + j]) * weight[j];
            const float v = rs * (gh - mean_g - xh * mean_gx);
            dx[offset + j] = from_f32<T>(accumulate ? to_f32(dx[offset + j]) + v : v);
        }
    }
    const std::int64_t out = static_cast<std::int64_t>(blockIdx.x) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (partial_w) partial_w[out + j] = sum_w[j];
        if (partial_b) partial_b[out + j] = sum_b[j];
    }
}

// out[j] = Σ_p partial[p, j]. partial: [parts, d] -> out: [d]
template <class V>
__global__ void sum_partials_kernel(const V* partial, V* out, int parts, int d) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    V s = 0;
    for (int p = 0; p < parts; ++p) s += partial[static_cast<std::int64_t>(p) * d + j];
    out[j] = s;
}

inline void check_norm(const char* op, const void* x, const float* weight, const void* y, std::int64_t rows,
                       std::int64_t d) {
    check_row_extents(op, rows, d);
    check(rows == 0 || (x && weight && y), "cuda::", op, ": null input, weight or output pointer for x of shape [",
          rows, ", ", d, "]");
}

template <class T, bool Centred>
void norm_backward(const char* op, const T* x, const float* weight, const float* mean, const float* rstd, const T* dy,
                   T* dx, float* dweight, float* dbias, std::int64_t rows, std::int64_t d, cudaStream_t stream,
                   bool accumulate = false) {
    check_norm(op, x, weight, dy, rows, d);
    check(!accumulate || (dx && dx != dy), "cuda::", op, ": accumulating into dx needs a dx that is not dy");
    check(rows == 0 || (rstd && (!Centred || mean)), "cuda::", op, ": the saved per-row statistics of [", rows, ", ", d,
          "] are null");
    if (rows == 0) {  // no rows: zero parameter gradients
        if (dweight) check_cuda(cudaMemsetAsync(dweight, 0, d * sizeof(float), stream), "cudaMemsetAsync (dweight)");
        if (dbias) check_cuda(cudaMemsetAsync(dbias, 0, d * sizeof(float), stream), "cudaMemsetAsync (dbias)");
        return;
    }
    if (!dx && !dweight && !dbias) return;
    constexpr int V = vec_width<T>;
    if (!Centred && dx && !dweight && !dbias && d % V == 0 && is_vec_aligned(x) && is_vec_aligned(dy) &&
        is_vec_aligned(dx) && is_vec_aligned(weight)) {
        // dx may alias dy: each thread reads its own vectors of dy before writing them, and no other
        // thread touches them
        rms_norm_backward_vec_kernel<V><<<static_cast<unsigned>(rows), vec_row_threads(d, V), 0, stream>>>(
            x, weight, rstd, dy, dx, static_cast<int>(d), accumulate);
        check_launch(op, "backward [", rows, ", ", d, "]");
        return;
    }
    const bool params = dweight || dbias;
    // With parameter gradients, about two blocks per SM, each over a chunk of rows (fewer partial
    // rows to add); without, one block per row.
    const std::int64_t wanted_blocks = params ? std::min<std::int64_t>(rows, 2 * sm_count()) : rows;
    const std::int64_t rows_per_block = ceil_div(rows, wanted_blocks);
    const std::int64_t blocks = ceil_div(rows, rows_per_block);
    const std::size_t smem = static_cast<std::size_t>(d) * sizeof(float) * ((dweight ? 1 : 0) + (dbias ? 1 : 0));
    auto kernel = &norm_backward_kernel<T, Centred>;
    if (smem > 48 * 1024) {  // beyond the default limit a kernel must opt in to more shared memory
        int device = 0, optin = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice");
        check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                   "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
        check(smem + 32 * sizeof(float) <= static_cast<std::size_t>(optin), "cuda::", op, ": the row length d = ", d,
              " needs ", smem, " bytes of shared memory for the parameter gradients; this device allows ", optin);
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                   "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    }
    DeviceArray<float> partial_w(dweight ? static_cast<std::size_t>(blocks * d) : 0, stream);
    DeviceArray<float> partial_b(dbias ? static_cast<std::size_t>(blocks * d) : 0, stream);
    kernel<<<static_cast<unsigned>(blocks), row_threads(d, 512), smem, stream>>>(
        x, weight, mean, rstd, dy, dx, partial_w.data(), partial_b.data(), static_cast<int>(rows), static_cast<int>(d),
        static_cast<int>(rows_per_block), accumulate);
    check_launch(op, "backward [", rows, ", ", d, "]");
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(d, 256));
    if (dweight)
        sum_partials_kernel<<<col_blocks, 256, 0, stream>>>(partial_w.data(), dweight, static_cast<int>(blocks),
                                                            static_cast<int>(d));
    if (dbias)
        sum_partials_kernel<<<col_blocks, 256, 0, stream>>>(partial_b.data(), dbias, static_cast<int>(blocks),
                                                            static_cast<int>(d));
    check_launch(op, "parameter-gradient sum [", blocks, ", ", d, "]");
}

}  // namespace norm_detail

// x: [rows, d], weight: [d] -> y: [rows, d], rstd: [rows] (nullptr: not saved)
template <DeviceFloat T>
void rms_norm_forward(const T* x, const float* weight, T* y, float* rstd, std::int64_t rows, std::int64_t d,
                      float eps = 1e-5f, cudaStream_t stream = nullptr) {
    norm_detail::check_norm("rms_norm_forward", x, weight, y, rows, d);
    check(eps >= 0.0f, "cuda::rms_norm_forward: eps must be non-negative, got ", eps);
    if (rows == 0) return;
    constexpr int V = vec_width<T>;
    if (d % V == 0 && is_vec_aligned(x) && is_vec_aligned(y) && is_vec_aligned(weight))
        norm_detail::rms_norm_forward_vec_kernel<V><<<static_cast<unsigned>(rows), norm_detail::vec_row_threads(d, V), 0,
                                                      stream>>>(x, weight, y, rstd, static_cast<int>(d), eps);
    else
        norm_detail::rms_norm_forward_kernel<<<static_cast<unsigned>(rows), row_threads(d), 0, stream>>>(
            x, weight, y, rstd, static_cast<int>(d), eps);
    check_launch("rms_norm_forward", "[", rows, ", ", d, "]");
}

// x, dy: [rows, d], weight: [d], rstd: [rows] (from the forward) -> dx: [rows, d], dweight: [d]
// (either may be nullptr when not wanted)
template <DeviceFloat T>
void rms_norm_backward(const T* x, const float* weight, const float* rstd, const T* dy, T* dx, float* dweight,
                       std::int64_t rows, std::int64_t d, cudaStream_t stream = nullptr) {
    norm_detail::norm_backward<T, false>("rms_norm_backward", x, weight, nullptr, rstd, dy, dx, dweight, nullptr, rows,
                                         d, stream);
}

// dx += the input gradient (the residual stream's gradient gathers the norm's branch in the same
// pass). dx must not alias dy. dweight (nullptr: not wanted) is overwritten.
template <DeviceFloat T>
void rms_norm_backward_accumulate(const T* x, const float* weight, const float* rstd, const T* dy, T* dx,
                                  std::int64_t rows, std::int64_t d, cudaStream_t stream = nullptr,
                                  float* dweight = nullptr) {
    norm_detail::norm_backward<T, false>("rms_norm_backward_accumulate", x, weight, nullptr, rstd, dy, dx, dweight,
                                         nullptr, rows, d, stream, true);
}

// x: [rows, d], weight: [d], bias: [d] (nullptr: none) -> y: [rows, d], mean: [rows], rstd: [rows]
// (mean and rstd nullptr: not saved)
template <DeviceFloat T>
void layer_norm_forward(const T* x, const float* weight, const float* bias, T* y, float* mean, float* rstd,
                        std::int64_t rows, std::int64_t d, float eps = 1e-5f, cudaStream_t stream = nullptr) {
    norm_detail::check_norm("layer_norm_forward", x, weight, y, rows, d);
    check(eps >= 0.0f, "cuda::layer_norm_forward: eps must be non-negative, got ", eps);
    if (rows == 0) return;
    norm_detail::layer_norm_forward_kernel<<<static_cast<unsigned>(rows), row_threads(d), 0, stream>>>(
        x, weight, bias, y, mean, rstd, static_cast<int>(d), eps);
    check_launch("layer_norm_forward", "[", rows, ", ", d, "]");
}

// x, dy: [rows, d], weight: [d], mean, rstd: [rows] (from the forward)
//   -> dx: [rows, d], dweight: [d], dbias: [d] (each may be nullptr when not wanted)
template <DeviceFloat T>
void layer_norm_backward(const T* x, const float* weight, const float* mean, const float* rstd, const T* dy, T* dx,
                         float* dweight, float* dbias, std::int64_t rows, std::int64_t d,
                         cudaStream_t stream = nullptr) {
    norm_detail::norm_backward<T, true>("layer_norm_backward", x, weight, mean, rstd, dy, dx, dweight, dbias, rows, d,
                                        stream);
}

}  // namespace mopt::backend::cuda
