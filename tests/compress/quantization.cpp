// Quantisation: RTN's half-step bound, int8 absmax and its outlier columns, GPTQ beating RTN on
// correlated calibration data, pruned zeros kept exactly, IntCodes matching the overwritten
// weights, and errors/warnings on bad input and rank-deficient data.
#include <cmath>
#include <iostream>
#include <random>
#include <sstream>

#include <catch2/catch.hpp>

#include "calibration_data.hpp"

#include <mopt/compress/gptq.hpp>
#include <mopt/compress/input_stats.hpp>
#include <mopt/compress/int8.hpp>
#include <mopt/compress/prune.hpp>
#include <mopt/compress/rtn.hpp>
#include <mopt/tensor/eigen.hpp>

using mopt::Tensor;
using namespace mopt::compress;
using mopt::test::correlated_inputs;
using mopt::test::output_error;
using mopt::test::random_tensor;

namespace {

// The codes are valid and stand for exactly the overwritten weights.
void require_codes_match(const IntCodes& codes, const Tensor& w) {
    REQUIRE_NOTHROW(codes.validate("test"));
    REQUIRE(codes.out == w.dim(0));
    REQUIRE(codes.in == w.dim(1));
    for (std::int64_t r = 0; r < w.dim(0); ++r)
        for (std::int64_t c = 0; c < w.dim(1); ++c) REQUIRE(codes.value(r, c) == w.f32()[r * w.dim(1) + c]);
}

}  // namespace

TEST_CASE("RTN rounds every weight to within half a step of its group's grid", "[compress]") {
    const Tensor w0 = random_tensor({6, 64}, 1, -2.0f, 1.0f);
    for (int bits : {2, 3, 4, 8})
        for (std::int64_t group : {0, 16, 64}) {
            INFO(bits << " bits, group " << group);
            Tensor w = w0.clone();
            const IntCodes codes = quantize_rtn(w, QuantSpec{.bits = bits, .group = group}, "layer");
            require_codes_match(codes, w);
            REQUIRE(codes.group == (group == 0 ? 64 : group));
            for (std::int64_t r = 0; r < 6; ++r)
                for (std::int64_t c = 0; c < 64; ++c) {
                    const float s = codes.scale[r * codes.groups_per_row() + c / codes.group];
                    REQUIRE(std::fabs(w.f32()[r * 64 + c] - w0.f32()[r * 64 + c]) <= s * (0.5f + 1e-4f));
                }
        }
    Tensor zero = Tensor::zeros({2, 8});
    const IntCodes codes = quantize_rtn(zero, QuantSpec{.bits = 4, .group = 8});
    require_codes_match(codes, zero);
    for (float v : zero.span()) REQUIRE(v == 0.0f);
}

TEST_CASE("int8 absmax rounds each row to within max|w| / 254 and keeps outlier columns exact", "[compress]") {
    const Tensor w0 = random_tensor({5, 32}, 2, -3.0f, 3.0f);
    Tensor w = w0.clone();
    const IntCodes codes = quantize_int8(w);
    require_codes_match(codes, w);
    REQUIRE(codes.bits == 8);
    REQUIRE(codes.group == 32);
    for (std::int64_t r = 0; r < 5; ++r) {
        float amax = 0.0f;
        for (std::int64_t c = 0; c < 32; ++c) amax = std::max(amax, std::fabs(w0.f32()[r * 32 + c]));
        REQUIRE(codes.zero[r] == 128.0f);
        for (std::int64_t c = 0; c < 32; ++c)
            REQUIRE(std::fabs(w.f32()[r * 32 + c] - w0.f32()[r * 32 + c]) <= amax / 254.0f * (1.0f + 1e-5f));
    }

    // Column 9's activations reach 20 (> 6): it stays f32; the rows' scales come from the others.
    Tensor x = random_tensor({16, 32}, 3);
    x.f32()[5 * 32 + 9] = 20.0f;
    InputStats stats(32);
    stats.add(x);
    Tensor wo = w0.clone();
    wo.f32()[1 * 32 + 9] = 50.0f;  // a large weight in the outlier column does not widen row 1's grid
    const Tensor wo0 = wo.clone();
    const IntCodes oc = quantize_int8(wo, &stats, 6.0f, "layer.out");
    require_codes_match(oc, wo);
    REQUIRE(oc.outlier_cols == std::vector<std::int32_t>{9});
    for (std::int64_t r = 0; r < 5; ++r) {
        REQUIRE(wo.f32()[r * 32 + 9] == wo0.f32()[r * 32 + 9]);
        REQUIRE(oc.q[r * 32 + 9] == 128);
    }
    REQUIRE(oc.scale[1] <= 3.0f / 127.0f);
    REQUIRE_THROWS_WITH(quantize_int8(wo, nullptr, 6.0f, "layer.out"), Catch::Contains("layer.out"));
}

TEST_CASE("on correlated inputs GPTQ has a smaller output error than RTN", "[compress]") {
    const Tensor x = correlated_inputs(1024, 256, 4);
    const Tensor w0 = random_tensor({64, 256}, 5);
    InputStats stats(256);
    stats.add(x);
    for (int bits : {3, 4})
        for (std::int64_t group : {64, 128})
            for (bool act_order : {false, true}) {
                const QuantSpec spec{.bits = bits, .group = group, .act_order = act_order};
                Tensor wr = w0.clone(), wg = w0.clone();
                quantize_rtn(wr, spec);
                const IntCodes codes = quantize_gptq(wg, stats, spec, "layer");
                require_codes_match(codes, wg);
                const double er = output_error(x, w0, wr), eg = output_error(x, w0, wg);
                INFO(bits << " bits, group " << group << ", act_order " << act_order << ": rtn " << er << "  gptq " << eg);
                CHECK(eg < er);
            }
}

TEST_CASE("GPTQ with blocks shorter or longer than its groups matches its own codes", "[compress]") {
    const Tensor x = correlated_inputs(256, 96, 6);
    const Tensor w0 = random_tensor({8, 96}, 7);
    InputStats stats(96);
    stats.add(x);
    for (auto [group, block] : {std::pair<std::int64_t, std::int64_t>{32, 20}, {48, 20}, {0, 7}, {12, 128}}) {
        INFO("group " << group << " block " << block);
        Tensor w = w0.clone();
        const IntCodes codes = quantize_gptq(w, stats, QuantSpec{.bits = 4, .group = group, .block = block});
        require_codes_match(codes, w);
        Tensor wr = w0.clone();
        quantize_rtn(wr, QuantSpec{.bits = 4, .group = group});
        CHECK(output_error(x, w0, w) < output_error(x, w0, wr));
    }
}

TEST_CASE("pruned zeros stay exactly 0 through RTN and GPTQ", "[compress]") {
    const Tensor x = correlated_inputs(512, 128, 8);
    InputStats stats(128);
    stats.add(x);
    Tensor pruned = random_tensor({16, 128}, 9);
    prune(pruned, Saliency::sparsegpt, Sparsity{.ratio = 0.5}, &stats);
    for (bool act_order : {false, true}) {
        const QuantSpec spec{.bits = 3, .group = 32, .act_order = act_order};
        Tensor wr = pruned.clone(), wg = pruned.clone();
        const IntCodes cr = quantize_rtn(wr, spec);
        const IntCodes cg = quantize_gptq(wg, stats, spec);
        require_codes_match(cr, wr);
        require_codes_match(cg, wg);
        for (std::int64_t i = 0; i < pruned.numel(); ++i)
            if (pruned.at(i) == 0.0f) {
                REQUIRE(wr.at(i) == 0.0f);
                REQUIRE(wg.at(i) == 0.0f);
                REQUIRE(cg.q[i] == cg.zero[(i / 128) * 4 + (i % 128) / 32]);
            }
    }
}

TEST_CASE("quantisers reject bad specs and missing statistics, naming the layer", "[compress]") {
    const Tensor w0 = random_tensor({4, 48}, 10);
    InputStats stats(48), other(32);
    stats.add(random_tensor({64, 48}, 11));
    other.add(random_tensor({64, 32}, 12));
    auto fails = [&](auto&& fn, const char* part) {
        REQUIRE_THROWS_AS(fn(), mopt::Error);
        REQUIRE_THROWS_WITH(fn(), Catch::Contains("blocks.1.attn.wq") && Catch::Contains(part));
    };
    for (int bits : {1, 9}) {
        fails([&] { Tensor w = w0.clone(); quantize_rtn(w, QuantSpec{.bits = bits}, "blocks.1.attn.wq"); }, "-bit");
        fails([&] { Tensor w = w0.clone(); quantize_gptq(w, stats, QuantSpec{.bits = bits}, "blocks.1.attn.wq"); }, "-bit");
    }
    fails([&] { Tensor w = w0.clone(); quantize_rtn(w, QuantSpec{.group = 32}, "blocks.1.attn.wq"); }, "divide");
    fails([&] { Tensor w = w0.clone(); quantize_gptq(w, stats, QuantSpec{.group = 36}, "blocks.1.attn.wq"); }, "divide");
    fails([&] { Tensor w = w0.clone(); quantize_gptq(w, other, QuantSpec{.group = 16}, "blocks.1.attn.wq"); }, "width 32");
    fails([&] { Tensor w = w0.clone(); quantize_int8(w, &other, 6.0f, "blocks.1.attn.wq"); }, "width 32");
    fails([&] { Tensor w = w0.clone(); quantize_gptq(w, InputStats(48), QuantSpec{.group = 16}, "blocks.1.attn.wq"); },
          "no rows");
}

TEST_CASE("GPTQ on rank-deficient inputs stays finite and warns when it must damp more", "[compress]") {
    const std::int64_t in = 32;
    // 10 rows (< in), column 3 duplicates column 2, column 11 is dead.
    Tensor x = random_tensor({10, in}, 13);
    for (std::int64_t r = 0; r < 10; ++r) {
        x.f32()[r * in + 3] = x.f32()[r * in + 2];
        x.f32()[r * in + 11] = 0.0f;
    }
    InputStats stats(in);
    stats.add(x);
    const Tensor w0 = random_tensor({6, in}, 14);
    for (double damp : {0.01, 0.0})
        for (bool act_order : {false, true}) {
            INFO("damp " << damp << " act_order " << act_order);
            std::ostringstream captured;
            auto* old = std::cerr.rdbuf(captured.rdbuf());
            Tensor w = w0.clone();
            const IntCodes codes =
                quantize_gptq(w, stats, QuantSpec{.bits = 4, .group = 16, .act_order = act_order, .damp = damp}, "layer.dup");
            std::cerr.rdbuf(old);
            for (float v : w.span()) REQUIRE(std::isfinite(v));
            require_codes_match(codes, w);
            for (std::int64_t r = 0; r < 6; ++r) REQUIRE(w.f32()[r * in + 11] == 0.0f);  // dead input
            if (damp == 0.0) REQUIRE_THAT(captured.str(), Catch::Contains("layer.dup") && Catch::Contains("positive definite"));
            else REQUIRE(captured.str().empty());
        }
}

TEST_CASE("GPTQ matches column-by-column quantisation with a least-squares update of the rest", "[compress]") {
    // Reference: for c = 0, 1, ...: fit the group's grid to the current weights when the group
    // starts, round column c, then re-solve the later columns by least squares given the fixed ones,
    // H_{>c,>c} ŵ_{>c} = H_{>c,:} w − H_{>c,≤c} ŵ_{≤c}, over the same damped Hessian. GPTQ's
    // Cholesky-based error feedback with lazy batches (block 5, cut to 4 so that the groups of 8 start
    // on block starts) is the same process.
    const std::int64_t in = 16, out = 5, group = 8;
    const Tensor x = correlated_inputs(64, in, 15);
    const Tensor w0 = random_tensor({out, in}, 16);
    InputStats stats(in);
    stats.add(x);
    Tensor w = w0.clone();
    const IntCodes codes = quantize_gptq(w, stats, QuantSpec{.bits = 3, .group = group, .block = 5});
    require_codes_match(codes, w);
    const Eigen::MatrixXd h = stats.hessian_f64(0.01);
    for (std::int64_t r = 0; r < out; ++r) {
        Eigen::VectorXd target(in), cur(in);
        for (std::int64_t c = 0; c < in; ++c) target(c) = cur(c) = w0.f32()[r * in + c];
        QuantGrid grid;
        for (std::int64_t c = 0; c < in; ++c) {
            if (c % group == 0) {
                std::vector<float> g(static_cast<std::size_t>(group));
                for (std::int64_t k = 0; k < group; ++k) g[k] = static_cast<float>(cur(c + k));
                grid = QuantGrid::fit(g.data(), group, 3);
                REQUIRE(codes.scale[r * 2 + c / group] == Approx(grid.scale).epsilon(1e-4));
            }
            cur(c) = grid.value(grid.code(static_cast<float>(cur(c))));
            REQUIRE(w.f32()[r * in + c] == Approx(cur(c)).margin(1e-4));
            const std::int64_t m = in - c - 1;
            if (m > 0)
                cur.tail(m) = h.bottomRightCorner(m, m).llt().solve(h.bottomRows(m) * target -
                                                                     h.bottomLeftCorner(m, c + 1) * cur.head(c + 1));
        }
    }
}
