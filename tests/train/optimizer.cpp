#include <catch2/catch.hpp>
#include <cmath>
#include <mopt/mopt.hpp>
#include <sstream>

#include "../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;

namespace {
// One AdamW step computed by hand (Loshchilov & Hutter, Alg. 2) for a single weight.
float adamw_reference(float w, float g, int steps, const train::AdamWOptions& o) {
    float m = 0, v = 0;
    for (int t = 1; t <= steps; ++t) {
        m = o.beta1 * m + (1 - o.beta1) * g;
        v = o.beta2 * v + (1 - o.beta2) * g * g;
        const float mh = m / (1 - std::pow(o.beta1, static_cast<float>(t)));
        const float vh = v / (1 - std::pow(o.beta2, static_cast<float>(t)));
        w -= o.lr * (mh / (std::sqrt(vh) + o.eps) + o.weight_decay * w);
    }
    return w;
}
}  // namespace

TEST_CASE("AdamW matches the reference update with decoupled weight decay", "[optim]") {
    train::AdamWOptions o{.lr = 0.1f, .weight_decay = 0.1f};
    Parameter p("p", Tensor::full({1}, 2.0f));
    train::AdamW opt({&p}, o);
    for (int t = 0; t < 3; ++t) {
        p.grad().at(0) = 0.5f;  // a constant gradient
        opt.step();
        REQUIRE(p.grad().at(0) == 0.0f);  // zeroed after the step
    }
    REQUIRE(p.value().at(0) == Approx(adamw_reference(2.0f, 0.5f, 3, o)).epsilon(1e-5));
}

TEST_CASE("optimizers keep no state for frozen parameters and skip them", "[optim]") {
    Parameter a("a", Tensor::full({2}, 1.0f)), frozen("frozen", Tensor::full({2}, 1.0f), false);
    train::AdamW opt({&a, &frozen});
    REQUIRE(opt.parameters().size() == 1);
    a.grad().fill(1.0f);
    opt.step();
    REQUIRE(frozen.value().at(0) == 1.0f);
    REQUIRE(a.value().at(0) < 1.0f);
}

TEST_CASE("SGD with momentum minimises a quadratic", "[optim]") {
    Parameter w("w", Tensor::full({3}, 5.0f));
    train::SGD opt({&w}, {.lr = 0.05f, .momentum = 0.9f});
    Tape tape;
    for (int s = 0; s < 200; ++s) {
        tape.reset();
        Var v = tape.parameter(w);
        tape.backward(sum(mul(v, v)));
        opt.step();
    }
    for (float x : w.value().span()) REQUIRE(std::abs(x) < 1e-3f);
}

TEST_CASE("clip_grad_norm scales to the global norm", "[optim]") {
    Parameter a("a", Tensor::zeros({2})), b("b", Tensor::zeros({1}));
    a.grad().at(0) = 3.0f;
    b.grad().at(0) = 4.0f;
    REQUIRE(train::clip_grad_norm({&a, &b}, 1.0) == Approx(5.0));
    REQUIRE(a.grad().at(0) == Approx(0.6f));
    REQUIRE(b.grad().at(0) == Approx(0.8f));
    REQUIRE(train::clip_grad_norm({&a, &b}, 10.0) == Approx(1.0));  // below the bound: unchanged
    REQUIRE(a.grad().at(0) == Approx(0.6f));
    b.grad().at(0) = std::nanf("");
    REQUIRE_THROWS_WITH(train::clip_grad_norm({&a, &b}, 1.0), Catch::Contains("'b'"));
}

TEST_CASE("optimizer state saves and restores exactly", "[optim]") {
    auto run = [](train::AdamW& opt, Parameter& p, int from, int to) {
        for (int s = from; s < to; ++s) {
            for (std::int64_t i = 0; i < p.numel(); ++i) p.grad().at(i) = std::sin(static_cast<float>(s + i));
            opt.step();
        }
    };
    Parameter p("p", test::random_tensor({4}, 1));
    train::AdamW opt({&p}, {.lr = 0.01f});
    run(opt, p, 0, 5);
    std::stringstream state;
    opt.save(state);
    const Tensor snapshot = p.value().clone();
    run(opt, p, 5, 10);  // continue uninterrupted

    Parameter q("p", snapshot.clone());
    train::AdamW resumed({&q}, {.lr = 0.01f});
    resumed.load(state);
    REQUIRE(resumed.steps() == 5);
    run(resumed, q, 5, 10);
    REQUIRE(q.value().to_vector() == p.value().to_vector());  // bit-identical

    Parameter other("other", Tensor::zeros({4}));
    train::AdamW wrong({&other});
    std::stringstream again;
    opt.save(again);
    REQUIRE_THROWS_WITH(wrong.load(again), Catch::Contains("'other"));
    std::stringstream truncated(state.str().substr(0, 40));
    REQUIRE_THROWS_WITH(resumed.load(truncated), Catch::Contains("truncated"));
}
