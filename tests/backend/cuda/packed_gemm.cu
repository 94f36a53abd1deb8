// cuda/packed_gemm.cuh against the CPU: every packed format the GPU reads (int8 per row, int8 with
// LLM.int8() outlier columns, int4 group 128, int3, int2 group 32, int6 through the generic-width
// path, N:M 2:4 and 4:8), built by the CPU's own packers (PackedWeight::quantized / ::nm, as
// tests/compress/packed.cpp builds them), uploaded, and both products checked against the dense
// reference computed on the host in double from PackedWeight::dequantize_rows:
//
//   forward   y  = x · Ŵᵀ        (beta 0 over a NaN-filled y: the output is overwritten)
//   backward  dx = dx0 + dy · Ŵ  (beta 1: accumulates as compress::matmul_backward does)
//
// Rows 1 and 5 (the few-rows kernel of the forward), 37 and 130 (one and three row tiles of the tiled
// kernel), in / out not multiples of the 64 × 32 tiles.
// Tolerances (normwise, cuda_test.cuh): f32 1e-5 (the GPU dequantises bit-exactly as the CPU, only
// the f32 summation order differs), bf16 1e-2 (inputs bf16-representable for both sides; the
// output's rounding is 2^-9).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <mopt/backend/cuda/packed_gemm.cuh>
#include <mopt/compress/packed_weight.hpp>

#include "../../compress/packed_data.hpp"
#include "cuda_test.cuh"

namespace {

namespace cuda = mopt::backend::cuda;
namespace compress = mopt::compress;
using bf16 = __nv_bfloat16;
using Floats = std::vector<float>;

Floats random_floats(std::size_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> dist(lo, hi);
    Floats v(n);
    for (float& x : v) x = dist(rng);
    return v;
}

using mopt::test::packed::nm_matrix;
using mopt::test::packed::random_codes;

using mopt::cuda_test::representable;
using mopt::cuda_test::to_device;
using mopt::cuda_test::to_host;

template <class T>
constexpr double tolerance() {
    return std::is_same_v<T, bf16> ? 1e-2 : 1e-5;
}
using mopt::cuda_test::type_name;

// Both products of one weight for T and `rows`, against the double reference.
template <class T>
void check_products(const compress::PackedWeight& w, const cuda::DevicePackedWeight& dw, std::int64_t rows,
                    unsigned seed) {
    const std::int64_t out = w.out(), in = w.in();
    Floats dense(static_cast<std::size_t>(out * in));
    w.dequantize_rows(0, out, dense.data());
    const std::string what = w.format() + " [" + std::to_string(out) + ", " + std::to_string(in) + "] " +
                             type_name<T>() + " rows " + std::to_string(rows);

    // forward over a NaN-filled y (beta 0 must overwrite it)
    const Floats x = representable<T>(random_floats(static_cast<std::size_t>(rows * in), seed));
    Floats want_y(static_cast<std::size_t>(rows * out));
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t o = 0; o < out; ++o) {
            double s = 0;
            for (std::int64_t c = 0; c < in; ++c)
                s += double(x[static_cast<std::size_t>(r * in + c)]) * dense[static_cast<std::size_t>(o * in + c)];
            want_y[static_cast<std::size_t>(r * out + o)] = static_cast<float>(s);
        }
    auto dx_in = to_device<T>(x);
    auto dy_out = to_device<T>(Floats(want_y.size(), std::numeric_limits<float>::quiet_NaN()));
    cuda::packed_matmul<T>(dw, dx_in.data(), rows, in, dy_out.data());
    CUDA_CHECK_CLOSE(to_host(dy_out), want_y, tolerance<T>(), what + " forward");

    // backward, accumulating (beta 1) into a random dx0
    const Floats dy = representable<T>(random_floats(static_cast<std::size_t>(rows * out), seed + 7));
    const Floats dx0 = representable<T>(random_floats(static_cast<std::size_t>(rows * in), seed + 8));
    Floats want_dx(dx0.size());
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 0; c < in; ++c) {
            double s = dx0[static_cast<std::size_t>(r * in + c)];
            for (std::int64_t o = 0; o < out; ++o)
                s += double(dy[static_cast<std::size_t>(r * out + o)]) * dense[static_cast<std::size_t>(o * in + c)];
            want_dx[static_cast<std::size_t>(r * in + c)] = static_cast<float>(s);
        }
    auto d_dy = to_device<T>(dy);
    auto d_dx = to_device<T>(dx0);
    cuda::packed_matmul_backward<T>(dw, d_dy.data(), rows, out, d_dx.data(), 1.0f);
    CUDA_CHECK_CLOSE(to_host(d_dx), want_dx, tolerance<T>(), what + " backward (beta 1)");

    // backward with beta 0 (over NaN) and forward with beta 0.5, at 5 rows (the few-rows forward) and 37
    if (rows != 5 && rows != 37) return;
    auto d_dx2 = to_device<T>(Floats(dx0.size(), std::numeric_limits<float>::quiet_NaN()));
    cuda::packed_matmul_backward<T>(dw, d_dy.data(), rows, out, d_dx2.data());
    Floats want_dx2(want_dx.size());
    for (std::size_t i = 0; i < want_dx.size(); ++i) want_dx2[i] = static_cast<float>(double(want_dx[i]) - dx0[i]);
    CUDA_CHECK_CLOSE(to_host(d_dx2), want_dx2, tolerance<T>(), what + " backward (beta 0)");
    const Floats y0 = representable<T>(random_floats(want_y.size(), seed + 9));
    auto d_y0 = to_device<T>(y0);
    cuda::packed_matmul<T>(dw, dx_in.data(), rows, in, d_y0.data(), 0.5f);
    Floats want_y0(want_y.size());
    for (std::size_t i = 0; i < want_y.size(); ++i) want_y0[i] = static_cast<float>(double(want_y[i]) + 0.5 * y0[i]);
    CUDA_CHECK_CLOSE(to_host(d_y0), want_y0, tolerance<T>(), what + " forward (beta 0.5)");
}

void check_format(const compress::PackedWeight& w, unsigned seed) {
    const cuda::DevicePackedWeight dw = cuda::DevicePackedWeight::upload(w);
    CUDA_CHECK(dw.format() == w.format() && dw.out() == w.out() && dw.in() == w.in(), "uploaded ", dw.format(), " [",
               dw.out(), ", ", dw.in(), "] from ", w.format());
    for (std::int64_t rows : {1, 5, 37, 130}) {
        check_products<float>(w, dw, rows, seed + static_cast<unsigned>(rows));
        check_products<bf16>(w, dw, rows, seed + 1000 + static_cast<unsigned>(rows));
    }
}

compress::PackedWeight quantized(std::int64_t out, std::int64_t in, int bits, std::int64_t group, unsigned seed,
                                 std::vector<std::int32_t> outlier_cols = {}) {
    return compress::PackedWeight::quantized(random_codes(out, in, bits, group, seed, std::move(outlier_cols)));
}

}  // namespace

MOPT_CUDA_TEST(packed_gemm_int8_per_row) { check_format(quantized(77, 200, 8, 200, 11), 1); }

MOPT_CUDA_TEST(packed_gemm_int8_outlier_columns) {
    check_format(quantized(77, 200, 8, 200, 12, {0, 3, 17, 64, 199}), 2);
}

MOPT_CUDA_TEST(packed_gemm_int4_group128_zero_points) { check_format(quantized(77, 384, 4, 128, 13), 3); }

MOPT_CUDA_TEST(packed_gemm_int4_group64_and_int3_group50) {
    check_format(quantized(65, 192, 4, 64, 14), 4);
    check_format(quantized(70, 150, 3, 50, 15), 5);
    check_format(quantized(33, 150, 3, 150, 16), 6);  // whole-row group
}

MOPT_CUDA_TEST(packed_gemm_int2_group32) { check_format(quantized(90, 96, 2, 32, 17), 7); }

MOPT_CUDA_TEST(packed_gemm_int6_generic_width) { check_format(quantized(41, 72, 6, 24, 18, {5}), 8); }

MOPT_CUDA_TEST(packed_gemm_nm_2_4) {
    check_format(compress::PackedWeight::nm(nm_matrix(77, 100, 2, 4, 19), 2, 4), 9);
}

MOPT_CUDA_TEST(packed_gemm_nm_4_8_and_1_3) {
    check_format(compress::PackedWeight::nm(nm_matrix(66, 104, 4, 8, 20), 4, 8), 10);
    check_format(compress::PackedWeight::nm(nm_matrix(20, 99, 1, 3, 21), 1, 3), 11);   // odd M: groups straddle tiles
    check_format(compress::PackedWeight::nm(nm_matrix(9, 160, 60, 80, 22), 60, 80), 12);  // wide groups
}

MOPT_CUDA_TEST(packed_gemm_refuses_bad_inputs) {
    using mopt::cuda_test::error_of;
    // CSR has no GPU kernel
    Floats s = random_floats(12 * 40, 30);
    for (std::size_t i = 0; i < s.size(); i += 2) s[i] = 0.0f;
    const auto csr = compress::PackedWeight::sparse(mopt::Tensor::from({12, 40}, std::span<const float>(s)));
    std::string e = error_of([&] { (void)cuda::DevicePackedWeight::upload(csr); });
    CUDA_CHECK(e.find("csr") != std::string::npos && e.find("[12, 40]") != std::string::npos, "message: ", e);

    const auto dw = cuda::DevicePackedWeight::upload(quantized(10, 64, 4, 32, 31));
    cuda::DeviceArray<float> x(5 * 64), y(5 * 10);
    e = error_of([&] { cuda::packed_matmul<float>(dw, x.data(), 5, 63, y.data()); });
    CUDA_CHECK(e.find("packed_matmul") != std::string::npos && e.find("[5, 63]") != std::string::npos &&
                   e.find("int4 weight [10, 64]") != std::string::npos,
               "message: ", e);
    e = error_of([&] { cuda::packed_matmul_backward<float>(dw, y.data(), 5, 64, x.data()); });
    CUDA_CHECK(e.find("packed_matmul_backward") != std::string::npos && e.find("needs 10 columns") != std::string::npos,
               "message: ", e);
    e = error_of([&] { cuda::packed_matmul<float>(dw, x.data(), -1, 64, y.data()); });
    CUDA_CHECK(e.find("-1 rows") != std::string::npos, "message: ", e);
    e = error_of([&] { cuda::packed_matmul<float>(dw, nullptr, 5, 64, y.data()); });
    CUDA_CHECK(e.find("null") != std::string::npos, "message: ", e);
    e = error_of([&] { cuda::packed_matmul<float>(dw, x.data(), 5, 64, x.data()); });
    CUDA_CHECK(e.find("aliases") != std::string::npos, "message: ", e);
    e = error_of([&] { cuda::packed_matmul<float>(cuda::DevicePackedWeight{}, x.data(), 5, 64, y.data()); });
    CUDA_CHECK(e.find("empty") != std::string::npos, "message: ", e);
    // rows = 0 is a no-op, not an error
    CUDA_CHECK(error_of([&] { cuda::packed_matmul<float>(dw, nullptr, 0, 64, nullptr); }).empty(), "rows 0");
    // a corrupt PackedQuant (bits set in a row's padding) is refused at upload
    compress::PackedQuant q = std::get<compress::PackedQuant>(quantized(3, 40, 3, 40, 32).storage());
    q.qweight[static_cast<std::size_t>(q.words_per_row() - 1)] |= 0x80000000u;
    e = error_of([&] { (void)cuda::DevicePackedWeight::upload(q); });
    CUDA_CHECK(e.find("cuda::DevicePackedWeight::upload") != std::string::npos && e.find("padding") == std::string::npos &&
                   e.find("beyond") != std::string::npos,
               "message: ", e);
}
