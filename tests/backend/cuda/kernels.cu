// The CUDA backend's core layer against mopt's CPU ops (cpu_reference.hpp): the caching allocator,
// cuBLAS GEMMs, norms, RoPE, activations and the fused cross-entropy, forward and backward, f32
// and bf16. Sizes are odd on purpose (not multiples of a warp or block), the cross-entropy uses a
// 32000-token vocabulary with ignored rows, and bf16 cases feed the CPU reference the same
// bf16-rounded inputs, so only the kernel's own arithmetic and output rounding are measured.
//
// Tolerances (normwise, see cuda_test.cuh): f32 outputs 1e-4, bf16 outputs 1e-2 (8-bit mantissa),
// TF32 GEMM 5e-3 (inputs rounded to a 10-bit mantissa: ~5e-4 per product, k = 257 terms).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <mopt/backend/cuda/activation.cuh>
#include <mopt/backend/cuda/allocator.cuh>
#include <mopt/backend/cuda/blas.cuh>
#include <mopt/backend/cuda/cross_entropy.cuh>
#include <mopt/backend/cuda/norm.cuh>
#include <mopt/backend/cuda/rope.cuh>

#include "cpu_reference.hpp"
#include "cuda_test.cuh"

namespace {

namespace cuda = mopt::backend::cuda;
namespace ref = mopt::cuda_test::ref;
using bf16 = __nv_bfloat16;
using Floats = ref::Floats;

Floats random_floats(std::size_t n, float scale, unsigned seed, float offset = 0.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    Floats v(n);
    for (float& x : v) x = offset + dist(rng);
    return v;
}

using mopt::cuda_test::representable;
using mopt::cuda_test::to_device;
using mopt::cuda_test::to_host;

void sync(const char* what) { cuda::check_cuda(cudaDeviceSynchronize(), what); }

template <class T>
constexpr double tolerance() {
    return std::is_same_v<T, bf16> ? 1e-2 : 1e-4;
}
using mopt::cuda_test::type_name;

Floats one(float v) { return {v}; }

// CUDA_CHECK_CLOSE over values held here: its spans must not point into temporaries.
#define EXPECT_CLOSE(got, want, tol, what)                      \
    do {                                                        \
        const Floats got_values_ = (got), want_values_ = (want); \
        CUDA_CHECK_CLOSE(got_values_, want_values_, tol, what); \
    } while (0)

template <class Fn>
bool throws_mopt_error(Fn&& fn) {
    try {
        fn();
    } catch (const mopt::Error&) {
        return true;
    }
    return false;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Allocator

MOPT_CUDA_TEST(allocator_rounds_sizes_into_buckets) {
    using A = cuda::Allocator;
    CUDA_CHECK(A::round_size(1) == 512, A::round_size(1));
    CUDA_CHECK(A::round_size(512) == 512, A::round_size(512));
    CUDA_CHECK(A::round_size(513) == 1024, A::round_size(513));
    CUDA_CHECK(A::round_size(std::size_t{1} << 20) == std::size_t{1} << 20, A::round_size(std::size_t{1} << 20));
    CUDA_CHECK(A::round_size((std::size_t{1} << 20) + 1) == std::size_t{5} << 18, A::round_size((1 << 20) + 1));
    CUDA_CHECK(A::round_size(std::size_t{3} << 20) == std::size_t{3} << 20, A::round_size(std::size_t{3} << 20));
    for (std::size_t bytes : {std::size_t{1000}, std::size_t{777777}, std::size_t{12345678}, std::size_t{1} << 31}) {
        const std::size_t r = A::round_size(bytes);
        CUDA_CHECK(r >= bytes && r <= bytes + bytes / 4 + 512, bytes, " rounds to ", r);
    }
}

MOPT_CUDA_TEST(allocator_reuses_freed_blocks_without_cuda_malloc) {
    cuda::Allocator& alloc = cuda::Allocator::instance();
    const cuda::AllocatorStats start = alloc.stats();
    std::size_t mallocs_after_first = 0;
    for (int step = 0; step < 5; ++step) {
        {
            // The shapes of a "step": mixed sizes, small and over 1 MiB, two element types.
            cuda::DeviceArray<float> a(1000), b(12345);
            cuda::DeviceBlock c(std::size_t{3} << 20);
            cuda::DeviceArray<bf16> d(777);
            cuda::DeviceBlock empty(0);
            CUDA_CHECK(a.data() && b.data() && c.get() && d.data() && !empty.get(), "null block at step ", step);
            const cuda::AllocatorStats live = alloc.stats();
            const std::size_t rounded = cuda::Allocator::round_size(4000) + cuda::Allocator::round_size(4 * 12345) +
                                        cuda::Allocator::round_size(std::size_t{3} << 20) +
                                        cuda::Allocator::round_size(2 * 777);
            CUDA_CHECK(live.bytes_in_use >= start.bytes_in_use + rounded, live.bytes_in_use,
                       " bytes in use, expected >= ", start.bytes_in_use + rounded);
            CUDA_CHECK(live.peak_bytes >= live.bytes_in_use, "peak ", live.peak_bytes, " < in use ", live.bytes_in_use);
        }
        const cuda::AllocatorStats after = alloc.stats();
        CUDA_CHECK(after.bytes_in_use == start.bytes_in_use, "step ", step, " leaves ", after.bytes_in_use,
                   " bytes in use, started with ", start.bytes_in_use);
        if (step == 0) mallocs_after_first = after.cuda_malloc_calls;
        else
            CUDA_CHECK(after.cuda_malloc_calls == mallocs_after_first, "step ", step, " called cudaMalloc ",
                       after.cuda_malloc_calls - mallocs_after_first, " more times");
    }
    CUDA_CHECK(alloc.stats().cache_hits >= start.cache_hits + 4 * 4, "cache hits ", alloc.stats().cache_hits);

    // A freed block goes to the next request of its bucket.
    void* first = nullptr;
    {
        cuda::DeviceArray<float> a(1000);
        first = a.data();
    }
    cuda::DeviceArray<float> b(990);  // 3960 bytes: the same 4096-byte bucket
    CUDA_CHECK(b.data() == first, "a same-bucket request did not reuse the freed block");

    // Data survives the round trip.
    const Floats host = random_floats(1000, 1.0f, 11);
    cuda::DeviceArray<float> c(host.size());
    c.upload(host);
    Floats back(host.size());
    c.download(back);
    CUDA_CHECK(back == host, "DeviceArray upload/download changed the values");
}

// ---------------------------------------------------------------------------------------------
// GEMM

namespace {

template <class T>
constexpr mopt::DType element_dtype() {
    return std::is_same_v<T, bf16> ? mopt::DType::bf16 : mopt::DType::f32;
}

// One row-major GEMM (or strided batch) with padded leading dimensions, checked against the CPU
// gemm on the same (representable) values, padding included (it must stay untouched).
template <class AB, class C>
void check_gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, float beta,
                cuda::GemmCompute compute, double tol, std::int64_t batch = 1) {
    const std::int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
    const std::int64_t a_rows = ta ? k : m, b_rows = tb ? n : k;
    const std::int64_t stride_a = a_rows * lda + 5, stride_b = b_rows * ldb + 7, stride_c = m * ldc + 1;
    const Floats a = representable<AB>(random_floats(static_cast<std::size_t>(stride_a * batch), 1.0f, 1));
    const Floats b = representable<AB>(random_floats(static_cast<std::size_t>(stride_b * batch), 1.0f, 2));
    const Floats c = representable<C>(random_floats(static_cast<std::size_t>(stride_c * batch), 1.0f, 3));

    Floats want = c;
    for (std::int64_t i = 0; i < batch; ++i) {
        const Floats ai(a.begin() + i * stride_a, a.begin() + (i + 1) * stride_a);
        const Floats bi(b.begin() + i * stride_b, b.begin() + (i + 1) * stride_b);
        const Floats ci(c.begin() + i * stride_c, c.begin() + (i + 1) * stride_c);
        const Floats out = ref::gemm(ta, tb, m, n, k, alpha, beta, ai, lda, bi, ldb, ci, ldc);
        std::copy(out.begin(), out.end(), want.begin() + i * stride_c);
    }

    auto da = to_device<AB>(a);
    auto db = to_device<AB>(b);
    auto dc = to_device<C>(c);
    const cuda::GemmArgs args{.trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k, .alpha = alpha, .beta = beta,
                              .a = da.data(), .lda = lda, .b = db.data(), .ldb = ldb, .c = dc.data(), .ldc = ldc,
                              .ab_type = element_dtype<AB>(), .c_type = element_dtype<C>(), .compute = compute};
    const cuda::GemmBatch strides{.count = batch, .stride_a = stride_a, .stride_b = stride_b, .stride_c = stride_c};
    if (batch == 1) cuda::gemm(args);
    else cuda::gemm_strided_batched(args, strides);
    sync("gemm");
    EXPECT_CLOSE(to_host(dc), want, tol, std::string("gemm ") + type_name<AB>() + "->" + type_name<C>() +
                                                 (ta ? " A^T" : " A") + (tb ? " B^T" : " B") + " batch " +
                                                 std::to_string(batch));
}

}  // namespace

MOPT_CUDA_TEST(gemm_f32_matches_cpu_for_every_transpose) {
    for (bool ta : {false, true})
        for (bool tb : {false, true})
            check_gemm<float, float>(ta, tb, 37, 53, 29, 0.7f, 0.3f, cuda::GemmCompute::f32, 1e-4);
}

MOPT_CUDA_TEST(gemm_tf32_matches_cpu_within_tf32_rounding) {
    check_gemm<float, float>(false, true, 64, 96, 257, 1.0f, 0.0f, cuda::GemmCompute::tf32, 5e-3);
    check_gemm<float, float>(true, false, 33, 17, 100, 0.5f, 1.0f, cuda::GemmCompute::tf32, 5e-3);
}

MOPT_CUDA_TEST(gemm_bf16_in_bf16_or_f32_out_matches_cpu) {
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            check_gemm<bf16, bf16>(ta, tb, 37, 53, 29, 0.7f, 0.3f, cuda::GemmCompute::f32, 1e-2);
            // bf16 products are exact in f32 and accumulate in f32: only the summation order differs.
            check_gemm<bf16, float>(ta, tb, 37, 53, 29, 0.7f, 0.3f, cuda::GemmCompute::f32, 1e-4);
        }
}

MOPT_CUDA_TEST(gemm_strided_batched_matches_cpu_per_matrix) {
    check_gemm<float, float>(false, false, 19, 23, 31, 1.0f, 0.5f, cuda::GemmCompute::f32, 1e-4, 3);
    check_gemm<float, float>(true, true, 8, 5, 13, 2.0f, 0.0f, cuda::GemmCompute::f32, 1e-4, 4);
    check_gemm<bf16, bf16>(false, true, 21, 40, 64, 1.0f, 0.0f, cuda::GemmCompute::f32, 1e-2, 3);
}

MOPT_CUDA_TEST(gemm_with_k_zero_scales_c_by_beta) {
    const std::int64_t m = 5, n = 7;
    Floats c = random_floats(m * n, 1.0f, 4);
    auto dc = to_device<float>(c);
    cuda::gemm({.m = m, .n = n, .k = 0, .alpha = 1.0f, .beta = 0.5f, .lda = 1, .ldb = n, .c = dc.data(), .ldc = n});
    sync("gemm k = 0");
    for (float& v : c) v *= 0.5f;
    EXPECT_CLOSE(to_host(dc), c, 0.0, "gemm k = 0, beta = 0.5");
    // beta = 0 writes zeros even over NaN (as BLAS: C is not read).
    auto nan_c = to_device<float>(Floats(m * n, NAN));
    cuda::gemm({.m = m, .n = n, .k = 0, .beta = 0.0f, .lda = 1, .ldb = n, .c = nan_c.data(), .ldc = n});
    sync("gemm k = 0, beta = 0");
    EXPECT_CLOSE(to_host(nan_c), Floats(m * n, 0.0f), 0.0, "gemm k = 0, beta = 0");
}

MOPT_CUDA_TEST(gemm_rejects_bad_leading_dimensions_and_types) {
    cuda::DeviceArray<float> buf(64);
    CUDA_CHECK(throws_mopt_error([&] {
                   cuda::gemm({.m = 4, .n = 4, .k = 8, .a = buf.data(), .lda = 7, .b = buf.data(), .ldb = 4,
                               .c = buf.data(), .ldc = 4});
               }),
               "lda 7 < k 8 was accepted");
    CUDA_CHECK(throws_mopt_error([&] {
                   cuda::gemm({.m = 4, .n = 4, .k = 4, .a = buf.data(), .lda = 4, .b = buf.data(), .ldb = 4,
                               .c = buf.data(), .ldc = 4, .ab_type = mopt::DType::f32, .c_type = mopt::DType::bf16});
               }),
               "f32 inputs with a bf16 output were accepted");
}

// ---------------------------------------------------------------------------------------------
// RMSNorm and LayerNorm

namespace {

template <class T>
void check_rms_norm(std::int64_t rows, std::int64_t d) {
    const float eps = 1e-5f;
    const std::string what = std::string("rms_norm ") + type_name<T>() + " [" + std::to_string(rows) + ", " +
                             std::to_string(d) + "]";
    const Floats x = representable<T>(random_floats(rows * d, 1.5f, 21));
    const Floats w = random_floats(d, 0.5f, 22, 1.0f);
    const Floats dy = representable<T>(random_floats(rows * d, 1.0f, 23));
    const ref::NormForward want = ref::rms_norm_forward(x, w, rows, d, eps);
    const ref::NormGrads want_grad = ref::rms_norm_backward(x, w, dy, rows, d, eps);

    auto dx_in = to_device<T>(x);
    auto dw = to_device<float>(w);
    auto ddy = to_device<T>(dy);
    cuda::DeviceArray<T> y(rows * d), dx(rows * d), dx_only(rows * d);
    cuda::DeviceArray<float> rstd(rows), dweight(d), dweight_only(d);
    cuda::rms_norm_forward(dx_in.data(), dw.data(), y.data(), rstd.data(), rows, d, eps);
    sync("rms_norm_forward");
    EXPECT_CLOSE(to_host(y), want.y, tolerance<T>(), what + " y");
    EXPECT_CLOSE(to_host(rstd), want.rstd, 1e-4, what + " rstd");

    cuda::rms_norm_backward(dx_in.data(), dw.data(), rstd.data(), ddy.data(), dx.data(), dweight.data(), rows, d);
    // Each gradient alone: the input-only launch takes one row per block, the weight-only one skips dx.
    cuda::rms_norm_backward(dx_in.data(), dw.data(), rstd.data(), ddy.data(), dx_only.data(), nullptr, rows, d);
    cuda::rms_norm_backward(dx_in.data(), dw.data(), rstd.data(), ddy.data(), static_cast<T*>(nullptr),
                            dweight_only.data(), rows, d);
    sync("rms_norm_backward");
    EXPECT_CLOSE(to_host(dx), want_grad.dx, tolerance<T>(), what + " dx");
    EXPECT_CLOSE(to_host(dweight), want_grad.dweight, 1e-4, what + " dweight");
    EXPECT_CLOSE(to_host(dx_only), want_grad.dx, tolerance<T>(), what + " dx (no dweight)");
    EXPECT_CLOSE(to_host(dweight_only), want_grad.dweight, 1e-4, what + " dweight (no dx)");

    // dx += the input gradient: start from a known residual gradient r, expect r + dx.
    const Floats r = representable<T>(random_floats(rows * d, 1.0f, 24));
    auto acc = to_device<T>(r);
    cuda::rms_norm_backward_accumulate(dx_in.data(), dw.data(), rstd.data(), ddy.data(), acc.data(), rows, d);
    sync("rms_norm_backward_accumulate");
    Floats want_acc(r.size());
    for (std::size_t i = 0; i < r.size(); ++i) want_acc[i] = r[i] + want_grad.dx[i];
    EXPECT_CLOSE(to_host(acc), want_acc, tolerance<T>(), what + " dx accumulated");
}

template <class T>
void check_layer_norm(std::int64_t rows, std::int64_t d) {
    const float eps = 1e-5f;
    const std::string what = std::string("layer_norm ") + type_name<T>() + " [" + std::to_string(rows) + ", " +
                             std::to_string(d) + "]";
    // A mean far from zero: the two-pass variance must not cancel.
    const Floats x = representable<T>(random_floats(rows * d, 1.5f, 31, 3.0f));
    const Floats w = random_floats(d, 0.5f, 32, 1.0f);
    const Floats b = random_floats(d, 0.5f, 33);
    const Floats dy = representable<T>(random_floats(rows * d, 1.0f, 34));
    const ref::NormForward want = ref::layer_norm_forward(x, w, b, rows, d, eps);
    const ref::NormGrads want_grad = ref::layer_norm_backward(x, w, b, dy, rows, d, eps);

    auto dx_in = to_device<T>(x);
    auto dw = to_device<float>(w);
    auto db = to_device<float>(b);
    auto ddy = to_device<T>(dy);
    cuda::DeviceArray<T> y(rows * d), dx(rows * d);
    cuda::DeviceArray<float> mean(rows), rstd(rows), dweight(d), dbias(d), dbias_only(d);
    cuda::layer_norm_forward(dx_in.data(), dw.data(), db.data(), y.data(), mean.data(), rstd.data(), rows, d, eps);
    sync("layer_norm_forward");
    EXPECT_CLOSE(to_host(y), want.y, tolerance<T>(), what + " y");
    EXPECT_CLOSE(to_host(mean), want.mean, 1e-4, what + " mean");
    EXPECT_CLOSE(to_host(rstd), want.rstd, 1e-4, what + " rstd");

    cuda::layer_norm_backward(dx_in.data(), dw.data(), mean.data(), rstd.data(), ddy.data(), dx.data(), dweight.data(),
                              dbias.data(), rows, d);
    cuda::layer_norm_backward(dx_in.data(), dw.data(), mean.data(), rstd.data(), ddy.data(), static_cast<T*>(nullptr),
                              nullptr, dbias_only.data(), rows, d);
    sync("layer_norm_backward");
    EXPECT_CLOSE(to_host(dx), want_grad.dx, tolerance<T>(), what + " dx");
    EXPECT_CLOSE(to_host(dweight), want_grad.dweight, 1e-4, what + " dweight");
    EXPECT_CLOSE(to_host(dbias), want_grad.dbias, 1e-4, what + " dbias");
    EXPECT_CLOSE(to_host(dbias_only), want_grad.dbias, 1e-4, what + " dbias (alone)");
}

}  // namespace

MOPT_CUDA_TEST(rms_norm_f32_matches_cpu) {
    check_rms_norm<float>(5, 64);
    check_rms_norm<float>(37, 1000);
    check_rms_norm<float>(600, 4999);  // several rows per backward block; rows longer than 4 x 1024
}

MOPT_CUDA_TEST(rms_norm_bf16_matches_cpu) {
    check_rms_norm<bf16>(37, 1000);
    check_rms_norm<bf16>(300, 2049);
}

MOPT_CUDA_TEST(layer_norm_f32_matches_cpu) {
    check_layer_norm<float>(5, 64);
    check_layer_norm<float>(37, 1000);
    check_layer_norm<float>(600, 4999);
    check_layer_norm<float>(3, 13000);  // 104 KB of partial sums: the shared-memory opt-in path
}

MOPT_CUDA_TEST(layer_norm_bf16_matches_cpu) {
    check_layer_norm<bf16>(37, 1000);
    check_layer_norm<bf16>(300, 2049);
}

MOPT_CUDA_TEST(norm_rejects_mismatched_arguments) {
    cuda::DeviceArray<float> buf(16);
    CUDA_CHECK(throws_mopt_error([&] {
                   cuda::rms_norm_forward(buf.data(), buf.data(), buf.data(), buf.data(), 2, 0);
               }),
               "d = 0 was accepted");
    CUDA_CHECK(throws_mopt_error([&] {
                   cuda::layer_norm_backward(buf.data(), buf.data(), nullptr, buf.data(), buf.data(), buf.data(),
                                             buf.data(), buf.data(), 2, 8);
               }),
               "a null saved mean was accepted");
}

// ---------------------------------------------------------------------------------------------
// RoPE

namespace {

// head_dim 18 (9 pairs per head, odd) takes one pair per thread; 64 (half style) 16-byte vectors.
template <class T>
void check_rope(bool interleaved, std::int64_t start_pos, float theta, std::int64_t head_dim = 18) {
    const std::int64_t batch = 2, seq = 5, heads = 3;
    const std::int64_t n = batch * seq * heads * head_dim;
    const std::string what = std::string("rope ") + type_name<T>() + (interleaved ? " interleaved" : " half") +
                             " start_pos " + std::to_string(start_pos) + " head_dim " + std::to_string(head_dim);
    const Floats x = representable<T>(random_floats(n, 1.0f, 41));
    const Floats dy = representable<T>(random_floats(n, 1.0f, 42));
    const Floats want = ref::rope_forward(x, batch, seq, heads, head_dim, theta, start_pos, interleaved);
    const Floats want_dx = ref::rope_backward(x, dy, batch, seq, heads, head_dim, theta, start_pos, interleaved);

    const cuda::RopeStyle style = interleaved ? cuda::RopeStyle::interleaved : cuda::RopeStyle::half;
    cuda::DeviceArray<float> table(2 * seq * (head_dim / 2));
    cuda::rope_table(table.data(), seq, head_dim, theta, start_pos);
    auto dx_in = to_device<T>(x);
    auto ddy = to_device<T>(dy);
    cuda::DeviceArray<T> y(n), dx(n);
    cuda::rope_forward(dx_in.data(), y.data(), table.data(), batch, seq, heads, head_dim, style);
    cuda::rope_backward(ddy.data(), dx.data(), table.data(), batch, seq, heads, head_dim, style);
    // In place: y over x.
    cuda::rope_forward(dx_in.data(), dx_in.data(), table.data(), batch, seq, heads, head_dim, style);
    sync("rope");
    EXPECT_CLOSE(to_host(y), want, tolerance<T>(), what + " y");
    EXPECT_CLOSE(to_host(dx), want_dx, tolerance<T>(), what + " dx");
    EXPECT_CLOSE(to_host(dx_in), want, tolerance<T>(), what + " y in place");
}

}  // namespace

MOPT_CUDA_TEST(rope_f32_matches_cpu_half_and_interleaved) {
    for (bool interleaved : {false, true}) {
        check_rope<float>(interleaved, 0, 10000.0f);
        check_rope<float>(interleaved, 7, 10000.0f);
        check_rope<float>(interleaved, 4093, 500000.0f);  // large angles: the table is built in double
        check_rope<float>(interleaved, 7, 10000.0f, 64);
    }
}

MOPT_CUDA_TEST(rope_bf16_matches_cpu_half_and_interleaved) {
    for (bool interleaved : {false, true}) {
        check_rope<bf16>(interleaved, 7, 10000.0f);
        check_rope<bf16>(interleaved, 7, 10000.0f, 64);
    }
}

// ---------------------------------------------------------------------------------------------
// Activations

namespace {

// Random values plus the tails where the formulas have special cases (GELU's clip at |x| = 10,
// SiLU's overflowing e^−x).
Floats activation_inputs(std::size_t n, unsigned seed) {
    Floats x = random_floats(n, 3.0f, seed);
    const float tails[] = {0.0f, 10.5f, -10.5f, 25.0f, -25.0f, 95.0f, -95.0f, 1e-3f};
    for (std::size_t i = 0; i < std::size(tails); ++i) x[i * 97] = tails[i];
    return x;
}

template <class T>
void check_activations() {
    const std::size_t n = 10007;
    const Floats x = representable<T>(activation_inputs(n, 51));
    const Floats dy = representable<T>(random_floats(n, 1.0f, 52));
    auto dx_in = to_device<T>(x);
    auto ddy = to_device<T>(dy);
    cuda::DeviceArray<T> y(n), dx(n);
    const std::pair<cuda::Activation, ref::Act> kinds[] = {{cuda::Activation::relu, ref::Act::relu},
                                                           {cuda::Activation::gelu, ref::Act::gelu},
                                                           {cuda::Activation::silu, ref::Act::silu}};
    const char* names[] = {"relu", "gelu", "silu"};
    for (int f = 0; f < 3; ++f) {
        const std::string what = std::string(names[f]) + " " + type_name<T>();
        cuda::activation_forward(kinds[f].first, dx_in.data(), y.data(), n);
        cuda::activation_backward(kinds[f].first, dx_in.data(), ddy.data(), dx.data(), n);
        sync("activation");
        EXPECT_CLOSE(to_host(y), ref::activation_forward(kinds[f].second, x), tolerance<T>(), what + " y");
        EXPECT_CLOSE(to_host(dx), ref::activation_backward(kinds[f].second, x, dy), tolerance<T>(), what + " dx");
    }

    const Floats up = representable<T>(random_floats(n, 1.0f, 53));
    auto dup = to_device<T>(up);
    // m = n (prime: one value per thread) and m = 10000 (16-byte vectors), the first m values
    for (const std::size_t m : {n, std::size_t{10000}}) {
        const std::string what = std::string("swiglu ") + type_name<T>() + " n " + std::to_string(m);
        const Floats x_m(x.begin(), x.begin() + m), up_m(up.begin(), up.begin() + m), dy_m(dy.begin(), dy.begin() + m);
        cuda::DeviceArray<T> y_m(m), d_gate(m), d_up(m), d_up_only(m);
        cuda::swiglu_forward(dx_in.data(), dup.data(), y_m.data(), m);
        cuda::swiglu_backward(dx_in.data(), dup.data(), ddy.data(), d_gate.data(), d_up.data(), m);
        cuda::swiglu_backward(dx_in.data(), dup.data(), ddy.data(), static_cast<T*>(nullptr), d_up_only.data(), m);
        sync("swiglu");
        const ref::SwigluGrads want = ref::swiglu_backward(x_m, up_m, dy_m);
        EXPECT_CLOSE(to_host(y_m), ref::swiglu_forward(x_m, up_m), tolerance<T>(), what + " y");
        EXPECT_CLOSE(to_host(d_gate), want.d_gate, tolerance<T>(), what + " d_gate");
        EXPECT_CLOSE(to_host(d_up), want.d_up, tolerance<T>(), what + " d_up");
        EXPECT_CLOSE(to_host(d_up_only), want.d_up, tolerance<T>(), what + " d_up (no d_gate)");
    }

    // Packed [rows, 2·width] gate|up (the fused projection's output), the gradients written in place;
    // width 103 takes one value per thread, 104 16-byte vectors.
    for (const std::size_t width : {std::size_t{103}, std::size_t{104}}) {
        const std::size_t rows = 96, m = rows * width;
        const std::string what = std::string("swiglu packed ") + type_name<T>() + " width " + std::to_string(width);
        Floats packed(2 * m);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < width; ++c) {
                packed[r * 2 * width + c] = x[r * width + c];
                packed[r * 2 * width + width + c] = up[r * width + c];
            }
        const Floats gate_m(x.begin(), x.begin() + m), up_m(up.begin(), up.begin() + m),
            dy_m(dy.begin(), dy.begin() + m);
        auto dpacked = to_device<T>(packed);
        auto ddy_m = to_device<T>(dy_m);
        cuda::DeviceArray<T> y_packed(m);
        cuda::swiglu_forward_packed(dpacked.data(), y_packed.data(), rows, width);
        cuda::swiglu_backward_packed(dpacked.data(), ddy_m.data(), dpacked.data(), rows, width);
        sync("swiglu packed");
        const ref::SwigluGrads want_m = ref::swiglu_backward(gate_m, up_m, dy_m);
        Floats want_packed(2 * m);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < width; ++c) {
                want_packed[r * 2 * width + c] = want_m.d_gate[r * width + c];
                want_packed[r * 2 * width + width + c] = want_m.d_up[r * width + c];
            }
        EXPECT_CLOSE(to_host(y_packed), ref::swiglu_forward(gate_m, up_m), tolerance<T>(), what + " y");
        EXPECT_CLOSE(to_host(dpacked), want_packed, tolerance<T>(), what + " d_gate|d_up (in place)");
    }
}

}  // namespace

MOPT_CUDA_TEST(activations_f32_match_cpu) { check_activations<float>(); }
MOPT_CUDA_TEST(activations_bf16_match_cpu) { check_activations<bf16>(); }

// ---------------------------------------------------------------------------------------------
// Cross-entropy

namespace {

template <class T>
void check_cross_entropy(std::int64_t rows, std::int64_t vocab, const std::vector<std::int32_t>& targets) {
    const std::int32_t ignore = -100;
    const std::string what = std::string("cross_entropy ") + type_name<T>() + " [" + std::to_string(rows) + ", " +
                             std::to_string(vocab) + "]";
    Floats logits = random_floats(rows * vocab, 3.0f, 61);
    for (std::int64_t r = 0; r < rows; ++r)  // rows far from zero: the max shift must keep exp finite
        for (std::int64_t j = 0; j < vocab; ++j) logits[r * vocab + j] += 40.0f * static_cast<float>(r % 3) - 40.0f;
    logits = representable<T>(logits);
    const ref::CrossEntropy want = ref::cross_entropy(logits, targets, rows, vocab, ignore);

    auto d_logits = to_device<T>(logits);
    auto d_targets = cuda::DeviceArray<std::int32_t>(rows);
    d_targets.upload(targets);
    cuda::DeviceArray<float> loss(1), row_loss(rows);

    // Evaluation: loss and per-row losses, logits untouched.
    cuda::cross_entropy(d_logits.data(), d_targets.data(), loss.data(), rows, vocab,
                        {.ignore_index = ignore, .write_dlogits = false, .row_loss = row_loss.data()});
    sync("cross_entropy (no dlogits)");
    const Floats eval_loss = to_host(loss);
    EXPECT_CLOSE(eval_loss, one(want.loss), 1e-4, what + " loss");
    CUDA_CHECK(to_host(d_logits) == logits, what, ": write_dlogits = false changed the logits");
    const Floats per_row = to_host(row_loss);
    double mean = 0.0;
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        if (targets[r] == ignore) CUDA_CHECK(per_row[r] == 0.0f, what, ": ignored row ", r, " has loss ", per_row[r]);
        else ++count;
        mean += per_row[r];
    }
    const float mean_f = static_cast<float>(mean / static_cast<double>(count));
    EXPECT_CLOSE(one(mean_f), one(want.loss), 1e-4, what + " mean of the row losses");

    // Training: the same loss and dlogits written over the logits, scaled by the upstream gradient.
    const float dloss = 0.5f;
    cuda::cross_entropy(d_logits.data(), d_targets.data(), loss.data(), rows, vocab,
                        {.ignore_index = ignore, .dloss = dloss});
    sync("cross_entropy");
    EXPECT_CLOSE(to_host(loss), one(want.loss), 1e-4, what + " loss (with dlogits)");
    Floats want_grad = want.dlogits;
    for (float& g : want_grad) g *= dloss;
    const Floats grad = to_host(d_logits);
    EXPECT_CLOSE(grad, want_grad, tolerance<T>(), what + " dlogits");
    for (std::int64_t r = 0; r < rows; ++r)
        if (targets[r] == ignore)
            for (std::int64_t j = 0; j < vocab; ++j)
                CUDA_CHECK(grad[r * vocab + j] == 0.0f, what, ": ignored row ", r, " has gradient ",
                           grad[r * vocab + j]);
}

}  // namespace

MOPT_CUDA_TEST(cross_entropy_f32_large_vocab_with_ignored_rows) {
    check_cross_entropy<float>(7, 32000, {5, -100, 0, 31999, 123, -100, 17000});
    check_cross_entropy<float>(4, 50, {49, 0, -100, 7});  // a vocabulary smaller than a warp's 4 x 32
}

MOPT_CUDA_TEST(cross_entropy_bf16_large_vocab_with_ignored_rows) {
    check_cross_entropy<bf16>(7, 32000, {5, -100, 0, 31999, 123, -100, 17000});
}

MOPT_CUDA_TEST(cross_entropy_invalid_targets_give_nan) {
    const std::int64_t rows = 3, vocab = 100;
    auto logits = to_device<float>(random_floats(rows * vocab, 1.0f, 71));
    cuda::DeviceArray<std::int32_t> targets(rows);
    cuda::DeviceArray<float> loss(1);
    // A target outside [0, vocab) that is not ignore_index.
    targets.upload(std::vector<std::int32_t>{3, 100, 5});
    cuda::cross_entropy(logits.data(), targets.data(), loss.data(), rows, vocab);
    sync("cross_entropy (bad target)");
    CUDA_CHECK(std::isnan(to_host(loss)[0]), "target 100 with vocab 100 gave loss ", to_host(loss)[0]);
    // Every target ignored: the mean over no targets.
    targets.upload(std::vector<std::int32_t>{-1, -1, -1});
    cuda::cross_entropy(logits.data(), targets.data(), loss.data(), rows, vocab, {.ignore_index = -1});
    sync("cross_entropy (all ignored)");
    CUDA_CHECK(std::isnan(to_host(loss)[0]), "all targets ignored gave loss ", to_host(loss)[0]);
}
