#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <cmath>
#include <vector>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_ids;
using mopt::test::random_tensor;

namespace {

// Independent double-precision references.
Tensor ref_softmax(const Tensor& x) {
    const std::int64_t n = x.shape().back(), rows = x.numel() / n;
    Tensor y = Tensor::empty(x.shape());
    for (std::int64_t r = 0; r < rows; ++r) {
        double m = x.at(r * n);
        for (std::int64_t j = 1; j < n; ++j) m = std::max(m, double(x.at(r * n + j)));
        double s = 0.0;
        for (std::int64_t j = 0; j < n; ++j) s += std::exp(double(x.at(r * n + j)) - m);
        for (std::int64_t j = 0; j < n; ++j)
            y.at(r * n + j) = static_cast<float>(std::exp(double(x.at(r * n + j)) - m) / s);
    }
    return y;
}

// Mean over non-ignored rows of log Σ_j exp(x_rj) − x_r,t (log-sum-exp in double around the max).
double ref_cross_entropy(const Tensor& logits, const Tensor& targets, std::int32_t ignore_index = -100) {
    const std::int64_t v = logits.shape().back(), rows = logits.numel() / v;
    const auto t = targets.span<std::int32_t>();
    double total = 0.0;
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        if (t[r] == ignore_index) continue;
        double m = logits.at(r * v);
        for (std::int64_t j = 1; j < v; ++j) m = std::max(m, double(logits.at(r * v + j)));
        double s = 0.0;
        for (std::int64_t j = 0; j < v; ++j) s += std::exp(double(logits.at(r * v + j)) - m);
        total += m + std::log(s) - logits.at(r * v + t[r]);
        ++count;
    }
    return total / static_cast<double>(count);
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
    double worst = 0.0;
    for (std::int64_t k = 0; k < a.numel(); ++k) worst = std::max(worst, std::abs(double(a.at(k)) - b.at(k)));
    return worst;
}

Tensor ids(Shape shape, std::vector<std::int32_t> values) {
    return Tensor::from(shape, std::span<const std::int32_t>(values));
}

}  // namespace

TEST_CASE("softmax matches a double-precision reference and rows sum to 1", "[softmax]") {
    auto seed = GENERATE(1, 2, 3);
    auto shape = GENERATE(Shape{5}, Shape{3, 7}, Shape{2, 3, 11}, Shape{400, 257});
    Tensor x = random_tensor(shape, seed, -8.0f, 8.0f);
    Tape tape;
    const Tensor& y = softmax(tape.constant(x)).value();
    REQUIRE(y.shape() == shape);
    REQUIRE(max_abs_diff(y, ref_softmax(x)) < 1e-6);
    const std::int64_t n = shape.back();
    for (std::int64_t r = 0; r < x.numel() / n; ++r) {
        double s = 0.0;
        for (std::int64_t j = 0; j < n; ++j) s += y.at(r * n + j);
        REQUIRE(s == Approx(1.0).epsilon(1e-5));
    }
}

TEST_CASE("softmax is shift-invariant and finite for large logits", "[softmax]") {
    Tensor x = random_tensor({4, 9}, 3, -3.0f, 3.0f);
    Tensor shifted = x.clone();
    for (auto& v : shifted.span()) v += 1e4f;
    Tape tape;
    const Tensor& y = softmax(tape.constant(x)).value();
    const Tensor& ys = softmax(tape.constant(shifted)).value();
    for (float f : ys.span()) REQUIRE(std::isfinite(f));
    REQUIRE(max_abs_diff(ys, ref_softmax(shifted)) < 1e-6);
    REQUIRE(max_abs_diff(ys, y) < 1e-2);  // the shifted logits themselves round at 1e-3
    // A row spanning ±3e38: exp underflows to 0, nothing overflows.
    Tensor wide = Tensor::from({3}, std::vector<float>{-3e38f, 0.0f, 3e38f});
    const Tensor& yw = softmax(tape.constant(wide)).value();
    REQUIRE(yw.at(0) == 0.0f);
    REQUIRE(yw.at(1) == 0.0f);
    REQUIRE(yw.at(2) == 1.0f);
}

TEST_CASE("softmax gradients match finite differences", "[grad][softmax]") {
    auto seed = GENERATE(1, 2, 3);
    auto shape = GENERATE(Shape{6}, Shape{3, 5}, Shape{2, 2, 4});
    Tensor x = random_tensor(shape, seed, -2.0f, 2.0f);
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return softmax(v[0]); }, {x});
    INFO(r);
    REQUIRE(r.ok);
}

TEST_CASE("cross_entropy matches a naive log-sum-exp reference", "[softmax]") {
    auto seed = GENERATE(1, 2, 3);
    SECTION("[rows, V]") {
        Tensor logits = random_tensor({6, 11}, seed, -4.0f, 4.0f);
        Tensor targets = random_ids({6}, seed + 10, 11);
        Tape tape;
        REQUIRE(cross_entropy(tape.constant(logits), targets).item() ==
                Approx(ref_cross_entropy(logits, targets)).epsilon(1e-6));
    }
    SECTION("[batch, seq, V] with many rows") {
        Tensor logits = random_tensor({4, 64, 300}, seed, -4.0f, 4.0f);
        Tensor targets = random_ids({4, 64}, seed + 10, 300);
        Tape tape;
        REQUIRE(cross_entropy(tape.constant(logits), targets).item() ==
                Approx(ref_cross_entropy(logits, targets)).epsilon(1e-6));
    }
    SECTION("a single row [V] with a scalar target") {
        Tensor logits = random_tensor({7}, seed, -4.0f, 4.0f);
        Tensor target = ids(Shape{}, {3});
        Tape tape;
        REQUIRE(cross_entropy(tape.constant(logits), target).item() ==
                Approx(ref_cross_entropy(logits, target)).epsilon(1e-6));
    }
}

TEST_CASE("cross_entropy ignores masked targets: mean over the rest, zero gradient", "[grad][softmax]") {
    const std::int64_t rows = 6, v = 5;
    Tensor logits = random_tensor({rows, v}, 4, -3.0f, 3.0f);
    Tensor targets = ids({rows}, {1, -100, 4, 0, -100, 2});
    Tape tape;
    Var x = tape.input(logits);
    Var loss = cross_entropy(x, targets);
    // Same as the loss over the four kept rows alone.
    Tensor kept = Tensor::empty({4, v});
    const std::int64_t keep[] = {0, 2, 3, 5};
    for (int k = 0; k < 4; ++k)
        for (std::int64_t j = 0; j < v; ++j) kept.at(k * v + j) = logits.at(keep[k] * v + j);
    const double expect = ref_cross_entropy(kept, ids({4}, {1, 4, 0, 2}));
    REQUIRE(loss.item() == Approx(expect).epsilon(1e-6));
    REQUIRE(loss.item() == Approx(ref_cross_entropy(logits, targets)).epsilon(1e-6));

    tape.backward(loss);
    const Tensor& g = x.grad();
    const Tensor p = ref_softmax(logits);
    const auto t = targets.span<std::int32_t>();
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < v; ++j) {
            const double want = t[r] == -100 ? 0.0 : (p.at(r * v + j) - (j == t[r] ? 1.0 : 0.0)) / 4.0;
            if (t[r] == -100) REQUIRE(g.at(r * v + j) == 0.0f);
            else REQUIRE(g.at(r * v + j) == Approx(want).margin(1e-6));
        }

    // A custom ignore_index (e.g. a padding id inside the vocabulary).
    Tensor pad = ids({rows}, {1, 0, 4, 0, 3, 0});
    Tape tape2;
    REQUIRE(cross_entropy(tape2.constant(logits), pad, 0).item() ==
            Approx(ref_cross_entropy(logits, pad, 0)).epsilon(1e-6));
}

TEST_CASE("cross_entropy is exact and finite for logits around ±1e4", "[softmax]") {
    auto offset = GENERATE(1e4f, -1e4f);
    Tensor logits = random_tensor({8, 50}, 9, -5.0f, 5.0f);
    Tensor targets = random_ids({8}, 10, 50);
    Tensor shifted = logits.clone();
    for (auto& f : shifted.span()) f += offset;
    Tape tape;
    const float base = cross_entropy(tape.constant(logits), targets).item();
    Var xs = tape.input(shifted);
    Var loss = cross_entropy(xs, targets);
    REQUIRE(std::isfinite(loss.item()));
    // Exact for the (rounded) shifted logits, and equal to the unshifted loss up to that rounding.
    REQUIRE(loss.item() == Approx(ref_cross_entropy(shifted, targets)).epsilon(1e-6));
    REQUIRE(loss.item() == Approx(base).margin(5e-3));
    tape.backward(loss);
    for (float f : xs.grad().span()) REQUIRE(std::isfinite(f));

    // One row spread over ±1e4 and one over ±3e38: no inf, no NaN.
    Tensor spread = Tensor::from({2, 3}, std::vector<float>{1e4f, -1e4f, 0.0f, 3e38f, -3e38f, 0.0f});
    Tape tape2;
    Var xw = tape2.input(spread);
    Var lw = cross_entropy(xw, ids({2}, {0, 0}));
    REQUIRE(lw.item() == 0.0f);
    tape2.backward(lw);
    for (float f : xw.grad().span()) REQUIRE(std::isfinite(f));
    Tape tape3;
    REQUIRE(cross_entropy(tape3.constant(spread), ids({2}, {1, -100})).item() == Approx(2e4));
}

TEST_CASE("cross_entropy gradients match finite differences with ignored targets", "[grad][softmax]") {
    auto seed = GENERATE(1, 2, 3);
    Tensor logits = random_tensor({3, 4, 6}, seed, -2.0f, 2.0f);
    Tensor targets = random_ids({3, 4}, seed + 10, 6);
    auto tv = targets.span<std::int32_t>();
    tv[1] = -100;
    tv[static_cast<std::size_t>(seed) + 4] = -100;
    auto r = gradcheck([&targets](Tape&, std::span<const Var> v) { return cross_entropy(v[0], targets); }, {logits});
    INFO(r);
    REQUIRE(r.ok);
    // Targets may also travel as a non-differentiable i32 input.
    auto r2 = gradcheck([](Tape&, std::span<const Var> v) { return cross_entropy(v[0], v[1].value()); },
                        {logits, targets});
    INFO(r2);
    REQUIRE(r2.ok);
}

TEST_CASE("cross_entropy errors name the op, the shapes and the bad target", "[softmax]") {
    Tape tape;
    Var logits = tape.constant(Tensor::zeros({2, 3, 5}));
    SECTION("targets shape does not match the logits") {
        REQUIRE_THROWS_WITH(cross_entropy(logits, Tensor::zeros({2, 4}, DType::i32)),
                            Catch::Contains("cross_entropy") && Catch::Contains("[2, 4]") &&
                                Catch::Contains("[2, 3, 5]"));
        REQUIRE_THROWS_WITH(cross_entropy(logits, Tensor::zeros({2, 3, 5}, DType::i32)),
                            Catch::Contains("cross_entropy") && Catch::Contains("[2, 3, 5]"));
    }
    SECTION("targets must be i32") {
        REQUIRE_THROWS_WITH(cross_entropy(logits, Tensor::zeros({2, 3})),
                            Catch::Contains("cross_entropy") && Catch::Contains("i32") && Catch::Contains("f32"));
    }
    SECTION("a target outside [0, V) names its value, position and V") {
        Tensor t = ids({2, 3}, {0, 1, 2, 3, 7, 4});
        REQUIRE_THROWS_WITH(cross_entropy(logits, t), Catch::Contains("cross_entropy") && Catch::Contains("target 7") &&
                                                          Catch::Contains("position 4") &&
                                                          Catch::Contains("[1, 1]") && Catch::Contains("V = 5"));
        Tensor neg = ids({2, 3}, {0, -1, 2, 3, 1, 4});
        REQUIRE_THROWS_WITH(cross_entropy(logits, neg),
                            Catch::Contains("target -1") && Catch::Contains("position 1") && Catch::Contains("V = 5"));
        // -1 is fine once it is the ignore_index.
        REQUIRE_NOTHROW(cross_entropy(logits, neg, -1));
    }
    SECTION("every target ignored") {
        Tensor t = ids({2, 3}, {-100, -100, -100, -100, -100, -100});
        REQUIRE_THROWS_WITH(cross_entropy(logits, t),
                            Catch::Contains("cross_entropy") && Catch::Contains("ignore_index"));
    }
}

TEST_CASE("logsumexp matches a double reference, stays finite at ±1e4, gradient is softmax", "[grad][softmax]") {
    Tensor x = random_tensor({3, 7}, 4, -3.0f, 3.0f);
    Tape tape;
    Var y = logsumexp(tape.constant(x));
    REQUIRE(y.shape() == Shape{3, 1});
    for (std::int64_t r = 0; r < 3; ++r) {
        double s = 0.0;
        for (std::int64_t j = 0; j < 7; ++j) s += std::exp(double(x.at(r * 7 + j)));
        REQUIRE(y.value().at(r) == Approx(std::log(s)).epsilon(1e-6));
    }
    Tensor big = Tensor::from({2}, std::vector<float>{1e4f, 1e4f});
    REQUIRE(logsumexp(tape.constant(big)).item() == Approx(1e4 + std::log(2.0)).epsilon(1e-7));
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return logsumexp(v[0]); }, {x});
    INFO(r);
    REQUIRE(r.ok);
}
