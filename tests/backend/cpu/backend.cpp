#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <mopt/mopt.hpp>
#include <vector>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::backend::cpu;
using mopt::test::random_tensor;

TEST_CASE("gemm: OpenBLAS at top level and Eigen inside a parallel region agree with a naive loop", "[backend]") {
    const std::int64_t m = 37, n = 29, k = 41;  // odd sizes exercise the kernels' edges
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            Tensor a = random_tensor(ta ? Shape{k, m} : Shape{m, k}, 3), b = random_tensor(tb ? Shape{n, k} : Shape{k, n}, 4);
            Tensor c0 = random_tensor({m, n}, 5);
            Tensor blas = c0.clone(), eigen = c0.clone();
            GemmArgs g{.trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k, .alpha = 0.5f, .beta = 2.0f, .a = a.f32(),
                       .lda = a.dim(1), .b = b.f32(), .ldb = b.dim(1), .c = blas.f32(), .ldc = n};
            gemm(g);
            g.c = eigen.f32();
#pragma omp parallel num_threads(2)
            {
#pragma omp single
                gemm(g);
            }
            for (std::int64_t i = 0; i < m; ++i)
                for (std::int64_t j = 0; j < n; ++j) {
                    double ref = 2.0 * c0.at(i * n + j);
                    for (std::int64_t q = 0; q < k; ++q)
                        ref += 0.5 * (ta ? a.at(q * m + i) : a.at(i * k + q)) * (tb ? b.at(j * k + q) : b.at(q * n + j));
                    REQUIRE(blas.at(i * n + j) == Approx(ref).margin(1e-4));
                    REQUIRE(eigen.at(i * n + j) == Approx(ref).margin(1e-4));
                }
        }
}

TEST_CASE("parallel_for and parallel_chunks visit every index exactly once", "[backend]") {
    for (std::int64_t n : {0, 1, 7, 100000}) {
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        parallel_for(n, 1000, [&](std::int64_t i) { hits[static_cast<std::size_t>(i)]++; });
        for (auto& h : hits) REQUIRE(h.load() == 1);
        std::vector<std::atomic<int>> chunk_hits(static_cast<std::size_t>(n));
        parallel_chunks(n, [&](std::int64_t b, std::int64_t e) {
            for (std::int64_t i = b; i < e; ++i) chunk_hits[static_cast<std::size_t>(i)]++;
        });
        for (auto& h : chunk_hits) REQUIRE(h.load() == 1);
    }
}

TEST_CASE("vectorised exp and softmax rows match std::exp", "[backend]") {
    Tensor x = random_tensor({1000}, 9, -30.0f, 30.0f);
    Tensor y = x.clone();
    const float shift = 30.0f;
    const float sum = exp_shifted(y.f32(), y.numel(), shift);
    double ref_sum = 0.0;
    for (std::int64_t i = 0; i < x.numel(); ++i) {
        const double ref = std::exp(static_cast<double>(x.at(i)) - shift);
        ref_sum += ref;
        REQUIRE(y.at(i) == Approx(ref).epsilon(1e-5).margin(1e-30));
    }
    REQUIRE(sum == Approx(ref_sum).epsilon(1e-5));
    Tensor row = Tensor::from({3}, std::vector<float>{1e4f, 1e4f + 1.0f, -1e4f});
    softmax_row(row.f32(), 3);
    REQUIRE(row.at(0) == Approx(1.0 / (1.0 + std::exp(1.0))));
    REQUIRE(row.at(2) == 0.0f);
}

TEST_CASE("blas_diagnostic names the kernel OpenBLAS chose", "[backend]") {
    REQUIRE_FALSE(blas_core().empty());
    const std::string d = blas_diagnostic();
    if (!d.empty()) REQUIRE_THAT(d, Catch::Contains("OPENBLAS_CORETYPE"));
}
