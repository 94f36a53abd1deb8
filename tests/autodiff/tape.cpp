#include <malloc.h>

#include <catch2/catch.hpp>
#include <limits>
#include <mopt/mopt.hpp>

using namespace mopt;
using namespace mopt::autodiff;

TEST_CASE("gradients reach trainable leaves only", "[tape]") {
    Parameter w("w", Tensor::full({2, 3}, 0.5f));
    Parameter frozen("frozen", Tensor::full({3, 2}, 0.25f), /*trainable=*/false);
    REQUIRE_FALSE(frozen.grad().defined());  // no gradient buffer for a frozen weight
    Tape tape;
    Var x = tape.constant(Tensor::full({4, 2}, 1.0f));
    Var h = linear(x, tape.parameter(frozen));  // [4, 3], constant: nothing trainable below
    REQUIRE_FALSE(h.requires_grad());
    Var y = linear(h, tape.parameter(w));  // [4, 2]
    REQUIRE(y.requires_grad());
    tape.backward(sum(y));
    // y = h wᵀ, dL/dw[o][i] = Σ_rows h[r][i] = 4 * 0.5
    for (float g : w.grad().span()) REQUIRE(g == Approx(2.0f));
    REQUIRE_FALSE(h.grad().defined());  // no gradient was computed for the frozen branch
}

TEST_CASE("backward visits only nodes that lead to a trainable leaf", "[tape]") {
    Parameter p("p", Tensor::full({1, 4}, 1.0f));
    Tape tape;
    Var x = tape.constant(Tensor::full({1, 4}, 2.0f));
    Var a = scale(x, 3.0f);                    // constant chain: 3 nodes
    Var b = add(a, x);
    Var c = mul(b, b);
    Var d = mul(c, tape.parameter(p));         // first node that needs a gradient
    Var e = scale(d, 0.5f);
    Var loss = sum(e);
    tape.backward(loss);
    REQUIRE(tape.last_backward_visits() == 3);  // d, e, loss: never a, b, c
    REQUIRE_FALSE(c.requires_grad());
    REQUIRE(p.grad().at(0) == Approx(0.5f * 64.0f));
}

TEST_CASE("no_grad records no backward", "[tape]") {
    Parameter p("p", Tensor::full({2}, 1.0f));
    Tape tape;
    NoGrad guard;
    Var y = sum(mul(tape.parameter(p), tape.parameter(p)));
    REQUIRE_FALSE(y.requires_grad());
    REQUIRE_THROWS_WITH(tape.backward(y), Catch::Contains("does not depend on any trainable"));
}

TEST_CASE("a NaN or Inf loss is an error naming the step", "[tape]") {
    Parameter p("p", Tensor::full({1}, 1.0f));
    Tape tape;
    tape.reset();
    tape.reset();  // step 2
    Var y = sum(mul(tape.parameter(p), tape.constant(Tensor::full({1}, std::numeric_limits<float>::quiet_NaN()))));
    REQUIRE_THROWS_WITH(tape.backward(y), Catch::Contains("nan") && Catch::Contains("step 2"));
    tape.reset();
    Var z = sum(mul(tape.parameter(p), tape.constant(Tensor::full({1}, std::numeric_limits<float>::infinity()))));
    REQUIRE_THROWS_WITH(tape.backward(z), Catch::Contains("inf") && Catch::Contains("step 3"));
}

TEST_CASE("the loss must be a scalar on the same tape", "[tape]") {
    Parameter p("p", Tensor::full({2}, 1.0f));
    Tape tape;
    Var y = mul(tape.parameter(p), tape.parameter(p));
    REQUIRE_THROWS_WITH(tape.backward(y), Catch::Contains("scalar") && Catch::Contains("[2]"));
}

TEST_CASE("gradients accumulate over repeated uses of a parameter", "[tape]") {
    Parameter p("p", Tensor::full({3}, 2.0f));
    Tape tape;
    Var v = tape.parameter(p);
    tape.backward(sum(add(mul(v, v), v)));  // d/dp (p² + p) = 2p + 1
    for (float g : p.grad().span()) REQUIRE(g == Approx(5.0f));
}

namespace {
// One training step of a small two-layer model; returns the loss.
float train_step(Tape& tape, Parameter& w1, Parameter& w2, const Tensor& x, train::AdamW& opt) {
    tape.reset();
    Var h = linear(tape.constant(x), tape.parameter(w1));
    Var y = linear(mul(h, h), tape.parameter(w2));
    Var loss = mean(mul(y, y));
    tape.backward(loss);
    opt.step();
    return loss.item();
}
}  // namespace

TEST_CASE("tape memory is reused: no heap growth in the steady state", "[tape]") {
    Parameter w1("w1", Tensor::full({32, 16}, 0.01f)), w2("w2", Tensor::full({8, 32}, 0.02f));
    Tensor x = Tensor::full({64, 16}, 1.0f);
    train::AdamW opt({&w1, &w2});
    Tape tape(1024);  // deliberately small: the first steps grow it
    for (int s = 0; s < 10; ++s) train_step(tape, w1, w2, x, opt);  // warm-up: arena, threads, BLAS buffers
    const std::size_t arena_capacity = tape.arena().capacity();
    const std::size_t node_capacity = tape.node_capacity();
    const std::size_t heap_in_use = mallinfo2().uordblks;
    for (int s = 0; s < 50; ++s) train_step(tape, w1, w2, x, opt);
    REQUIRE(tape.arena().capacity() == arena_capacity);
    REQUIRE(tape.arena().blocks() == 1);
    REQUIRE(tape.node_capacity() == node_capacity);
    REQUIRE(mallinfo2().uordblks <= heap_in_use);
}
