#pragma once
// The inverse-Hessian factor that SparseGPT and GPTQ walk column by column: the upper Cholesky
// factor U of H⁻¹ (H⁻¹ = UᵀU). Row i of U holds, scaled by 1/U_ii, how the error of column i is
// spread over the later columns once columns < i are fixed (Frantar et al. 2022, §"Cholesky
// reformulation").
//
// Computed with one Cholesky and one triangular inverse: with J the index reversal, J H J = L Lᵀ
// gives H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), and U = J L⁻¹ J is upper triangular with a positive diagonal
// (Eigen LLT in double; the factor is returned in f32 for the column sweeps).
// H is damped by λ · mean(diag H) · I; when the factorisation fails (H not positive definite, or a
// pivot below 1e-10 · max H_ii) λ is multiplied by 10 (raised to at least 1e-4) and it retries, with
// a warning on stderr naming the layer.
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "mopt/compress/input_stats.hpp"
#include "mopt/error.hpp"

namespace mopt::compress {

namespace detail {
// U (row-major, f32) of the damped Hessian `h` (already damped), or empty when it is not
// numerically positive definite.
inline std::vector<float> try_inverse_cholesky_upper(const Eigen::MatrixXd& h) {
    const Eigen::Index n = h.rows();
    const Eigen::MatrixXd rev = h.reverse();  // J H J: rows and columns reversed
    Eigen::LLT<Eigen::MatrixXd> llt(rev);
    if (llt.info() != Eigen::Success) return {};
    const Eigen::MatrixXd& l = llt.matrixLLT();  // L in the lower triangle
    const double max_diag = h.diagonal().maxCoeff();
    for (Eigen::Index i = 0; i < n; ++i) {
        const double p = l(i, i) * l(i, i);
        if (!(p > 1e-10 * max_diag) || !std::isfinite(p)) return {};
    }
    // L⁻¹ by column blocks: block [j0, j0 + nb) of L⁻¹ is zero above row j0, so each solve only
    // needs the trailing triangle (n³/3 flops instead of n³ for a solve against the identity).
    Eigen::MatrixXd linv = Eigen::MatrixXd::Zero(n, n);
    constexpr Eigen::Index nb_max = 128;
    for (Eigen::Index j0 = 0; j0 < n; j0 += nb_max) {
        const Eigen::Index nb = std::min(nb_max, n - j0), m = n - j0;
        Eigen::MatrixXd rhs = Eigen::MatrixXd::Zero(m, nb);
        rhs.topRows(nb).setIdentity();
        l.bottomRightCorner(m, m).triangularView<Eigen::Lower>().solveInPlace(rhs);
        linv.block(j0, j0, m, nb) = rhs;
    }
    const Eigen::MatrixXd u = linv.reverse();  // J L⁻¹ J
    std::vector<float> out(static_cast<std::size_t>(n * n), 0.0f);
    for (Eigen::Index i = 0; i < n; ++i)
        for (Eigen::Index j = i; j < n; ++j) {
            const double v = u(i, j);
            if (!std::isfinite(v)) return {};
            out[static_cast<std::size_t>(i * n + j)] = static_cast<float>(v);
        }
    return out;
}
}  // namespace detail

// U of (H + damp · mean(diag H) · I)⁻¹ for an undamped Hessian `h` (dead inputs already at H_ii = 1),
// retrying with more damping when needed. `what` names the layer in the warning and the error.
inline std::vector<float> inverse_cholesky_upper(const Eigen::MatrixXd& h, double damp, const std::string& what) {
    check(damp >= 0.0 && std::isfinite(damp), what, ": damping ", damp, " must be finite and >= 0");
    check(h.allFinite(), what, ": the Hessian of the calibration inputs is not finite (NaN or Inf activations?)");
    const double mean_diag = h.diagonal().mean();
    constexpr int attempts = 8;
    for (int a = 0; a < attempts; ++a) {
        Eigen::MatrixXd hd = h;
        hd.diagonal().array() += damp * mean_diag;
        std::vector<float> u = detail::try_inverse_cholesky_upper(hd);
        if (!u.empty()) return u;
        const double next = std::max(damp * 10.0, 1e-4);
        if (a + 1 < attempts)
            std::cerr << "mopt: warning: " << what << ": Hessian is not positive definite with damping " << damp
                      << "; retrying with " << next << "\n";
        damp = next;
    }
    throw Error(mopt::detail::concat(what, ": the Hessian stays not positive definite after ", attempts,
                                    " damping increases (last ", damp, ")"));
}

}  // namespace mopt::compress
