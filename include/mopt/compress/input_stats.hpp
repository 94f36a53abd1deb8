#pragma once
// InputStats: calibration statistics of the INPUT activations of one linear layer y = x Wᵀ, seen as
// rows x of length `in` (tokens of a calibration set). What the data-aware compressors need:
//
//   XᵀX            (double, [in, in])  → the layer Hessian of SparseGPT / GPTQ:
//                                         H = 2/n XᵀX, dead inputs (H_ii = 0) set to H_ii = 1,
//                                         then H += λ · mean(diag H) · I   (Frantar et al. 2022/2023)
//   ‖X_j‖₂ = √Σx²   per input column    → Wanda's saliency |W_ij| · ‖X_j‖₂ (Sun et al. 2023)
//   max |X_j|       per input column    → LLM.int8()'s outlier columns (Dettmers et al. 2022)
//
// Batches are added with add(); statistics of several shards (threads, processes) combine with
// merge(). XᵀX of each batch is one f32 GEMM (chunks of at most 4096 rows), accumulated in double.
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/backend/cpu/gemm.hpp"
#include "mopt/error.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::compress {

class InputStats {
public:
    explicit InputStats(std::int64_t in) : in_(in) {
        check(in > 0, "InputStats: the input width must be positive, got ", in);
        const auto n = static_cast<std::size_t>(in);
        xtx_.assign(n * n, 0.0);
        sumsq_.assign(n, 0.0);
        absmax_.assign(n, 0.0f);
    }

    // Adds `rows` rows of length in() stored contiguously at x.
    void add(const float* x, std::int64_t rows) {
        check(rows >= 0, "InputStats::add: negative row count ", rows);
        if (rows == 0) return;
        check(x != nullptr, "InputStats::add: null data for ", rows, " rows");
        constexpr std::int64_t chunk = 4096;
        Tensor part = Tensor::empty({in_, in_});
        for (std::int64_t r0 = 0; r0 < rows; r0 += chunk) {
            const std::int64_t n = std::min(chunk, rows - r0);
            const float* xs = x + r0 * in_;
            backend::cpu::gemm({.trans_a = true, .trans_b = false, .m = in_, .n = in_, .k = n, .alpha = 1.0f,
                                .beta = 0.0f, .a = xs, .lda = in_, .b = xs, .ldb = in_, .c = part.f32(), .ldc = in_});
            const float* p = part.f32();
            for (std::size_t i = 0; i < xtx_.size(); ++i) xtx_[i] += static_cast<double>(p[i]);
            for (std::int64_t r = 0; r < n; ++r)
                for (std::int64_t j = 0; j < in_; ++j) {
                    const float v = xs[r * in_ + j];
                    sumsq_[static_cast<std::size_t>(j)] += static_cast<double>(v) * v;
                    absmax_[static_cast<std::size_t>(j)] = std::max(absmax_[static_cast<std::size_t>(j)], std::fabs(v));
                }
        }
        rows_ += rows;
    }
    // Adds a tensor [..., in] (every leading index is a row).
    void add(const Tensor& x) {
        check(x.dtype() == DType::f32 && x.rank() >= 1 && x.shape().back() == in_, "InputStats::add: activations of shape ",
              x.shape(), " ", name(x.dtype()), " do not have rows of length ", in_);
        add(x.f32(), x.shape().rows());
    }
    void merge(const InputStats& other) {
        check(other.in_ == in_, "InputStats::merge: statistics of width ", other.in_, " into width ", in_);
        for (std::size_t i = 0; i < xtx_.size(); ++i) xtx_[i] += other.xtx_[i];
        for (std::size_t j = 0; j < sumsq_.size(); ++j) {
            sumsq_[j] += other.sumsq_[j];
            absmax_[j] = std::max(absmax_[j], other.absmax_[j]);
        }
        rows_ += other.rows_;
    }

    [[nodiscard]] std::int64_t in() const { return in_; }
    [[nodiscard]] std::int64_t rows() const { return rows_; }

    // ‖X_j‖₂ over all rows seen.
    [[nodiscard]] std::vector<float> column_norms() const {
        std::vector<float> n(sumsq_.size());
        for (std::size_t j = 0; j < n.size(); ++j) n[j] = static_cast<float>(std::sqrt(sumsq_[j]));
        return n;
    }
    // max |X_j| over all rows seen.
    [[nodiscard]] std::vector<float> column_absmax() const { return absmax_; }
    // Inputs that were exactly zero in every row seen (XᵀX_jj = 0).
    [[nodiscard]] std::vector<bool> dead_columns() const {
        std::vector<bool> dead(static_cast<std::size_t>(in_));
        for (std::int64_t j = 0; j < in_; ++j) dead[static_cast<std::size_t>(j)] = sumsq_[static_cast<std::size_t>(j)] == 0.0;
        return dead;
    }

    // H = 2/n XᵀX with dead inputs at H_ii = 1, plus damp_ratio · mean(diag H) · I, in double.
    [[nodiscard]] Eigen::MatrixXd hessian_f64(double damp_ratio = 0.01) const {
        check(rows_ > 0, "InputStats::hessian: no calibration rows were added");
        check(damp_ratio >= 0.0 && std::isfinite(damp_ratio), "InputStats::hessian: damping ratio ", damp_ratio,
              " must be finite and >= 0");
        Eigen::MatrixXd h(in_, in_);
        const double s = 2.0 / static_cast<double>(rows_);
        for (std::int64_t i = 0; i < in_; ++i)
            for (std::int64_t j = 0; j < in_; ++j) h(i, j) = s * xtx_[static_cast<std::size_t>(i * in_ + j)];
        for (std::int64_t i = 0; i < in_; ++i)
            if (h(i, i) == 0.0) h(i, i) = 1.0;
        const double damp = damp_ratio * h.diagonal().mean();
        h.diagonal().array() += damp;
        return h;
    }
    // The same Hessian as an f32 tensor [in, in].
    [[nodiscard]] Tensor hessian(double damp_ratio = 0.01) const {
        const Eigen::MatrixXd h = hessian_f64(damp_ratio);
        Tensor t = Tensor::empty({in_, in_});
        float* p = t.f32();
        for (std::int64_t i = 0; i < in_; ++i)
            for (std::int64_t j = 0; j < in_; ++j) p[i * in_ + j] = static_cast<float>(h(i, j));
        return t;
    }

private:
    std::int64_t in_ = 0, rows_ = 0;
    std::vector<double> xtx_, sumsq_;
    std::vector<float> absmax_;
};

// Checks that `stats` exists and describes inputs of width `in` (the layer's row length).
inline const InputStats& require_stats(const InputStats* stats, std::int64_t in, const std::string& what,
                                       const char* method) {
    check(stats != nullptr, what, ": ", method, " needs calibration statistics of the layer inputs (InputStats)");
    check(stats->in() == in, what, ": calibration statistics have width ", stats->in(), " but the weight has ", in,
          " input columns");
    check(stats->rows() > 0, what, ": calibration statistics for ", method, " hold no rows");
    return *stats;
}

}  // namespace mopt::compress
