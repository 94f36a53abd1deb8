#pragma once
// What every CUDA kernel family of the backend shares: the element types a kernel stores
// (f32, bf16) and their conversions, warp and block reductions, and launch-size helpers.
//
// Storage may be bf16, arithmetic is always f32: a kernel loads with to_f32, computes, and stores
// with from_f32 (round to nearest even), so bf16 costs one rounding per stored value and nothing
// inside a reduction.
//
// Reductions assume blockDim.x is a multiple of 32 and that every thread of the block calls them
// (full-mask shuffles); the launch helpers below only produce such blocks.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <concepts>
#include <cstdint>

#include "mopt/backend/cuda/device.cuh"

namespace mopt::backend::cuda {

// The activation storage types the kernels are instantiated for.
template <class T>
concept DeviceFloat = std::same_as<T, float> || std::same_as<T, __nv_bfloat16>;

__host__ __device__ inline float to_f32(float v) { return v; }
__host__ __device__ inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__host__ __device__ inline T from_f32(float v);
template <>
__host__ __device__ inline float from_f32<float>(float v) { return v; }
template <>
__host__ __device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

inline constexpr unsigned full_warp_mask = 0xffffffffu;

template <class V>
__device__ inline V warp_sum(V v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(full_warp_mask, v, offset);
    return v;
}

// Sum over the block; every thread gets the total. Safe to call repeatedly in one kernel: the
// leading barrier keeps a new call from overwriting the slots before the last one was read.
template <class V>
__device__ inline V block_sum(V v) {
    __shared__ V warp_totals[32];
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    const int warps = static_cast<int>(blockDim.x) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) warp_totals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = warp_sum(lane < warps ? warp_totals[lane] : V(0));
        if (lane == 0) warp_totals[0] = v;
    }
    __syncthreads();
    return warp_totals[0];
}

// 16-byte vectors: memory-bound kernels move vec_width<T> values (f32: 4, bf16: 8) per load and
// store, the widest access a thread has. p must be 16-byte aligned (the caller checks is_vec_aligned).
template <class T>
inline constexpr int vec_width = 16 / static_cast<int>(sizeof(T));

template <class T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    if constexpr (std::same_as<T, float>) {
        out[0] = __uint_as_float(raw.x);
        out[1] = __uint_as_float(raw.y);
        out[2] = __uint_as_float(raw.z);
        out[3] = __uint_as_float(raw.w);
    } else {
        const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const float2 f = __bfloat1622float2(h[k]);
            out[2 * k] = f.x;
            out[2 * k + 1] = f.y;
        }
    }
}

template <class T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
    uint4 raw;
    if constexpr (std::same_as<T, float>) {
        raw = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
    } else {
        auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
        for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(in[2 * k], in[2 * k + 1]);
    }
    *reinterpret_cast<uint4*>(p) = raw;
}

// V values per access: 1 (scalar) or vec_width<T> (one 16-byte load or store).
template <int V, class T>
__device__ __forceinline__ void load_values(const T* p, float* out) {
    if constexpr (V == 1) out[0] = to_f32(*p);
    else load_vec(p, out);
}
template <int V, class T>
__device__ __forceinline__ void store_values(T* p, const float* in) {
    if constexpr (V == 1) *p = from_f32<T>(in[0]);
    else store_vec(p, in);
}

[[nodiscard]] inline bool is_vec_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

[[nodiscard]] constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Threads for a kernel that gives one block to each row of `cols` values: about four values per
// thread, a whole number of warps, between one warp and 1024 threads.
[[nodiscard]] inline int row_threads(std::int64_t cols, int max_threads = 1024) {
    const std::int64_t warps = ceil_div(ceil_div(std::max<std::int64_t>(cols, 1), 4), 32);
    return static_cast<int>(std::clamp<std::int64_t>(warps * 32, 32, max_threads));
}

// Streaming multiprocessors of the current device.
[[nodiscard]] inline int sm_count() {
    int device = 0, sms = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    return sms;
}

// Blocks for a grid-stride element-wise kernel of 256 threads: enough to fill every SM several
// times over, never more than the elements need.
inline constexpr int elementwise_threads = 256;
[[nodiscard]] inline int elementwise_blocks(std::int64_t n) {
    const std::int64_t needed = std::max<std::int64_t>(ceil_div(n, elementwise_threads), 1);
    return static_cast<int>(std::min<std::int64_t>(needed, static_cast<std::int64_t>(sm_count()) * 16));
}

// Throws naming the op and its shape when the launch just issued failed (bad configuration,
// too much shared memory, an earlier asynchronous fault surfacing here).
template <class... Parts>
void check_launch(const char* op, const Parts&... shape) {
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
        check(false, "cuda::", op, " ", shape..., ": kernel launch failed: ", cudaGetErrorString(status));
}

// Rows go to gridDim.x and a row's columns are indexed by int inside the kernels.
inline void check_row_extents(const char* op, std::int64_t rows, std::int64_t cols) {
    check(rows >= 0 && cols > 0, "cuda::", op, ": rows must be >= 0 and the row length > 0, got [", rows, ", ", cols,
          "]");
    check(rows <= INT_MAX && cols <= INT_MAX, "cuda::", op, ": shape [", rows, ", ", cols,
          "] exceeds the 2^31 - 1 rows / columns a launch indexes");
}

}  // namespace mopt::backend::cuda
