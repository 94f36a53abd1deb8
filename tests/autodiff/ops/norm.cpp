#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <cmath>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

namespace {

// Independent double-precision references, one row at a time.
Tensor ref_layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, double eps) {
    const std::int64_t d = x.shape().back(), rows = x.numel() / d;
    Tensor y = Tensor::empty(x.shape());
    for (std::int64_t r = 0; r < rows; ++r) {
        double mean = 0.0, var = 0.0;
        for (std::int64_t j = 0; j < d; ++j) mean += x.at(r * d + j);
        mean /= static_cast<double>(d);
        for (std::int64_t j = 0; j < d; ++j) var += (x.at(r * d + j) - mean) * (x.at(r * d + j) - mean);
        var /= static_cast<double>(d);
        for (std::int64_t j = 0; j < d; ++j)
            y.at(r * d + j) = static_cast<float>((x.at(r * d + j) - mean) / std::sqrt(var + eps) * w.at(j) + b.at(j));
    }
    return y;
}

Tensor ref_rms_norm(const Tensor& x, const Tensor& w, double eps) {
    const std::int64_t d = x.shape().back(), rows = x.numel() / d;
    Tensor y = Tensor::empty(x.shape());
    for (std::int64_t r = 0; r < rows; ++r) {
        double ms = 0.0;
        for (std::int64_t j = 0; j < d; ++j) ms += static_cast<double>(x.at(r * d + j)) * x.at(r * d + j);
        ms /= static_cast<double>(d);
        for (std::int64_t j = 0; j < d; ++j)
            y.at(r * d + j) = static_cast<float>(x.at(r * d + j) / std::sqrt(ms + eps) * w.at(j));
    }
    return y;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
    double worst = 0.0;
    for (std::int64_t k = 0; k < a.numel(); ++k) worst = std::max(worst, std::abs(double(a.at(k)) - b.at(k)));
    return worst;
}

Shape shape_for(int seed) {
    switch (seed) {
        case 1: return {6};
        case 2: return {4, 7};
        default: return {2, 3, 5};
    }
}

}  // namespace

TEST_CASE("layer_norm and rms_norm match a double-precision reference", "[norm]") {
    auto seed = GENERATE(1, 2, 3);
    // Small shapes, one with many rows (parallel rows) and one with a wide row and an offset mean.
    auto shape = GENERATE_COPY(shape_for(seed), Shape{512, 96}, Shape{3, 4096});
    Tensor x = random_tensor(shape, seed, -2.0f, 2.0f);
    for (auto& v : x.span()) v += 3.0f;  // |mean| > σ: a one-pass variance would lose digits
    const std::int64_t d = shape.back();
    Tensor w = random_tensor({d}, seed + 10, 0.5f, 1.5f), b = random_tensor({d}, seed + 20);
    Tape tape;
    Var vx = tape.constant(x), vw = tape.constant(w), vb = tape.constant(b);
    REQUIRE(max_abs_diff(layer_norm(vx, vw, vb).value(), ref_layer_norm(x, w, b, 1e-5)) < 1e-5);
    REQUIRE(max_abs_diff(layer_norm(vx, vw, vb, 0.1f).value(), ref_layer_norm(x, w, b, 0.1)) < 1e-5);
    REQUIRE(max_abs_diff(rms_norm(vx, vw).value(), ref_rms_norm(x, w, 1e-5)) < 1e-5);
    REQUIRE(max_abs_diff(rms_norm(vx, vw, 0.5f).value(), ref_rms_norm(x, w, 0.5)) < 1e-5);
}

TEST_CASE("layer_norm with unit weight and zero bias gives zero mean and unit variance per row", "[norm]") {
    auto seed = GENERATE(1, 2);
    const std::int64_t rows = 9, d = 33;
    Tensor x = random_tensor({rows, d}, seed, -5.0f, 20.0f);
    Tape tape;
    const Tensor& y =
        layer_norm(tape.constant(x), tape.constant(Tensor::full({d}, 1.0f)), tape.constant(Tensor::zeros({d})))
            .value();
    for (std::int64_t r = 0; r < rows; ++r) {
        double mean = 0.0, var = 0.0;
        for (std::int64_t j = 0; j < d; ++j) mean += y.at(r * d + j);
        mean /= d;
        for (std::int64_t j = 0; j < d; ++j) var += (y.at(r * d + j) - mean) * (y.at(r * d + j) - mean);
        var /= d;
        REQUIRE(mean == Approx(0.0).margin(1e-5));
        REQUIRE(var == Approx(1.0).epsilon(1e-4));
    }
}

TEST_CASE("rms_norm with unit weight gives unit root-mean-square per row", "[norm]") {
    const std::int64_t rows = 5, d = 17;
    Tensor x = random_tensor({rows, d}, 4, -3.0f, 3.0f);
    Tape tape;
    const Tensor& y = rms_norm(tape.constant(x), tape.constant(Tensor::full({d}, 1.0f))).value();
    for (std::int64_t r = 0; r < rows; ++r) {
        double ms = 0.0;
        for (std::int64_t j = 0; j < d; ++j) ms += double(y.at(r * d + j)) * y.at(r * d + j);
        REQUIRE(ms / d == Approx(1.0).epsilon(1e-4));
    }
}

TEST_CASE("layer_norm gradients match finite differences", "[grad][norm]") {
    auto seed = GENERATE(1, 2, 3);
    const Shape shape = shape_for(seed);
    const std::int64_t d = shape.back();
    Tensor x = random_tensor(shape, seed, -2.0f, 2.0f), w = random_tensor({d}, seed + 10, 0.5f, 1.5f),
           b = random_tensor({d}, seed + 20);
    auto build = [](Tape&, std::span<const Var> v) { return layer_norm(v[0], v[1], v[2]); };
    auto all = gradcheck(build, {x, w, b});
    INFO(all);
    REQUIRE(all.ok);
    // Frozen affine parameters (only x trainable) and a frozen input (only the affine trainable).
    auto x_only = gradcheck(build, {x, w, b}, {true, false, false});
    INFO(x_only);
    REQUIRE(x_only.ok);
    auto affine_only = gradcheck(build, {x, w, b}, {false, true, true});
    INFO(affine_only);
    REQUIRE(affine_only.ok);
}

TEST_CASE("rms_norm gradients match finite differences", "[grad][norm]") {
    auto seed = GENERATE(1, 2, 3);
    const Shape shape = shape_for(seed);
    const std::int64_t d = shape.back();
    Tensor x = random_tensor(shape, seed, -2.0f, 2.0f), w = random_tensor({d}, seed + 10, 0.5f, 1.5f);
    auto build = [](Tape&, std::span<const Var> v) { return rms_norm(v[0], v[1]); };
    auto both = gradcheck(build, {x, w});
    INFO(both);
    REQUIRE(both.ok);
    auto x_only = gradcheck(build, {x, w}, {true, false});
    INFO(x_only);
    REQUIRE(x_only.ok);
}

TEST_CASE("norm weight gradients sum over many rows", "[grad][norm]") {
    // Enough rows and columns for the column-block reduction to run on several threads.
    const Shape shape{600, 130};
    Tensor x = random_tensor(shape, 5, -2.0f, 2.0f), w = random_tensor({130}, 6, 0.5f, 1.5f),
           b = random_tensor({130}, 7);
    Tensor g = random_tensor(shape, 8);
    Tape tape;
    Var vx = tape.constant(x), vw = tape.input(w), vb = tape.input(b);
    Var y = layer_norm(vx, vw, vb);
    tape.backward(y, g);
    Tensor ln_ref = ref_layer_norm(x, Tensor::full({130}, 1.0f), Tensor::zeros({130}), 1e-5);  // x̂
    for (std::int64_t j = 0; j < 130; ++j) {
        double dw = 0.0, db = 0.0;
        for (std::int64_t r = 0; r < 600; ++r) {
            dw += double(g.at(r * 130 + j)) * ln_ref.at(r * 130 + j);
            db += g.at(r * 130 + j);
        }
        REQUIRE(vw.grad().at(j) == Approx(dw).margin(1e-3));
        REQUIRE(vb.grad().at(j) == Approx(db).margin(1e-3));
    }
    Tape tape2;  // a fresh tape: a second backward on `tape` would re-run layer_norm's backward
    Var vw2 = tape2.input(w);
    tape2.backward(rms_norm(tape2.constant(x), vw2), g);
    Tensor rms_ref = ref_rms_norm(x, Tensor::full({130}, 1.0f), 1e-5);
    for (std::int64_t j = 0; j < 130; ++j) {
        double dw = 0.0;
        for (std::int64_t r = 0; r < 600; ++r) dw += double(g.at(r * 130 + j)) * rms_ref.at(r * 130 + j);
        REQUIRE(vw2.grad().at(j) == Approx(dw).margin(1e-3));
    }
}

TEST_CASE("norms reject a weight or bias that does not match the last axis", "[norm]") {
    Tape tape;
    Var x = tape.constant(Tensor::zeros({2, 8}));
    Var w8 = tape.constant(Tensor::full({8}, 1.0f)), b8 = tape.constant(Tensor::zeros({8}));
    Var w4 = tape.constant(Tensor::full({4}, 1.0f));
    REQUIRE_THROWS_WITH(layer_norm(x, w4, b8), Catch::Contains("layer_norm") && Catch::Contains("weight") &&
                                                   Catch::Contains("[4]") && Catch::Contains("[2, 8]"));
    REQUIRE_THROWS_WITH(layer_norm(x, w8, w4), Catch::Contains("layer_norm") && Catch::Contains("bias") &&
                                                   Catch::Contains("[4]") && Catch::Contains("[2, 8]"));
    REQUIRE_THROWS_WITH(rms_norm(x, w4), Catch::Contains("rms_norm") && Catch::Contains("weight") &&
                                             Catch::Contains("[4]") && Catch::Contains("[2, 8]"));
    REQUIRE_THROWS_WITH(rms_norm(tape.constant(Tensor::zeros({2, 0})), w8),
                        Catch::Contains("rms_norm") && Catch::Contains("[2, 0]"));
}
