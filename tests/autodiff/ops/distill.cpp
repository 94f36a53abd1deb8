// Tests of soft_cross_entropy (autodiff/ops/distill.hpp), the knowledge-distillation loss: its value
// against τ²·(KL + entropy) computed by a naive double loop, its gradient against finite differences
// and against (τ/count)(q − p), no gradient when the student equals the teacher, ignored rows, the
// one-hot limit (plain cross_entropy), and errors that name the op and the shapes.
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

// softmax(x / τ) of row r in double.
std::vector<double> ref_soft(const Tensor& x, std::int64_t r, double tau) {
    const std::int64_t v = x.shape().back();
    std::vector<double> p(static_cast<std::size_t>(v));
    double m = -INFINITY, s = 0.0;
    for (std::int64_t j = 0; j < v; ++j) m = std::max(m, x.at(r * v + j) / tau);
    for (std::int64_t j = 0; j < v; ++j) s += std::exp(x.at(r * v + j) / tau - m);
    for (std::int64_t j = 0; j < v; ++j) p[static_cast<std::size_t>(j)] = std::exp(x.at(r * v + j) / tau - m) / s;
    return p;
}

bool counted(const Tensor* targets, std::int64_t r) {
    return targets == nullptr || targets->span<std::int32_t>()[static_cast<std::size_t>(r)] != -100;
}

// τ² · mean over counted rows of KL(p ‖ q) + H(p), each term by its own definition.
double ref_kd(const Tensor& z, const Tensor& t, double tau, const Tensor* targets = nullptr) {
    const std::int64_t v = z.shape().back(), rows = z.numel() / v;
    double total = 0.0;
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        if (!counted(targets, r)) continue;
        const std::vector<double> p = ref_soft(t, r, tau), q = ref_soft(z, r, tau);
        double kl = 0.0, entropy = 0.0;
        for (std::size_t j = 0; j < p.size(); ++j) {
            kl += p[j] * std::log(p[j] / q[j]);
            entropy -= p[j] * std::log(p[j]);
        }
        total += kl + entropy;
        ++count;
    }
    return tau * tau * total / static_cast<double>(count);
}

// The gradient of the loss: (τ/count)(q − p) on counted rows, 0 elsewhere.
Tensor ref_grad(const Tensor& z, const Tensor& t, double tau, const Tensor* targets = nullptr) {
    const std::int64_t v = z.shape().back(), rows = z.numel() / v;
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) count += counted(targets, r) ? 1 : 0;
    Tensor g = Tensor::zeros(z.shape());
    for (std::int64_t r = 0; r < rows; ++r) {
        if (!counted(targets, r)) continue;
        const std::vector<double> p = ref_soft(t, r, tau), q = ref_soft(z, r, tau);
        for (std::int64_t j = 0; j < v; ++j)
            g.at(r * v + j) = static_cast<float>(tau / count * (q[static_cast<std::size_t>(j)] - p[static_cast<std::size_t>(j)]));
    }
    return g;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
    double worst = 0.0;
    for (std::int64_t k = 0; k < a.numel(); ++k) worst = std::max(worst, std::abs(double(a.at(k)) - b.at(k)));
    return worst;
}

// The loss and the gradient of the student's logits.
std::pair<double, Tensor> loss_and_grad(const Tensor& z, const Tensor& t, SoftCrossEntropyOptions o) {
    Tape tape;
    Var zv = tape.input(z);
    Var loss = soft_cross_entropy(zv, t, o);
    tape.backward(loss);
    return {loss.item(), zv.grad().clone()};
}

}  // namespace

TEST_CASE("soft_cross_entropy equals tau^2 (KL + entropy) of a naive loop, and its gradient (tau/count)(q - p)",
          "[distill]") {
    const auto seed = GENERATE(1, 2, 3);
    const float tau = GENERATE(1.0f, 2.0f, 0.5f);
    const bool masked = GENERATE(false, true);
    Tensor z = random_tensor({3, 5, 37}, seed, -4.0f, 4.0f);
    Tensor t = random_tensor({3, 5, 37}, seed + 100, -4.0f, 4.0f);
    Tensor targets = random_ids({3, 5}, seed + 7, 37);
    targets.span<std::int32_t>()[2] = -100;
    targets.span<std::int32_t>()[static_cast<std::size_t>(seed) + 9] = -100;
    const Tensor* tp = masked ? &targets : nullptr;
    INFO("seed " << seed << ", tau " << tau << ", masked " << masked);
    const auto [loss, grad] = loss_and_grad(z, t, {.temperature = tau, .targets = tp});
    CHECK(loss == Approx(ref_kd(z, t, tau, tp)).epsilon(1e-5));
    CHECK(max_abs_diff(grad, ref_grad(z, t, tau, tp)) < 1e-7);
    if (masked)  // ignored rows get no gradient at all
        for (std::int64_t j = 0; j < 37; ++j) CHECK(grad.at(2 * 37 + j) == 0.0f);
}

TEST_CASE("soft_cross_entropy gradients match finite differences", "[grad][distill]") {
    const auto seed = GENERATE(1, 2, 3);
    const float tau = GENERATE(1.0f, 2.5f);
    Tensor z = random_tensor({2, 4, 7}, seed, -2.0f, 2.0f);
    Tensor t = random_tensor({2, 4, 7}, seed + 50, -3.0f, 3.0f);
    Tensor targets = random_ids({2, 4}, seed + 10, 7);
    targets.span<std::int32_t>()[static_cast<std::size_t>(seed)] = -100;
    INFO("seed " << seed << ", tau " << tau);
    // The teacher travels as a second input that is not differentiated (it is data to the op).
    auto r = gradcheck(
        [&](Tape&, std::span<const Var> v) {
            return soft_cross_entropy(v[0], v[1].value(), {.temperature = tau, .targets = &targets});
        },
        {z, t}, {true, false});
    INFO(r);
    REQUIRE(r.ok);
    REQUIRE(r.checked == 48);
}

TEST_CASE("soft_cross_entropy has no gradient when the student equals the teacher", "[distill]") {
    const float tau = GENERATE(1.0f, 3.0f);
    Tensor z = random_tensor({6, 50}, 4, -5.0f, 5.0f);
    // The very same logits: both softmaxes are computed alike, so the gradient is exactly 0.
    const auto [same_loss, same_grad] = loss_and_grad(z, z.clone(), {.temperature = tau});
    for (std::int64_t k = 0; k < same_grad.numel(); ++k) REQUIRE(same_grad.at(k) == 0.0f);
    // The same distribution: the teacher's logits shifted by a constant per row (0 up to rounding).
    Tensor t = z.clone();
    for (std::int64_t r = 0; r < 6; ++r)
        for (std::int64_t j = 0; j < 50; ++j) t.at(r * 50 + j) += static_cast<float>(r) - 2.5f;
    const auto [loss, grad] = loss_and_grad(z, t, {.temperature = tau});
    double worst = 0.0;
    for (std::int64_t k = 0; k < grad.numel(); ++k) worst = std::max(worst, double(std::abs(grad.at(k))));
    INFO("largest |gradient| " << worst);
    CHECK(worst < 1e-6);
    CHECK(loss == Approx(same_loss).epsilon(1e-5));
    // What is left is the teacher's entropy (times τ²): the KL part is 0.
    double entropy = 0.0;
    for (std::int64_t r = 0; r < 6; ++r)
        for (const double p : ref_soft(t, r, tau)) entropy -= p * std::log(p);
    CHECK(loss == Approx(tau * tau * entropy / 6.0).epsilon(1e-5));
    CHECK(loss > 0.0);
    // A different student: the loss is larger and the gradient is not 0.
    const auto [other, other_grad] = loss_and_grad(random_tensor({6, 50}, 5, -5.0f, 5.0f), t, {.temperature = tau});
    CHECK(other > loss + 0.1);
    CHECK(max_abs_diff(other_grad, Tensor::zeros({6, 50})) > 1e-3);
}

TEST_CASE("soft_cross_entropy against a one-hot teacher is cross_entropy", "[distill]") {
    Tensor z = random_tensor({4, 3, 11}, 8, -3.0f, 3.0f);
    Tensor targets = random_ids({4, 3}, 9, 11);
    targets.span<std::int32_t>()[5] = -100;
    // Logits 0 / 60: the teacher puts all but e^-60 of its mass on the target.
    Tensor t = Tensor::zeros(z.shape());
    for (std::int64_t r = 0; r < 12; ++r) {
        const std::int32_t k = targets.span<std::int32_t>()[static_cast<std::size_t>(r)];
        t.at(r * 11 + (k < 0 ? 0 : k)) = 60.0f;
    }
    Tape tape;
    Var zv = tape.input(z);
    const double kd = soft_cross_entropy(zv, t, {.targets = &targets}).item();
    const double ce = cross_entropy(zv, targets).item();
    CHECK(kd == Approx(ce).epsilon(1e-5));
}

TEST_CASE("soft_cross_entropy errors name the op, the shapes and the setting", "[distill]") {
    Tape tape;
    Var z = tape.constant(Tensor::zeros({2, 3, 5}));
    SECTION("teacher shape") {
        REQUIRE_THROWS_WITH(soft_cross_entropy(z, Tensor::zeros({2, 3, 6})),
                            Catch::Contains("soft_cross_entropy") && Catch::Contains("[2, 3, 6]") &&
                                Catch::Contains("[2, 3, 5]"));
    }
    SECTION("temperature") {
        for (const float tau : {0.0f, -1.0f, NAN})
            REQUIRE_THROWS_WITH(soft_cross_entropy(z, Tensor::zeros({2, 3, 5}), {.temperature = tau}),
                                Catch::Contains("temperature"));
    }
    SECTION("targets shape") {
        const Tensor bad = Tensor::zeros({2, 4}, DType::i32);
        REQUIRE_THROWS_WITH(soft_cross_entropy(z, Tensor::zeros({2, 3, 5}), {.targets = &bad}),
                            Catch::Contains("targets") && Catch::Contains("[2, 4]"));
    }
    SECTION("every row ignored") {
        Tensor all = Tensor::empty({2, 3}, DType::i32);
        for (auto& v : all.span<std::int32_t>()) v = -100;
        REQUIRE_THROWS_WITH(soft_cross_entropy(z, Tensor::zeros({2, 3, 5}), {.targets = &all}),
                            Catch::Contains("ignore_index"));
    }
    SECTION("teacher dtype") {
        REQUIRE_THROWS_WITH(soft_cross_entropy(z, Tensor::zeros({2, 3, 5}, DType::i32)),
                            Catch::Contains("teacher logits") && Catch::Contains("f32"));
    }
}
