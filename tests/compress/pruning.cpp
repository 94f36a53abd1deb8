// Pruning: exact zero counts per row, N:M patterns, the error ordering magnitude > Wanda > SparseGPT
// on correlated calibration data, and the errors/warnings on bad input and rank-deficient data.
#include <cmath>
#include <iostream>
#include <random>
#include <sstream>

#include <catch2/catch.hpp>

#include "calibration_data.hpp"

#include <mopt/compress/input_stats.hpp>
#include <mopt/compress/prune.hpp>
#include <mopt/tensor/eigen.hpp>

using mopt::Tensor;
using namespace mopt::compress;
using mopt::test::correlated_inputs;
using mopt::test::output_error;
using mopt::test::random_tensor;

namespace {

std::int64_t zeros_in_row(const Tensor& w, std::int64_t r) {
    std::int64_t z = 0;
    for (std::int64_t c = 0; c < w.dim(1); ++c) z += w.f32()[r * w.dim(1) + c] == 0.0f;
    return z;
}

struct Layer {
    Tensor x, w;
    InputStats stats;
};
Layer make_layer(std::int64_t out, std::int64_t in, std::int64_t n, std::uint64_t seed) {
    Layer l{correlated_inputs(n, in, seed), random_tensor({out, in}, seed + 1), InputStats(in)};
    l.stats.add(l.x);
    return l;
}

}  // namespace

TEST_CASE("prune zeroes exactly round(ratio * in) weights in every row", "[compress]") {
    Layer l = make_layer(24, 96, 256, 1);
    for (Saliency s : {Saliency::magnitude, Saliency::wanda, Saliency::sparsegpt})
        for (double ratio : {0.0, 0.5, 0.625, 0.75, 0.9}) {
            INFO(name(s) << " ratio " << ratio);
            Tensor w = l.w.clone();
            const std::int64_t k = std::llround(ratio * 96);
            SparseGptOptions opt;
            opt.block = 32;  // several blocks: their zero shares must add up to k
            REQUIRE(prune(w, s, Sparsity{.ratio = ratio}, &l.stats, opt, "layer0.q") == 24 * k);
            for (std::int64_t r = 0; r < 24; ++r) REQUIRE(zeros_in_row(w, r) == k);
            for (float v : w.span()) REQUIRE(std::isfinite(v));
            if (ratio == 0.0 && s != Saliency::sparsegpt) REQUIRE(w.to_vector() == l.w.to_vector());
            if (ratio == 0.0 && s == Saliency::sparsegpt) REQUIRE(output_error(l.x, l.w, w) < 1e-5);
        }
}

TEST_CASE("N:M pruning zeroes N weights in every group of M consecutive inputs", "[compress]") {
    Layer l = make_layer(16, 64, 256, 2);
    for (Saliency s : {Saliency::magnitude, Saliency::wanda, Saliency::sparsegpt})
        for (auto [n, m] : {std::pair{2, 4}, {4, 8}, {3, 4}, {7, 8}}) {
            INFO(name(s) << " " << n << ":" << m);
            Tensor w = l.w.clone();
            SparseGptOptions opt;
            opt.block = 12;  // not a multiple of 8: blocks are rounded to whole groups
            REQUIRE(prune(w, s, Sparsity{.nm_zero = n, .nm_group = m}, &l.stats, opt) == 16 * 64 / m * n);
            for (std::int64_t r = 0; r < 16; ++r)
                for (std::int64_t g = 0; g < 64; g += m) {
                    int zeros = 0;
                    for (std::int64_t c = g; c < g + m; ++c) zeros += w.f32()[r * 64 + c] == 0.0f;
                    REQUIRE(zeros == n);
                }
        }
}

TEST_CASE("on correlated inputs SparseGPT < Wanda < magnitude in output error", "[compress]") {
    Layer l = make_layer(64, 256, 1024, 3);
    for (Sparsity sp : {Sparsity{.ratio = 0.5}, Sparsity{.ratio = 0.75}, Sparsity{.nm_zero = 2, .nm_group = 4}}) {
        double e[3];
        for (Saliency s : {Saliency::magnitude, Saliency::wanda, Saliency::sparsegpt}) {
            Tensor w = l.w.clone();
            prune(w, s, sp, &l.stats);
            e[int(s)] = output_error(l.x, l.w, w);
        }
        INFO("ratio " << sp.ratio << " N:M " << sp.nm_zero << ":" << sp.nm_group << "  magnitude " << e[0]
                      << "  wanda " << e[1] << "  sparsegpt " << e[2]);
        CHECK(e[2] < e[1]);
        CHECK(e[1] < e[0]);
    }
}

TEST_CASE("InputStats accumulates norms, absmax and the damped Hessian", "[compress]") {
    const Tensor x = Tensor::from({3, 2}, std::vector<float>{1, 0, -2, 0, 2, 0});
    InputStats a(2), b(2);
    a.add(x.slice(0, 1));
    b.add(x.slice(1, 3));
    a.merge(b);
    REQUIRE(a.rows() == 3);
    REQUIRE(a.column_norms() == std::vector<float>{3.0f, 0.0f});
    REQUIRE(a.column_absmax() == std::vector<float>{2.0f, 0.0f});
    const Tensor h = a.hessian(0.5);  // 2/3 · 9 = 6; dead column → 1; damp 0.5 · mean(6, 1) = 1.75
    REQUIRE(h.at(0) == Approx(7.75));
    REQUIRE(h.at(1) == 0.0f);
    REQUIRE(h.at(3) == Approx(2.75));
    REQUIRE_THROWS_WITH(InputStats(3).hessian(), Catch::Contains("no calibration rows"));
    REQUIRE_THROWS_WITH(a.add(Tensor::zeros({2, 3})), Catch::Contains("length 2"));
    REQUIRE_THROWS_WITH(a.merge(InputStats(3)), Catch::Contains("width 3"));
}

TEST_CASE("prune rejects bad sparsity and missing statistics, naming the layer", "[compress]") {
    Layer l = make_layer(4, 16, 32, 4);
    auto fails = [&](Saliency s, Sparsity sp, const InputStats* st, const char* part) {
        Tensor w = l.w.clone();
        REQUIRE_THROWS_AS(prune(w, s, sp, st, {}, "blocks.3.ffn.w1"), mopt::Error);
        REQUIRE_THROWS_WITH(prune(w, s, sp, st, {}, "blocks.3.ffn.w1"),
                            Catch::Contains("blocks.3.ffn.w1") && Catch::Contains(part));
    };
    fails(Saliency::magnitude, Sparsity{.ratio = -0.1}, nullptr, "[0, 1)");
    fails(Saliency::magnitude, Sparsity{.ratio = 1.0}, nullptr, "[0, 1)");
    fails(Saliency::magnitude, Sparsity{.nm_zero = 4, .nm_group = 4}, nullptr, "N < M");
    fails(Saliency::magnitude, Sparsity{.nm_zero = 0, .nm_group = 4}, nullptr, "N < M");
    fails(Saliency::magnitude, Sparsity{.nm_zero = 2, .nm_group = 5}, nullptr, "divide");
    fails(Saliency::wanda, Sparsity{}, nullptr, "Wanda");
    fails(Saliency::sparsegpt, Sparsity{}, nullptr, "SparseGPT");
    InputStats other(8);
    other.add(random_tensor({4, 8}, 9));
    fails(Saliency::wanda, Sparsity{}, &other, "width 8");
    fails(Saliency::sparsegpt, Sparsity{}, &other, "width 8");
    REQUIRE(parse_saliency("wanda") == Saliency::wanda);
    REQUIRE_THROWS_WITH(parse_saliency("obs"), Catch::Contains("obs") && Catch::Contains("sparsegpt"));
}

TEST_CASE("SparseGPT on rank-deficient inputs stays finite and warns when it must damp more", "[compress]") {
    const std::int64_t in = 32;
    // 12 rows (< in), column 5 duplicates column 4, column 7 is dead.
    Tensor x = random_tensor({12, in}, 5);
    for (std::int64_t r = 0; r < 12; ++r) {
        x.f32()[r * in + 5] = x.f32()[r * in + 4];
        x.f32()[r * in + 7] = 0.0f;
    }
    InputStats stats(in);
    stats.add(x);
    const Tensor w0 = random_tensor({8, in}, 6);
    for (double damp : {0.01, 0.0}) {
        INFO("damp " << damp);
        std::ostringstream captured;
        auto* old = std::cerr.rdbuf(captured.rdbuf());
        Tensor w = w0.clone();
        SparseGptOptions opt;
        opt.damp = damp;
        prune(w, Saliency::sparsegpt, Sparsity{.ratio = 0.5}, &stats, opt, "layer.dup");
        std::cerr.rdbuf(old);
        for (float v : w.span()) REQUIRE(std::isfinite(v));
        for (std::int64_t r = 0; r < 8; ++r) {
            REQUIRE(zeros_in_row(w, r) == 16);
            REQUIRE(w.f32()[r * in + 7] == 0.0f);  // dead input
        }
        if (damp == 0.0) REQUIRE_THAT(captured.str(), Catch::Contains("layer.dup") && Catch::Contains("positive definite"));
        else REQUIRE(captured.str().empty());
    }
}

TEST_CASE("SparseGPT removing one weight per row is the least-squares update of the later weights", "[compress]") {
    // With one zero per row at column p, OBS over the columns after p (those before are already
    // fixed) is the least-squares solution  H_{>p,>p} ŵ_{>p} = H_{>p,:} w − H_{>p,≤p} ŵ_{≤p}
    // over the same damped Hessian, with ŵ_p = 0 and ŵ_{<p} = w_{<p}.
    const std::int64_t in = 16, out = 6;
    Layer l = make_layer(out, in, 64, 7);
    Tensor w = l.w.clone();
    prune(w, Saliency::sparsegpt, Sparsity{.ratio = 1.0 / 16}, &l.stats);
    const Eigen::MatrixXd h = l.stats.hessian_f64(0.01);
    for (std::int64_t r = 0; r < out; ++r) {
        std::int64_t p = -1;
        for (std::int64_t c = 0; c < in; ++c)
            if (w.f32()[r * in + c] == 0.0f) p = c;
        REQUIRE(p >= 0);
        Eigen::VectorXd w0(in), expect(in);
        for (std::int64_t c = 0; c < in; ++c) w0(c) = expect(c) = l.w.f32()[r * in + c];
        expect(p) = 0.0;
        const std::int64_t m = in - p - 1;
        if (m > 0) {
            const Eigen::VectorXd rhs =
                h.bottomRows(m) * w0 - h.bottomLeftCorner(m, p + 1) * expect.head(p + 1);
            expect.tail(m) = h.bottomRightCorner(m, m).llt().solve(rhs);
        }
        for (std::int64_t c = 0; c < in; ++c)
            REQUIRE(w.f32()[r * in + c] == Approx(expect(c)).margin(1e-4).epsilon(1e-3));
    }
}
