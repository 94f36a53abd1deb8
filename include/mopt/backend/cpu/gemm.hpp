#pragma once
// GEMM on the CPU: C = alpha * op(A) op(B) + beta * C over row-major Eigen maps. At top level the
// product goes to OpenBLAS (multi-threaded sgemm); inside an OpenMP region (per-head attention
// products run one per thread) it uses Eigen's own single-threaded kernel, because a pthreads
// OpenBLAS must not be re-entered from many threads at once.
#include <cblas.h>

#include <string>
#include <string_view>

#include "mopt/backend/cpu/parallel.hpp"
#include "mopt/tensor/eigen.hpp"

namespace mopt::backend::cpu {

struct GemmArgs {
    bool trans_a = false, trans_b = false;
    std::int64_t m = 0, n = 0, k = 0;  // C is [m, n]; op(A) is [m, k]; op(B) is [k, n]
    float alpha = 1.0f, beta = 0.0f;
    const float* a = nullptr;
    std::int64_t lda = 0;
    const float* b = nullptr;
    std::int64_t ldb = 0;
    float* c = nullptr;
    std::int64_t ldc = 0;
};

namespace detail {
template <class A, class B>
void eigen_product(const GemmArgs& g, const A& a, const B& b) {
    auto c = matrix(g.c, g.m, g.n, g.ldc);
    if (g.beta == 0.0f) {
        c.noalias() = g.alpha * (a * b);
    } else {
        if (g.beta != 1.0f) c *= g.beta;
        c.noalias() += g.alpha * (a * b);
    }
}
}  // namespace detail

// The kernel OpenBLAS picked when it loaded (e.g. "SkylakeX", "Haswell", "Zen").
[[nodiscard]] inline std::string blas_core() {
    const char* name = openblas_get_corename();
    return name ? name : "unknown";
}

// Empty, or a warning when OpenBLAS runs an older kernel than the CPU supports. Virtual machines
// that hide the CPU model can make its run-time detection fall back to a pre-AVX2 core, which
// measured 5x slower GEMMs; OPENBLAS_CORETYPE (set before the program starts) overrides it.
[[nodiscard]] inline std::string blas_diagnostic() {
#if defined(__x86_64__) && defined(__GNUC__)
    const std::string core = blas_core();
    bool old = false;
    for (std::string_view legacy : {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Barcelona",
                                    "Opteron", "Sandybridge", "Bobcat", "Bulldozer", "Piledriver", "Katmai"})
        old = old || core.find(legacy) != std::string::npos;
    if (old && __builtin_cpu_supports("avx2")) {
        const char* suggest = __builtin_cpu_supports("avx512f") ? "SkylakeX" : "Haswell";
        return "OpenBLAS chose the '" + core + "' kernel on a CPU with AVX2" +
               (__builtin_cpu_supports("avx512f") ? std::string("/AVX-512") : std::string()) +
               "; set OPENBLAS_CORETYPE=" + suggest + " before starting the program for full GEMM speed";
    }
#endif
    return {};
}

inline void gemm(const GemmArgs& g) {
    if (g.m == 0 || g.n == 0) return;
    if (g.k == 0) {
        auto c = matrix(g.c, g.m, g.n, g.ldc);
        if (g.beta == 0.0f) c.setZero(); else c *= g.beta;
        return;
    }
    if (!in_parallel_region()) {
        cblas_sgemm(CblasRowMajor, g.trans_a ? CblasTrans : CblasNoTrans, g.trans_b ? CblasTrans : CblasNoTrans,
                    static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(g.k), g.alpha, g.a,
                    static_cast<int>(g.lda), g.b, static_cast<int>(g.ldb), g.beta, g.c, static_cast<int>(g.ldc));
        return;
    }
    const auto a = g.trans_a ? matrix(g.a, g.k, g.m, g.lda) : matrix(g.a, g.m, g.k, g.lda);
    const auto b = g.trans_b ? matrix(g.b, g.n, g.k, g.ldb) : matrix(g.b, g.k, g.n, g.ldb);
    if (g.trans_a && g.trans_b) detail::eigen_product(g, a.transpose(), b.transpose());
    else if (g.trans_a) detail::eigen_product(g, a.transpose(), b);
    else if (g.trans_b) detail::eigen_product(g, a, b.transpose());
    else detail::eigen_product(g, a, b);
}

}  // namespace mopt::backend::cpu
