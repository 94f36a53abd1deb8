#pragma once
// GEMM on the GPU through cuBLAS: C = alpha * op(A) op(B) + beta * C, with the row-major
// convention of mopt/backend/cpu/gemm.hpp (same GemmArgs fields, so a CPU call site ports by
// adding the element types). cuBLAS is column-major; a row-major [m, n] matrix is its transpose
// in column-major, and C^T = op(B)^T op(A)^T, so the call swaps A and B and m and n instead of
// copying anything.
//
// Element types and compute:
//   A, B f32  -> C f32   compute f32 (exact) or tf32 (inputs rounded to a 10-bit mantissa on the
//                        tensor cores, f32 accumulation: ~1e-3 relative error, ~8x the throughput)
//   A, B bf16 -> C bf16  f32 accumulation, one rounding when C is stored
//   A, B bf16 -> C f32   f32 accumulation (e.g. weight gradients kept in f32)
//
// One cuBLAS handle per thread and device (a handle must not be shared by threads that call it
// concurrently); each call binds the handle to the call's stream.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "mopt/backend/cuda/common.cuh"
#include "mopt/tensor/dtype.hpp"

namespace mopt::backend::cuda {

inline void check_cublas(cublasStatus_t status, const char* call) {
    check(status == CUBLAS_STATUS_SUCCESS, "cuBLAS: ", call, " failed: ", cublasGetStatusString(status));
}

enum class GemmCompute { f32, tf32 };

struct GemmArgs {
    bool trans_a = false, trans_b = false;
    std::int64_t m = 0, n = 0, k = 0;  // C is [m, n]; op(A) is [m, k]; op(B) is [k, n]
    float alpha = 1.0f, beta = 0.0f;
    const void* a = nullptr;
    std::int64_t lda = 0;
    const void* b = nullptr;
    std::int64_t ldb = 0;
    void* c = nullptr;
    std::int64_t ldc = 0;
    DType ab_type = DType::f32;  // element type of A and B: f32 or bf16
    DType c_type = DType::f32;   // f32, or bf16 when A and B are bf16
    GemmCompute compute = GemmCompute::f32;
    cudaStream_t stream = nullptr;
};

// Strides between consecutive matrices of a batch, in elements.
struct GemmBatch {
    std::int64_t count = 1;
    std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;
};

// This thread's cuBLAS handle for the current device, created on first use.
[[nodiscard]] inline cublasHandle_t blas_handle() {
    struct Handles {
        std::vector<cublasHandle_t> by_device;
        ~Handles() {
            for (cublasHandle_t h : by_device)
                if (h) (void)cublasDestroy(h);
        }
    };
    thread_local Handles handles;
    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice (blas_handle)");
    if (static_cast<std::size_t>(device) >= handles.by_device.size()) handles.by_device.resize(device + 1, nullptr);
    cublasHandle_t& h = handles.by_device[static_cast<std::size_t>(device)];
    if (!h) check_cublas(cublasCreate(&h), "cublasCreate");
    return h;
}

namespace blas_detail {

inline cudaDataType data_type(DType t) { return t == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

inline void check_args(const GemmArgs& g, const GemmBatch& batch) {
    check((g.ab_type == DType::f32 && g.c_type == DType::f32) ||
              (g.ab_type == DType::bf16 && (g.c_type == DType::bf16 || g.c_type == DType::f32)),
          "cuda::gemm: A/B of type ", name(g.ab_type), " with C of type ", name(g.c_type),
          " is not supported (f32->f32, bf16->bf16, bf16->f32)");
    check(g.compute == GemmCompute::f32 || g.ab_type == DType::f32,
          "cuda::gemm: tf32 compute applies to f32 inputs only; bf16 inputs always accumulate in f32");
    check(g.m >= 0 && g.n >= 0 && g.k >= 0, "cuda::gemm: negative extent m=", g.m, " n=", g.n, " k=", g.k);
    check(g.m <= INT_MAX && g.n <= INT_MAX && g.k <= INT_MAX, "cuda::gemm: m=", g.m, " n=", g.n, " k=", g.k,
          " exceeds cuBLAS's 32-bit extents");
    // Row-major storage: A is [m, k] ([k, m] when transposed), B is [k, n] ([n, k]), C is [m, n].
    const std::int64_t a_cols = g.trans_a ? g.m : g.k, b_cols = g.trans_b ? g.k : g.n;
    check(g.lda >= std::max<std::int64_t>(a_cols, 1) && g.lda <= INT_MAX, "cuda::gemm: lda ", g.lda, " is not in [",
          std::max<std::int64_t>(a_cols, 1), ", 2^31) for row-major A of shape ",
          g.trans_a ? "[k, m] = [" : "[m, k] = [", g.trans_a ? g.k : g.m, ", ", a_cols, "]");
    check(g.ldb >= std::max<std::int64_t>(b_cols, 1) && g.ldb <= INT_MAX, "cuda::gemm: ldb ", g.ldb, " is not in [",
          std::max<std::int64_t>(b_cols, 1), ", 2^31) for row-major B of shape ",
          g.trans_b ? "[n, k] = [" : "[k, n] = [", g.trans_b ? g.n : g.k, ", ", b_cols, "]");
    check(g.ldc >= std::max<std::int64_t>(g.n, 1) && g.ldc <= INT_MAX, "cuda::gemm: ldc ", g.ldc, " is not in [",
          std::max<std::int64_t>(g.n, 1), ", 2^31) for row-major C of shape [", g.m, ", ", g.n, "]");
    check(batch.count >= 0 && batch.count <= INT_MAX, "cuda::gemm: batch count ", batch.count, " is not in [0, 2^31)");
    const bool empty = g.m == 0 || g.n == 0 || batch.count == 0;
    check(empty || (g.c && (g.k == 0 || (g.a && g.b))), "cuda::gemm: null A, B or C pointer for [m=", g.m, ", n=", g.n,
          ", k=", g.k, "]");
}

// k == 0: op(A) op(B) is the zero matrix and C = beta * C (beta == 0 writes zeros, even over NaN).
template <class T>
__global__ void scale_matrix_kernel(T* c, std::int64_t m, std::int64_t n, std::int64_t ldc, std::int64_t stride,
                                    std::int64_t count, float beta) {
    const std::int64_t total = m * n * count;
    for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        const std::int64_t b = e / (m * n), i = (e / n) % m, j = e % n;
        T& v = c[b * stride + i * ldc + j];
        v = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(v));
    }
}

inline void scale_c(const GemmArgs& g, const GemmBatch& batch) {
    const int blocks = elementwise_blocks(g.m * g.n * batch.count);
    if (g.c_type == DType::bf16)
        scale_matrix_kernel<<<blocks, elementwise_threads, 0, g.stream>>>(static_cast<__nv_bfloat16*>(g.c), g.m, g.n,
                                                                          g.ldc, batch.stride_c, batch.count, g.beta);
    else
        scale_matrix_kernel<<<blocks, elementwise_threads, 0, g.stream>>>(static_cast<float*>(g.c), g.m, g.n, g.ldc,
                                                                          batch.stride_c, batch.count, g.beta);
    check_launch("gemm (k = 0, C = beta * C)", "[m=", g.m, ", n=", g.n, "]");
}

inline cublasComputeType_t compute_type(const GemmArgs& g) {
    return g.compute == GemmCompute::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
}

}  // namespace blas_detail

// count matrices: C_i = alpha * op(A_i) op(B_i) + beta * C_i with X_i = X + i * stride_x.
// A_i: [m, k] (or [k, m]), B_i: [k, n] (or [n, k]) -> C_i: [m, n], all row-major
inline void gemm_strided_batched(const GemmArgs& g, const GemmBatch& batch) {
    blas_detail::check_args(g, batch);
    if (g.m == 0 || g.n == 0 || batch.count == 0) return;
    if (g.k == 0) return blas_detail::scale_c(g, batch);
    cublasHandle_t h = blas_handle();
    check_cublas(cublasSetStream(h, g.stream), "cublasSetStream");
    const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cudaDataType ab = blas_detail::data_type(g.ab_type), c = blas_detail::data_type(g.c_type);
    // Column-major view: C^T [n, m] = op(B)^T [n, k] * op(A)^T [k, m].
    if (batch.count == 1) {
        check_cublas(cublasGemmEx(h, op_b, op_a, static_cast<int>(g.n), static_cast<int>(g.m), static_cast<int>(g.k),
                                  &g.alpha, g.b, ab, static_cast<int>(g.ldb), g.a, ab, static_cast<int>(g.lda), &g.beta,
                                  g.c, c, static_cast<int>(g.ldc), blas_detail::compute_type(g), CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx (cuda::gemm)");
        return;
    }
    check_cublas(cublasGemmStridedBatchedEx(
                     h, op_b, op_a, static_cast<int>(g.n), static_cast<int>(g.m), static_cast<int>(g.k), &g.alpha, g.b,
                     ab, static_cast<int>(g.ldb), batch.stride_b, g.a, ab, static_cast<int>(g.lda), batch.stride_a,
                     &g.beta, g.c, c, static_cast<int>(g.ldc), batch.stride_c, static_cast<int>(batch.count),
                     blas_detail::compute_type(g), CUBLAS_GEMM_DEFAULT),
                 "cublasGemmStridedBatchedEx (cuda::gemm_strided_batched)");
}

// A: [m, k] (or [k, m]), B: [k, n] (or [n, k]) -> C: [m, n], row-major
inline void gemm(const GemmArgs& g) { gemm_strided_batched(g, GemmBatch{}); }

}  // namespace mopt::backend::cuda
