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

TEST_CASE("train::step clips by the optimizers' global norm, then steps each", "[optim]") {
    Parameter a("a", Tensor::full({2}, 1.0f)), b("b", Tensor::full({1}, 1.0f));
    Parameter a2("a", Tensor::full({2}, 1.0f)), b2("b", Tensor::full({1}, 1.0f));
    train::AdamW oa({&a}, {.lr = 0.1f}), ob({&b}, {.lr = 0.1f, .weight_decay = 0.0f});
    train::SGD sa({&a2}, {.lr = 1.0f}), sb({&b2}, {.lr = 1.0f});
    struct NoModel {} model;  // a model without its own optimizer_step: the host's clip and steps
    a2.grad().at(0) = 3.0f;
    b2.grad().at(0) = 4.0f;
    REQUIRE(train::step(model, 1.0, sa, sb) == Approx(5.0));
    REQUIRE(a2.value().at(0) == Approx(1.0f - 0.6f));  // SGD moves by the clipped gradient
    REQUIRE(b2.value().at(0) == Approx(1.0f - 0.8f));
    REQUIRE(a2.grad().at(0) == 0.0f);
    a2.grad().at(0) = 3.0f;
    b2.grad().at(0) = 4.0f;
    REQUIRE(train::step(model, 0.0, sa, sb) == Approx(5.0));  // max_norm 0: measured, not clipped
    REQUIRE(a2.value().at(0) == Approx(0.4f - 3.0f));
    a.grad().at(0) = 1.0f;
    REQUIRE(train::step(model, 1.0, oa, ob) == Approx(1.0));
    REQUIRE(oa.steps() == 1);
    REQUIRE(ob.steps() == 1);
}

// A model that runs its own step (as Transformer<…, backend::Cuda> pretraining does) gets the call.
TEST_CASE("train::step hands the step to a model's optimizer_step", "[optim]") {
    struct OwnStep {
        int calls = 0;
        double optimizer_step(double max_norm, train::AdamW&) { return ++calls + max_norm; }
    } model;
    Parameter a("a", Tensor::full({1}, 1.0f));
    train::AdamW opt({&a});
    REQUIRE(train::step(model, 0.5, opt) == Approx(1.5));
    REQUIRE(model.calls == 1);
    REQUIRE(opt.steps() == 0);
}

// The contract a device keeps with an AdamW whose state it holds (Transformer<…, Cuda>'s device
// optimizer): reads fetch, load releases without fetching, the host step is refused, and
// destroying or moving the optimizer brings the state home (release with fetch).
TEST_CASE("AdamW with its state on a device: fetch, release and refusal", "[optim]") {
    Parameter p("p", Tensor::full({2}, 1.0f));
    int fetched = 0, released_home = 0, released_dropped = 0;
    auto residence = [&] {
        return train::AdamW::Residence{.fetch = [&] { ++fetched; },
                                       .release = [&](bool fetch_first) { ++(fetch_first ? released_home : released_dropped); }};
    };
    std::stringstream saved;
    {
        train::AdamW opt({&p});
        opt.attach(residence());
        REQUIRE(opt.attached());
        REQUIRE_THROWS_WITH(opt.step(), Catch::Contains("train::step"));
        opt.save(saved);  // reads the state: fetched first
        REQUIRE(fetched == 1);
        const std::string text = saved.str();
        std::istringstream in(text);
        opt.load(in);  // the host's state replaces the device's: released without fetching, detached
        REQUIRE(released_dropped == 1);
        REQUIRE_FALSE(opt.attached());
        opt.attach(residence());
        train::AdamW moved(std::move(opt));  // the moved-from optimizer brings its state home
        REQUIRE(released_home == 1);
        REQUIRE_FALSE(moved.attached());
        moved.attach(residence());
    }  // destroyed while attached: home again
    REQUIRE(released_home == 2);
    REQUIRE(released_dropped == 1);
}
