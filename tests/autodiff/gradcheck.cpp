#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

using namespace mopt;
using namespace mopt::autodiff;

namespace {
// A deliberately wrong op: forward x², backward claims 3x (the truth is 2x).
Var wrong_square(const Var& x) {
    Tape& tape = x.tape();
    Tensor out = tape.alloc(x.shape());
    for (std::int64_t i = 0; i < out.numel(); ++i) out.at(i) = x.value().at(i) * x.value().at(i);
    return tape.record("wrong_square", out, {x}, [](Tape& t, Node& n) {
        Tensor& g = t.grad_of(n, 0);
        for (std::int64_t i = 0; i < g.numel(); ++i) g.at(i) += 3.0f * t.value_of(n, 0).at(i) * n.grad.at(i);
    });
}
}  // namespace

TEST_CASE("gradcheck catches a wrong backward", "[grad]") {
    Tensor x = Tensor::full({3, 4}, 0.7f);
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return wrong_square(v[0]); }, {x});
    INFO(r);
    REQUIRE_FALSE(r.ok);
    auto good = gradcheck([](Tape&, std::span<const Var> v) { return mul(v[0], v[0]); }, {x});
    INFO(good);
    REQUIRE(good.ok);
    REQUIRE(good.checked == 12);
}

namespace {
// The custom op of docs/tutorial.md, compiled here so the tutorial stays true.
// y = x³. x: any shape -> same shape
Var cube(const Var& x) {
    Tape& tape = x.tape();
    Tensor y = tape.alloc(x.shape());
    for (std::int64_t i = 0; i < y.numel(); ++i) y.at(i) = std::pow(x.value().at(i), 3.0f);
    return tape.record("cube", y, {x}, [](Tape& t, Node& n) {
        if (!t.wants_grad(n, 0)) return;
        const Tensor& in = t.value_of(n, 0);
        Tensor& g = t.grad_of(n, 0);
        for (std::int64_t i = 0; i < g.numel(); ++i) g.at(i) += 3.0f * in.at(i) * in.at(i) * n.grad.at(i);
    });
}
}  // namespace

TEST_CASE("the tutorial's user-defined op passes gradcheck", "[grad]") {
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return cube(v[0]); }, {Tensor::full({3, 4}, 0.7f)});
    INFO(r);
    REQUIRE(r.ok);
}
