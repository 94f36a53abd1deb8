#pragma once
// GEMMs that read mopt's packed compressed weights (compress/packed_quant.hpp, packed_nm.hpp)
// straight from their packed form on the GPU — the products of compress/packed_weight.hpp's
// matmul / matmul_backward (autodiff/ops/packed_linear.hpp):
//
//   packed_matmul:          y[rows, out] = x[rows, in] · Ŵᵀ    (+ beta · y)
//   packed_matmul_backward: dx[rows, in] = dy[rows, out] · Ŵ   (+ beta · dx)   (Ŵ frozen: no dŴ)
//
// x, y, dy, dx: row-major, f32 or bf16 (T); products and sums in f32, one rounding on the store.
// beta == 0 overwrites the output (NaN in it does not survive), beta == 1 accumulates as the CPU
// backward does (dx += dy Ŵ).
//
// Device layout (DevicePackedWeight, uploaded once from a host compress::PackedWeight, buffers
// copied verbatim, so the bit layout is the CPU's):
//   int<b> (PackedQuant, b = 2..8): qweight [out, words_per_row] uint32, floor(32/b) codes a word,
//       lowest bits first, rows padded to whole words; scales, zeros [out, in / group] f32;
//       LLM.int8() outliers [out, n_outliers] f32 plus an int32 slot map [in] (slot[c] = k when
//       column c is outlier column k, else −1) built at upload so a kernel finds a column's outlier
//       in O(1). ŵ[o, c] = scale · (q − zero) (+ outliers[o, slot[c]]), rounded exactly as
//       PackedQuant::dequantize_rows (__fmul_rn / __fadd_rn: no FMA contraction), so in f32 the
//       GPU uses the very weights the CPU reference uses.
//   nm<N>:<M> (PackedNM): values [out, (in / M) · K] f32 (K = M − N kept a group) and indices
//       [out, index_words_per_row] uint32 of index_bits-bit in-group positions, packed as above.
//   CSR (PackedSparse) is not supported here (refused at upload).
//
// Algorithm: one tiled SIMT kernel for both products, C[M, N] = A[M, K] · B[K, N] with
//   forward:  A = x,  K = in,  N = out, B[k, n] = Ŵ[n, k]
//   backward: A = dy, K = out, N = in,  B[k, n] = Ŵ[k, n]
// A block of 256 threads owns a 64 × 64 tile of C (4 × 4 values a thread, strided by 16 so that
// shared-memory reads are conflict-free) and walks K in steps of 32: it loads the 64 × 32 tile of A
// (T → f32) and dequantises the 32 × 64 tile of Ŵ from its packed words into shared memory
// (consecutive threads take consecutive input columns of one weight row, so they read the same or
// neighbouring packed words: coalesced, and a code word is fetched once per tile instead of 4-16
// dense values), then runs 32 rank-1 updates with f32 FMAs. N:M tiles are zeroed and the kept
// values scattered to their positions (work ∝ kept entries of the groups overlapping the tile).
// Each weight tile is read once per 64 rows of A, from its packed form: 4× (int8) to ~7× (int4
// g128) less weight traffic than bf16-dense, 8× to 14× less than f32. The SIMT FMAs (no tensor
// cores) bound large-batch throughput well below cuBLAS bf16; the kernel's aim is correctness with
// reasonable speed, and a memory-bound small-rows product (decoding, prompt tuning with few rows)
// gains most from the packed reads.
//
// Few rows (at most 8, the forward of int<b> weights: decoding, small batches) take a second kernel,
// packed_gemv_kernel: warps over output rows, x staged in shared memory (see there).
//
// Code widths 8, 4, 3 and 2 are compile-time (shifts and divisions by constants); 5, 6 and 7 take
// a generic runtime-width path. Group sizes: any that divides `in` (PackedQuant's invariant),
// "whole row" (group = in) included.
//
// Errors (mopt::check) name the op and the shapes: a row length that does not match the weight,
// negative rows, null or aliased pointers, more rows than a launch can index, an empty weight.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/common.cuh"
#include "mopt/compress/packed_nm.hpp"
#include "mopt/compress/packed_quant.hpp"
#include "mopt/compress/packed_weight.hpp"
#include "mopt/error.hpp"

namespace mopt::backend::cuda {

enum class PackedFormat { none, quant, nm };

// What a kernel reads: plain pointers and extents (passed by value to the launch).
struct PackedWeightView {
    PackedFormat format = PackedFormat::none;
    int out = 0, in = 0;
    // PackedQuant
    int bits = 0, codes_per_word = 0, words_per_row = 0;
    int group = 0, groups_per_row = 0;
    const std::uint32_t* qweight = nullptr;
    const float* scales = nullptr;
    const float* zeros = nullptr;
    int num_outliers = 0;
    const std::int32_t* outlier_slot = nullptr;  // [in]: outlier column index or -1
    const float* outliers = nullptr;             // [out, num_outliers]
    // PackedNM
    int m = 0, kept = 0, index_bits = 0, indices_per_word = 0, kept_per_row = 0, index_words_per_row = 0;
    const float* values = nullptr;
    const std::uint32_t* indices = nullptr;
};

// A packed weight on the device. Move-only (owns DeviceArrays).
class DevicePackedWeight {
public:
    DevicePackedWeight() = default;

    static DevicePackedWeight upload(const compress::PackedQuant& q) {
        q.validate("cuda::DevicePackedWeight::upload (int" + std::to_string(q.bits) + ")");
        check_extents(q.out, q.in);
        DevicePackedWeight d;
        d.format_ = "int" + std::to_string(q.bits);
        auto& v = d.view_;
        v.format = PackedFormat::quant;
        v.out = static_cast<int>(q.out);
        v.in = static_cast<int>(q.in);
        v.bits = q.bits;
        v.codes_per_word = 32 / q.bits;
        v.words_per_row = static_cast<int>(q.words_per_row());
        v.group = static_cast<int>(q.group);
        v.groups_per_row = static_cast<int>(q.groups_per_row());
        v.qweight = put(d.words_, q.qweight);
        v.scales = put(d.scales_, q.scales);
        v.zeros = put(d.zeros_, q.zeros);
        v.num_outliers = static_cast<int>(q.num_outliers());
        if (v.num_outliers > 0) {
            std::vector<std::int32_t> slot(static_cast<std::size_t>(q.in), -1);
            for (std::size_t k = 0; k < q.outlier_cols.size(); ++k)
                slot[static_cast<std::size_t>(q.outlier_cols[k])] = static_cast<std::int32_t>(k);
            v.outlier_slot = put(d.slots_, slot);
            v.outliers = put(d.values_, q.outliers);
        }
        d.bytes_ = q.bytes() + (v.num_outliers > 0 ? 4 * static_cast<std::size_t>(q.in) : 0);
        return d;
    }

    static DevicePackedWeight upload(const compress::PackedNM& p) {
        p.validate("cuda::DevicePackedWeight::upload (nm" + std::to_string(p.n) + ":" + std::to_string(p.m) + ")");
        check_extents(p.out, p.in);
        DevicePackedWeight d;
        d.format_ = "nm" + std::to_string(p.n) + ":" + std::to_string(p.m);
        auto& v = d.view_;
        v.format = PackedFormat::nm;
        v.out = static_cast<int>(p.out);
        v.in = static_cast<int>(p.in);
        v.m = p.m;
        v.kept = p.kept();
        v.index_bits = p.index_bits();
        v.indices_per_word = 32 / p.index_bits();
        v.kept_per_row = static_cast<int>(p.kept_per_row());
        v.index_words_per_row = static_cast<int>(p.index_words_per_row());
        v.values = put(d.values_, p.values);
        v.indices = put(d.words_, p.indices);
        d.bytes_ = p.bytes();
        return d;
    }

    // int<b> and N:M weights; CSR is refused with an error naming the format.
    static DevicePackedWeight upload(const compress::PackedWeight& w) {
        if (const auto* q = std::get_if<compress::PackedQuant>(&w.storage())) return upload(*q);
        if (const auto* p = std::get_if<compress::PackedNM>(&w.storage())) return upload(*p);
        check(false, "cuda::DevicePackedWeight::upload: the ", w.format(), " weight [", w.out(), ", ", w.in(),
              "] has no GPU kernel (int2..int8 and N:M are supported; CSR is not)");
        return {};
    }

    [[nodiscard]] const PackedWeightView& view() const { return view_; }
    [[nodiscard]] bool empty() const { return view_.format == PackedFormat::none; }
    [[nodiscard]] std::int64_t out() const { return view_.out; }
    [[nodiscard]] std::int64_t in() const { return view_.in; }
    [[nodiscard]] const std::string& format() const { return format_; }  // "int4", "nm2:4", ...
    [[nodiscard]] std::size_t bytes() const { return bytes_; }           // device bytes of the buffers

private:
    static void check_extents(std::int64_t out, std::int64_t in) {
        check(out <= INT_MAX && in <= INT_MAX, "cuda::DevicePackedWeight::upload: weight [", out, ", ", in,
              "] exceeds the 2^31 - 1 rows / columns a kernel indexes");
    }
    template <class V>
    static const V* put(DeviceArray<V>& dst, const std::vector<V>& src) {
        dst = DeviceArray<V>(src.size());
        dst.upload(src);
        return dst.data();
    }

    PackedWeightView view_;
    std::string format_;
    std::size_t bytes_ = 0;
    DeviceArray<std::uint32_t> words_;  // qweight or N:M indices
    DeviceArray<float> scales_, zeros_, values_;  // values_: outliers or N:M values
    DeviceArray<std::int32_t> slots_;
};

namespace packed_gemm_detail {

inline constexpr int tile_m = 64, tile_n = 64, tile_k = 32, threads = 256;
inline constexpr int kernel_nm = -1;  // the kernels' format parameter: bits (8, 4, 3, 2), 0 = any width, or N:M

// ŵ[o, c] of a quantised weight; B > 0 is the code width at compile time, 0 reads it from v.
template <int B>
__device__ __forceinline__ float quant_value(const PackedWeightView& v, int o, int c) {
    int bits = B, per = B > 0 ? 32 / (B > 0 ? B : 1) : 0;
    if constexpr (B == 0) {
        bits = v.bits;
        per = v.codes_per_word;
    }
    const std::uint32_t word = v.qweight[static_cast<std::int64_t>(o) * v.words_per_row + c / per];
    const float q = static_cast<float>((word >> ((c % per) * bits)) & ((1u << bits) - 1u));
    const std::int64_t g = static_cast<std::int64_t>(o) * v.groups_per_row + c / v.group;
    float w = __fmul_rn(v.scales[g], q - v.zeros[g]);  // q − zero: small integers, exact
    if (v.num_outliers > 0) {
        const int k = v.outlier_slot[c];
        if (k >= 0) w = __fadd_rn(w, v.outliers[static_cast<std::int64_t>(o) * v.num_outliers + k]);
    }
    return w;
}

// dst[ol·so + cl·sc] = ŵ[o0 + ol, c0 + cl] for ol < TO, cl < TC; 0 outside the matrix. Every thread
// of the block calls it (the N:M path has a barrier); the caller syncs before reading dst.
template <int F, int TO, int TC>
__device__ __forceinline__ void fill_weight_tile(const PackedWeightView& v, int o0, int c0, float* dst, int so, int sc) {
    if constexpr (F != kernel_nm) {
        for (int e = static_cast<int>(threadIdx.x); e < TO * TC; e += threads) {
            const int ol = e / TC, cl = e % TC, o = o0 + ol, c = c0 + cl;
            dst[ol * so + cl * sc] = (o < v.out && c < v.in) ? quant_value<F>(v, o, c) : 0.0f;
        }
    } else {
        for (int e = static_cast<int>(threadIdx.x); e < TO * TC; e += threads) dst[(e / TC) * so + (e % TC) * sc] = 0.0f;
        __syncthreads();
        if (c0 >= v.in) return;
        const int c_last = (c0 + TC < v.in ? c0 + TC : v.in) - 1;
        const int g0 = c0 / v.m, slots = (c_last / v.m - g0 + 1) * v.kept;  // kept entries of the groups touched
        const std::uint32_t mask = (1u << v.index_bits) - 1u;
        for (int e = static_cast<int>(threadIdx.x); e < TO * slots; e += threads) {
            const int ol = e / slots, o = o0 + ol;
            if (o >= v.out) continue;
            const int j = g0 * v.kept + e % slots;  // slot in the row
            const std::uint32_t word = v.indices[static_cast<std::int64_t>(o) * v.index_words_per_row + j / v.indices_per_word];
            const int idx = static_cast<int>((word >> ((j % v.indices_per_word) * v.index_bits)) & mask);
            const int c = (j / v.kept) * v.m + idx;
            if (c >= c0 && c <= c_last) dst[ol * so + (c - c0) * sc] = v.values[static_cast<std::int64_t>(o) * v.kept_per_row + j];
        }
    }
}

// C[M, N] = A[M, K] · B[K, N] (+ beta · C); see the header comment for A, B and the tiling.
template <class T, int F, bool Backward>
__global__ void __launch_bounds__(threads) packed_gemm_kernel(PackedWeightView v, const T* __restrict__ a, int rows,
                                                              T* __restrict__ c, float beta) {
    const int K = Backward ? v.out : v.in, N = Backward ? v.in : v.out;
    __shared__ float As[tile_k][tile_m + 1];  // As[k][m] = A[m0 + m, k0 + k]
    __shared__ float Bs[tile_k][tile_n + 1];  // Bs[k][n] = B[k0 + k, n0 + n]
    const int n0 = static_cast<int>(blockIdx.x) * tile_n, m0 = static_cast<int>(blockIdx.y) * tile_m;
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += tile_k) {
        for (int e = static_cast<int>(threadIdx.x); e < tile_m * tile_k; e += threads) {
            const int i = e / tile_k, kk = e % tile_k, r = m0 + i, k = k0 + kk;
            As[kk][i] = (r < rows && k < K) ? to_f32(a[static_cast<std::int64_t>(r) * K + k]) : 0.0f;
        }
        if constexpr (!Backward)
            fill_weight_tile<F, tile_n, tile_k>(v, n0, k0, &Bs[0][0], 1, tile_n + 1);  // Bs[c][o] = ŵ[o, c]
        else
            fill_weight_tile<F, tile_k, tile_n>(v, k0, n0, &Bs[0][0], tile_n + 1, 1);  // Bs[o][c] = ŵ[o, c]
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < tile_k; ++kk) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = m0 + ty + 16 * i;
        if (r >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n >= N) continue;
            T& out = c[static_cast<std::int64_t>(r) * N + n];
            float val = acc[i][j];
            if (beta != 0.0f) val += beta * to_f32(out);
            out = from_f32<T>(val);
        }
    }
}

// Few rows (decoding, small batches; forward of int<b> weights): y[r, o] = Σ_c x[r, c] ŵ[o, c] for
// rows <= R. Each warp owns gemv_outputs_per_warp outputs and its lanes consecutive columns, so a
// warp reads a few neighbouring packed words at a time and conflict-free shared memory; x is staged
// in shared memory (f32) in chunks of gemv_chunk columns, shared by the block's outputs; the weight is
// read once, packed. The grid covers `out` only, so unlike the tiled kernel it does not leave the
// GPU idle when rows are few.
inline constexpr int gemv_max_rows = 8, gemv_chunk = 1024, gemv_outputs_per_warp = 4;

template <class T, int F, int R>
__global__ void __launch_bounds__(threads) packed_gemv_kernel(PackedWeightView v, const T* __restrict__ x, int rows,
                                                              T* __restrict__ y, float beta) {
    __shared__ float xs[R * gemv_chunk];
    const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
    const int o_first = (static_cast<int>(blockIdx.x) * (threads / 32) + warp) * gemv_outputs_per_warp;
    float acc[gemv_outputs_per_warp][R];
#pragma unroll
    for (int i = 0; i < gemv_outputs_per_warp; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
    for (int k0 = 0; k0 < v.in; k0 += gemv_chunk) {
        const int kc = v.in - k0 < gemv_chunk ? v.in - k0 : gemv_chunk;
        __syncthreads();
        for (int e = static_cast<int>(threadIdx.x); e < R * gemv_chunk; e += threads) {
            const int r = e / gemv_chunk, cl = e % gemv_chunk;
            xs[e] = (r < rows && cl < kc) ? to_f32(x[static_cast<std::int64_t>(r) * v.in + k0 + cl]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < gemv_outputs_per_warp; ++i) {
            const int o = o_first + i;
            if (o >= v.out) continue;  // uniform over the warp
            for (int cl = lane; cl < kc; cl += 32) {
                const float w = quant_value<F>(v, o, k0 + cl);
#pragma unroll
                for (int r = 0; r < R; ++r) acc[i][r] = fmaf(w, xs[r * gemv_chunk + cl], acc[i][r]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < gemv_outputs_per_warp; ++i) {
        const int o = o_first + i;
        if (o >= v.out) continue;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r >= rows) continue;  // uniform over the warp
            const float sum = warp_sum(acc[i][r]);
            if (lane != 0) continue;
            T& out = y[static_cast<std::int64_t>(r) * v.out + o];
            float val = sum;
            if (beta != 0.0f) val += beta * to_f32(out);
            out = from_f32<T>(val);
        }
    }
}

template <class T, int F>
void launch_gemv(const PackedWeightView& v, const T* x, int rows, T* y, float beta, cudaStream_t stream) {
    const unsigned grid = static_cast<unsigned>(ceil_div(v.out, (threads / 32) * gemv_outputs_per_warp));
    if (rows == 1) packed_gemv_kernel<T, F, 1><<<grid, threads, 0, stream>>>(v, x, rows, y, beta);
    else if (rows <= 4) packed_gemv_kernel<T, F, 4><<<grid, threads, 0, stream>>>(v, x, rows, y, beta);
    else packed_gemv_kernel<T, F, gemv_max_rows><<<grid, threads, 0, stream>>>(v, x, rows, y, beta);
}

template <class T, bool Backward>
void launch(const char* op, const DevicePackedWeight& w, const T* a, std::int64_t rows, std::int64_t a_cols, T* c,
            float beta, cudaStream_t stream) {
    const char* a_name = Backward ? "dy" : "x";
    check(!w.empty(), "cuda::", op, ": the weight is empty (not uploaded)");
    const std::int64_t k = Backward ? w.out() : w.in(), n = Backward ? w.in() : w.out();
    check(rows >= 0, "cuda::", op, ": ", a_name, " has ", rows, " rows (must be >= 0)");
    check(a_cols == k, "cuda::", op, ": ", a_name, " [", rows, ", ", a_cols, "] does not match the ", w.format(),
          " weight [", w.out(), ", ", w.in(), "] (", Backward ? "dy" : "x", " needs ", k, " columns)");
    check(rows <= static_cast<std::int64_t>(tile_m) * 65535, "cuda::", op, ": ", a_name, " [", rows, ", ", a_cols,
          "] has more rows than a launch indexes (", static_cast<std::int64_t>(tile_m) * 65535, ")");
    if (rows == 0) return;
    check(a != nullptr && c != nullptr, "cuda::", op, ": null ", a == nullptr ? a_name : "output", " pointer for ",
          a_name, " [", rows, ", ", a_cols, "] and the ", w.format(), " weight [", w.out(), ", ", w.in(), "]");
    check(static_cast<const void*>(a) != static_cast<const void*>(c), "cuda::", op, ": the output aliases ", a_name,
          " [", rows, ", ", a_cols, "] (the product cannot run in place)");
    const dim3 grid(static_cast<unsigned>(ceil_div(n, tile_n)), static_cast<unsigned>(ceil_div(rows, tile_m)));
    const PackedWeightView& v = w.view();
    const int r = static_cast<int>(rows);
    if (!Backward && v.format == PackedFormat::quant && rows <= gemv_max_rows) {
        switch (v.bits) {
            case 8: launch_gemv<T, 8>(v, a, r, c, beta, stream); break;
            case 4: launch_gemv<T, 4>(v, a, r, c, beta, stream); break;
            default: launch_gemv<T, 0>(v, a, r, c, beta, stream); break;
        }
    } else if (v.format == PackedFormat::nm) {
        packed_gemm_kernel<T, kernel_nm, Backward><<<grid, threads, 0, stream>>>(v, a, r, c, beta);
    } else {
        switch (v.bits) {
            case 8: packed_gemm_kernel<T, 8, Backward><<<grid, threads, 0, stream>>>(v, a, r, c, beta); break;
            case 4: packed_gemm_kernel<T, 4, Backward><<<grid, threads, 0, stream>>>(v, a, r, c, beta); break;
            case 3: packed_gemm_kernel<T, 3, Backward><<<grid, threads, 0, stream>>>(v, a, r, c, beta); break;
            case 2: packed_gemm_kernel<T, 2, Backward><<<grid, threads, 0, stream>>>(v, a, r, c, beta); break;
            default: packed_gemm_kernel<T, 0, Backward><<<grid, threads, 0, stream>>>(v, a, r, c, beta); break;
        }
    }
    check_launch(op, a_name, " [", rows, ", ", a_cols, "] with the ", w.format(), " weight [", w.out(), ", ", w.in(), "]");
}

}  // namespace packed_gemm_detail

// y[rows, out] = x[rows, in] · Ŵᵀ (+ beta · y). x_cols must be w.in() (checked).
template <DeviceFloat T>
void packed_matmul(const DevicePackedWeight& w, const T* x, std::int64_t rows, std::int64_t x_cols, T* y,
                   float beta = 0.0f, cudaStream_t stream = nullptr) {
    packed_gemm_detail::launch<T, false>("packed_matmul", w, x, rows, x_cols, y, beta, stream);
}

// dx[rows, in] = dy[rows, out] · Ŵ (+ beta · dx); beta = 1 accumulates like the CPU backward.
// dy_cols must be w.out() (checked).
template <DeviceFloat T>
void packed_matmul_backward(const DevicePackedWeight& w, const T* dy, std::int64_t rows, std::int64_t dy_cols, T* dx,
                            float beta = 0.0f, cudaStream_t stream = nullptr) {
    packed_gemm_detail::launch<T, true>("packed_matmul_backward", w, dy, rows, dy_cols, dx, beta, stream);
}

}  // namespace mopt::backend::cuda
