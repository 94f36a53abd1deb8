#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

namespace {

// Independent reference in double: a triple loop over (query, key, feature) per (batch, head) with
// the mask written as the definition states it.
std::vector<double> naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionOptions& opt) {
    const std::int64_t B = q.dim(0), T = q.dim(1), H = q.dim(2), D = q.dim(3);
    const std::int64_t S = k.dim(1), Hkv = k.dim(2);
    const double scale = opt.scale != 0.0f ? opt.scale : 1.0 / std::sqrt(static_cast<double>(D));
    auto qa = [&](auto b, auto t, auto h, auto i) { return static_cast<double>(q.at(((b * T + t) * H + h) * D + i)); };
    auto ka = [&](auto b, auto j, auto h, auto i) { return static_cast<double>(k.at(((b * S + j) * Hkv + h) * D + i)); };
    auto va = [&](auto b, auto j, auto h, auto i) { return static_cast<double>(v.at(((b * S + j) * Hkv + h) * D + i)); };
    std::vector<double> out(static_cast<std::size_t>(q.numel()), 0.0);
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < H; ++h) {
            const std::int64_t kh = h / (H / Hkv);
            for (std::int64_t t = 0; t < T; ++t) {
                const std::int64_t pos = S - T + t;
                std::vector<double> w(static_cast<std::size_t>(S), 0.0);
                std::vector<bool> seen(static_cast<std::size_t>(S), false);
                double mx = -std::numeric_limits<double>::infinity();
                for (std::int64_t j = 0; j < S; ++j) {
                    seen[j] = !opt.causal || j <= pos || j < opt.prefix;
                    if (!seen[j]) continue;
                    double s = 0;
                    for (std::int64_t i = 0; i < D; ++i) s += qa(b, t, h, i) * ka(b, j, kh, i);
                    w[j] = s * scale;
                    mx = std::max(mx, w[j]);
                }
                double total = 0;
                for (std::int64_t j = 0; j < S; ++j) {
                    w[j] = seen[j] ? std::exp(w[j] - mx) : 0.0;
                    total += w[j];
                }
                for (std::int64_t i = 0; i < D; ++i) {
                    double acc = 0;
                    for (std::int64_t j = 0; j < S; ++j) acc += w[j] / total * va(b, j, kh, i);
                    out[static_cast<std::size_t>(((b * T + t) * H + h) * D + i)] = acc;
                }
            }
        }
    return out;
}

struct Case {
    const char* name;
    std::int64_t B, T, S, H, Hkv, D;
    AttentionOptions opt;
};

void check_forward(const Case& c, std::uint64_t seed) {
    INFO(c.name);
    Tensor q = random_tensor({c.B, c.T, c.H, c.D}, seed, -2.0f, 2.0f);
    Tensor k = random_tensor({c.B, c.S, c.Hkv, c.D}, seed + 1, -2.0f, 2.0f);
    Tensor v = random_tensor({c.B, c.S, c.Hkv, c.D}, seed + 2);
    const auto expect = naive_attention(q, k, v, c.opt);
    // Without gradients (scratch scores) and with them (P saved for the backward).
    Tape tape;
    Var y_const = attention(tape.constant(q), tape.constant(k), tape.constant(v), c.opt);
    Var y_grad = attention(tape.input(q), tape.constant(k), tape.input(v), c.opt);
    REQUIRE(y_const.shape() == q.shape());
    for (std::int64_t i = 0; i < q.numel(); ++i) {
        REQUIRE(y_const.value().at(i) == Approx(expect[i]).margin(1e-5));
        REQUIRE(y_grad.value().at(i) == Approx(expect[i]).margin(1e-5));
    }
}

}  // namespace

TEST_CASE("attention forward matches a naive triple loop", "[attention]") {
    const std::vector<Case> cases = {
        {"causal MHA", 2, 6, 6, 3, 3, 4, {}},
        {"causal GQA H=4 Hkv=2", 2, 5, 5, 4, 2, 8, {}},
        {"causal with prefix=3", 2, 6, 6, 2, 1, 4, {.prefix = 3}},
        {"non-causal GQA", 1, 5, 5, 4, 2, 4, {.causal = false}},
        {"KV cache T < S", 2, 3, 7, 4, 2, 4, {}},
        {"single decoding step T = 1", 1, 1, 9, 4, 1, 4, {}},
        {"T < S with prefix and explicit scale", 1, 2, 8, 2, 2, 6, {.prefix = 4, .scale = 0.3f}},
        {"GQA large enough to run in parallel", 2, 32, 32, 8, 4, 16, {.prefix = 5}},
        // More than one 64-row query block: the no-grad path reuses one score block per thread.
        {"causal, three query blocks", 2, 150, 150, 4, 2, 8, {}},
        {"T < S over two query blocks with a prefix", 1, 70, 100, 2, 1, 8, {.prefix = 3}},
    };
    std::uint64_t seed = 100;
    for (const auto& c : cases) check_forward(c, seed += 10);
}

TEST_CASE("attention: a prefix query sees later prefix keys, a plain causal one does not", "[attention]") {
    const std::int64_t T = 5, D = 2;
    Tensor q = random_tensor({1, T, 1, D}, 1), k = random_tensor({1, T, 1, D}, 2);
    Tensor v = Tensor::zeros({1, T, 1, D});
    v.at(2 * D) = 1.0f;  // only key 2 carries a value
    Tape tape;
    auto run = [&](AttentionOptions opt) {
        return attention(tape.constant(q), tape.constant(k), tape.constant(v), opt).value();
    };
    const Tensor with_prefix = run({.prefix = 3});
    const Tensor causal = run({});
    REQUIRE(with_prefix.at(0) > 0.05f);  // query 0 (a prefix position) reads key 2
    REQUIRE(with_prefix.at(1 * D) > 0.05f);
    REQUIRE(causal.at(0) == 0.0f);       // causal: key 2 is in query 0's future
    REQUIRE(causal.at(1 * D) == 0.0f);
    REQUIRE(causal.at(2 * D) > 0.05f);
    // Past the prefix the causal rule is unchanged: query 3 does not see key 4.
    v.zero();
    v.at(4 * D) = 1.0f;
    REQUIRE(run({.prefix = 3}).at(3 * D) == 0.0f);
    REQUIRE(run({.prefix = 3}).at(4 * D) > 0.05f);
}

TEST_CASE("attention gradient: causal GQA with a prefix", "[grad][attention]") {
    Tensor q = random_tensor({2, 5, 4, 4}, 31), k = random_tensor({2, 5, 2, 4}, 32), v = random_tensor({2, 5, 2, 4}, 33);
    auto r = gradcheck([](Tape&, std::span<const Var> x) { return attention(x[0], x[1], x[2], {.prefix = 3}); },
                       {q, k, v});
    INFO(r);
    REQUIRE(r.ok);
}

TEST_CASE("attention gradient: KV cache (T < S), non-causal, and one input at a time", "[grad][attention]") {
    Tensor q = random_tensor({1, 3, 4, 4}, 41), k = random_tensor({1, 6, 1, 4}, 42), v = random_tensor({1, 6, 1, 4}, 43);
    for (AttentionOptions opt : {AttentionOptions{.prefix = 2}, AttentionOptions{.causal = false, .scale = 0.7f}}) {
        auto r = gradcheck([opt](Tape&, std::span<const Var> x) { return attention(x[0], x[1], x[2], opt); },
                           {q, k, v});
        INFO(r);
        REQUIRE(r.ok);
    }
    // Only some inputs trainable (frozen k, v: a soft prompt's queries; frozen q: keys only).
    for (std::vector<bool> flags : {std::vector<bool>{true, false, false}, std::vector<bool>{false, true, false},
                                    std::vector<bool>{false, false, true}}) {
        auto r = gradcheck([](Tape&, std::span<const Var> x) { return attention(x[0], x[1], x[2]); }, {q, k, v},
                           flags);
        INFO(r);
        REQUIRE(r.ok);
    }
}

TEST_CASE("attention gradient on shapes large enough to run in parallel", "[grad][attention]") {
    Tensor q = random_tensor({2, 16, 4, 8}, 51), k = random_tensor({2, 16, 2, 8}, 52),
           v = random_tensor({2, 16, 2, 8}, 53);
    auto r = gradcheck([](Tape&, std::span<const Var> x) { return attention(x[0], x[1], x[2], {.prefix = 4}); },
                       {q, k, v});
    INFO(r);
    REQUIRE(r.ok);
}

TEST_CASE("attention shape errors name the op and the shapes", "[attention]") {
    Tape tape;
    auto z = [&](Shape s) { return tape.constant(Tensor::zeros(s)); };
    REQUIRE_THROWS_WITH(attention(z({2, 5, 4}), z({2, 5, 2, 4}), z({2, 5, 2, 4})),
                        Catch::Contains("attention") && Catch::Contains("4-D") && Catch::Contains("[2, 5, 4]"));
    REQUIRE_THROWS_WITH(attention(z({2, 5, 3, 4}), z({2, 5, 2, 4}), z({2, 5, 2, 4})),
                        Catch::Contains("attention") && Catch::Contains("divisible") && Catch::Contains("[2, 5, 3, 4]"));
    REQUIRE_THROWS_WITH(attention(z({2, 5, 4, 8}), z({2, 5, 2, 4}), z({2, 5, 2, 4})),
                        Catch::Contains("head dims differ") && Catch::Contains("[2, 5, 4, 8]") &&
                            Catch::Contains("[2, 5, 2, 4]"));
    REQUIRE_THROWS_WITH(attention(z({3, 5, 4, 4}), z({2, 5, 2, 4}), z({2, 5, 2, 4})),
                        Catch::Contains("batch sizes differ") && Catch::Contains("[3, 5, 4, 4]"));
    REQUIRE_THROWS_WITH(attention(z({2, 6, 4, 4}), z({2, 5, 2, 4}), z({2, 5, 2, 4})),
                        Catch::Contains("T = 6 > S = 5") && Catch::Contains("[2, 6, 4, 4]"));
    REQUIRE_THROWS_WITH(attention(z({2, 5, 4, 4}), z({2, 5, 2, 4}), z({2, 4, 2, 4})),
                        Catch::Contains("k and v") && Catch::Contains("[2, 4, 2, 4]"));
}
