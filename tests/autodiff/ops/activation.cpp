#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <cmath>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

namespace {

// Independent double-precision references.
double ref_relu(double x) { return x > 0.0 ? x : 0.0; }
double ref_gelu(double x) {
    const double pi = std::acos(-1.0);
    return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (x + 0.044715 * x * x * x)));
}
double ref_silu(double x) { return x / (1.0 + std::exp(-x)); }

// Largest |y − ref(x)| over all elements.
template <class Ref>
double max_error(const Tensor& y, const Tensor& x, Ref ref) {
    double worst = 0.0;
    for (std::int64_t k = 0; k < x.numel(); ++k) worst = std::max(worst, std::abs(y.at(k) - ref(x.at(k))));
    return worst;
}

// Shifts values away from 0 by `margin` so finite differences never straddle ReLU's kink.
Tensor away_from_zero(Tensor t, float margin) {
    for (auto& v : t.span()) v += v >= 0.0f ? margin : -margin;
    return t;
}

Shape shape_for(int seed) {
    switch (seed) {
        case 1: return {7};
        case 2: return {3, 5};
        default: return {2, 3, 4};
    }
}

}  // namespace

TEST_CASE("relu, gelu and silu match a double-precision reference", "[activation]") {
    auto seed = GENERATE(1, 2, 3);
    // A small tensor and one large enough (> 2^16 elements) to run over several chunks in parallel.
    auto shape = GENERATE_COPY(shape_for(seed), Shape{300, 301});
    Tensor x = random_tensor(shape, seed, -6.0f, 6.0f);
    Tape tape;
    Var v = tape.constant(x);
    REQUIRE(max_error(relu(v).value(), x, ref_relu) == 0.0);
    REQUIRE(max_error(gelu(v).value(), x, ref_gelu) < 1e-5);
    REQUIRE(max_error(silu(v).value(), x, ref_silu) < 1e-5);
}

TEST_CASE("activations stay finite for extreme inputs", "[activation]") {
    Tensor x = Tensor::from({6}, std::vector<float>{-1e30f, -1e4f, -100.0f, 100.0f, 1e4f, 1e30f});
    Tape tape;
    Var v = tape.input(x);
    for (auto fn : {&relu, &gelu, &silu}) {
        Var y = fn(v);
        for (float f : y.value().span()) REQUIRE(std::isfinite(f));
        tape.backward(y, Tensor::full(x.shape(), 1.0f));
        for (float f : v.grad().span()) REQUIRE(std::isfinite(f));
    }
    Var s = silu(v);
    REQUIRE(s.value().at(0) == 0.0f);
    REQUIRE(s.value().at(5) == 1e30f);
}

TEST_CASE("relu, gelu and silu gradients match finite differences", "[grad][activation]") {
    auto seed = GENERATE(1, 2, 3);
    const Shape shape = shape_for(seed);
    Tensor x = away_from_zero(random_tensor(shape, seed, -2.0f, 2.0f), 0.1f);
    for (auto fn : {&relu, &gelu, &silu}) {
        auto r = gradcheck([fn](Tape&, std::span<const Var> v) { return fn(v[0]); }, {x});
        INFO(r);
        REQUIRE(r.ok);
    }
}

TEST_CASE("swiglu matches silu(gate) * up", "[activation]") {
    auto seed = GENERATE(1, 2, 3);
    auto shape = GENERATE_COPY(shape_for(seed), Shape{2, 256, 130});
    Tensor gate = random_tensor(shape, seed, -5.0f, 5.0f), up = random_tensor(shape, seed + 10, -2.0f, 2.0f);
    Tape tape;
    const Tensor& y = swiglu(tape.constant(gate), tape.constant(up)).value();
    REQUIRE(y.shape() == shape);
    double worst = 0.0;
    for (std::int64_t k = 0; k < y.numel(); ++k)
        worst = std::max(worst, std::abs(y.at(k) - ref_silu(gate.at(k)) * up.at(k)));
    REQUIRE(worst < 1e-5);
}

TEST_CASE("swiglu gradients match finite differences", "[grad][activation]") {
    auto seed = GENERATE(1, 2, 3);
    const Shape shape = shape_for(seed);
    Tensor gate = random_tensor(shape, seed, -3.0f, 3.0f), up = random_tensor(shape, seed + 10);
    auto build = [](Tape&, std::span<const Var> v) { return swiglu(v[0], v[1]); };
    auto both = gradcheck(build, {gate, up});
    INFO(both);
    REQUIRE(both.ok);
    // Only one side trainable: the other gets no gradient buffer.
    auto gate_only = gradcheck(build, {gate, up}, {true, false});
    INFO(gate_only);
    REQUIRE(gate_only.ok);
    auto up_only = gradcheck(build, {gate, up}, {false, true});
    INFO(up_only);
    REQUIRE(up_only.ok);
}

TEST_CASE("swiglu rejects mismatched shapes, naming both", "[activation]") {
    Tape tape;
    Var gate = tape.constant(Tensor::zeros({2, 8})), up = tape.constant(Tensor::zeros({2, 4}));
    REQUIRE_THROWS_WITH(swiglu(gate, up),
                        Catch::Contains("swiglu") && Catch::Contains("[2, 8]") && Catch::Contains("[2, 4]"));
}
