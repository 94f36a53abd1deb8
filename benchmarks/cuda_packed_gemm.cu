// The packed-weight GEMM (include/mopt/backend/cuda/packed_gemm.cuh) against cuBLAS bf16 dense:
// y = x Ŵᵀ with x [rows, 4096] bf16 and Ŵ [out, 4096] for out 4096 and 11008, Ŵ in int8 (per
// row), int4 group 128 and 2:4, plus the backward dx = dy Ŵ. One JSON line per case on stdout:
//
//   {"case": "int4g128", "op": "forward", "rows": 4096, "out": 4096, "in": 4096,
//    "packed_ms": …, "cublas_bf16_ms": …, "ratio": packed_ms / cublas_bf16_ms,
//    "weight_bytes": …, "dense_bf16_bytes": …}
//
// Random codes / values (the kernel's speed does not depend on them); the weights are packed by
// the CPU's own packers and uploaded once. Timing: CUDA events around `iters` back-to-back calls
// after `warmup` ones, the mean per call.
//
// Build (sm_90, no CMake):
//   nvcc -std=c++20 -O3 -arch=sm_90 -Iinclude -I/usr/include/eigen3 -DEIGEN_DONT_PARALLELIZE \
//        -diag-suppress 20012,20013,20015 benchmarks/cuda_packed_gemm.cu \
//        -o .cache/bin/cuda/cuda_packed_gemm -lcublas -lcublasLt
//   (or: cmake --build --preset default --target cuda_packed_gemm)
// Run: .cache/bin/cuda/cuda_packed_gemm [--rows 4096] [--iters 20] [--warmup 3] [--backward 0|1]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <mopt/backend/cuda/blas.cuh>
#include <mopt/backend/cuda/packed_gemm.cuh>
#include <mopt/compress/packed_weight.hpp>

namespace {

namespace cuda = mopt::backend::cuda;
namespace compress = mopt::compress;
using bf16 = __nv_bfloat16;

compress::PackedWeight make_weight(const std::string& kind, std::int64_t out, std::int64_t in, unsigned seed) {
    std::mt19937_64 rng(seed);
    if (kind == "nm2:4") {
        std::uniform_real_distribution<float> val(-1.0f, 1.0f);
        std::vector<float> w(static_cast<std::size_t>(out * in));
        for (auto& v : w) v = val(rng);
        for (std::int64_t g = 0; g < out * in / 4; ++g) {  // zero 2 random positions of each group of 4
            const int a = static_cast<int>(rng() % 4), b = (a + 1 + static_cast<int>(rng() % 3)) % 4;
            w[static_cast<std::size_t>(4 * g + a)] = 0.0f;
            w[static_cast<std::size_t>(4 * g + b)] = 0.0f;
        }
        return compress::PackedWeight::nm(mopt::Tensor::from({out, in}, std::span<const float>(w)), 2, 4);
    }
    compress::IntCodes c;
    c.out = out;
    c.in = in;
    c.bits = kind == "int8" ? 8 : 4;
    c.group = kind == "int8" ? in : 128;
    std::uniform_int_distribution<int> code(0, (1 << c.bits) - 1);
    c.q.resize(static_cast<std::size_t>(out * in));
    for (auto& q : c.q) q = static_cast<std::uint8_t>(code(rng));
    const std::int64_t ng = out * (in / c.group);
    c.scale.assign(static_cast<std::size_t>(ng), 0.01f);
    c.zero.assign(static_cast<std::size_t>(ng), static_cast<float>(1 << (c.bits - 1)));
    return compress::PackedWeight::quantized(c);
}

template <class F>
float time_ms(F&& f, int warmup, int iters) {
    for (int i = 0; i < warmup; ++i) f();
    cudaEvent_t start, stop;
    cuda::check_cuda(cudaEventCreate(&start), "cudaEventCreate");
    cuda::check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
    cuda::check_cuda(cudaEventRecord(start), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) f();
    cuda::check_cuda(cudaEventRecord(stop), "cudaEventRecord");
    cuda::check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    cuda::check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return ms / static_cast<float>(iters);
}

}  // namespace

int main(int argc, char** argv) {
    std::int64_t rows = 4096;
    int iters = 20, warmup = 3;
    bool backward = true;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--rows")) rows = std::atoll(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--iters")) iters = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--warmup")) warmup = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--backward")) backward = std::atoi(argv[i + 1]) != 0;
        else {
            std::fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    const std::int64_t in = 4096;
    try {
        for (std::int64_t out : {std::int64_t{4096}, std::int64_t{11008}}) {
            std::vector<bf16> host_x(static_cast<std::size_t>(rows * (in > out ? in : out)));
            std::mt19937 rng(1);
            std::uniform_real_distribution<float> d(-1.0f, 1.0f);
            for (auto& v : host_x) v = __float2bfloat16(d(rng));
            cuda::DeviceArray<bf16> x(static_cast<std::size_t>(rows * in)), y(static_cast<std::size_t>(rows * out)),
                dy(static_cast<std::size_t>(rows * out)), dx(static_cast<std::size_t>(rows * in)),
                dense(static_cast<std::size_t>(out * in));
            x.upload(std::span<const bf16>(host_x.data(), x.size()));
            dy.upload(std::span<const bf16>(host_x.data(), dy.size()));
            std::vector<bf16> host_w(dense.size());
            for (auto& v : host_w) v = __float2bfloat16(0.02f * d(rng));
            dense.upload(host_w);

            const float cublas_fwd = time_ms(
                [&] {
                    cuda::gemm({.trans_b = true, .m = rows, .n = out, .k = in, .a = x.data(), .lda = in, .b = dense.data(),
                                .ldb = in, .c = y.data(), .ldc = out, .ab_type = mopt::DType::bf16,
                                .c_type = mopt::DType::bf16});
                },
                warmup, iters);
            const float cublas_bwd = !backward ? 0.0f : time_ms(
                [&] {
                    cuda::gemm({.m = rows, .n = in, .k = out, .a = dy.data(), .lda = out, .b = dense.data(), .ldb = in,
                                .c = dx.data(), .ldc = in, .ab_type = mopt::DType::bf16, .c_type = mopt::DType::bf16});
                },
                warmup, iters);

            for (const std::string kind : {"int8", "int4g128", "nm2:4"}) {
                const compress::PackedWeight w = make_weight(kind, out, in, 7);
                const cuda::DevicePackedWeight dw = cuda::DevicePackedWeight::upload(w);
                auto print = [&](const char* op, float ms, float ref) {
                    std::printf("{\"case\": \"%s\", \"op\": \"%s\", \"rows\": %lld, \"out\": %lld, \"in\": %lld, "
                                "\"packed_ms\": %.4f, \"cublas_bf16_ms\": %.4f, \"ratio\": %.3f, \"weight_bytes\": %zu, "
                                "\"dense_bf16_bytes\": %lld}\n",
                                kind.c_str(), op, static_cast<long long>(rows), static_cast<long long>(out),
                                static_cast<long long>(in), ms, ref, ms / ref, dw.bytes(),
                                static_cast<long long>(2 * out * in));
                    std::fflush(stdout);
                };
                print("forward", time_ms([&] { cuda::packed_matmul<bf16>(dw, x.data(), rows, in, y.data()); }, warmup, iters),
                      cublas_fwd);
                if (backward)
                    print("backward",
                          time_ms([&] { cuda::packed_matmul_backward<bf16>(dw, dy.data(), rows, out, dx.data()); }, warmup,
                                  iters),
                          cublas_bwd);
            }
            cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cuda_packed_gemm: %s\n", e.what());
        return 1;
    }
    return 0;
}
