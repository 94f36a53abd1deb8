#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <cmath>
#include <vector>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

namespace {

// Independent reference in double: rotates each pair of x[b, t, h, :] by (start_pos + t) * theta^(-2i/Dh).
std::vector<double> naive_rope(const Tensor& x, const RopeOptions& opt) {
    const std::int64_t B = x.dim(0), T = x.dim(1), H = x.dim(2), D = x.dim(3);
    std::vector<double> y(static_cast<std::size_t>(x.numel()));
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t t = 0; t < T; ++t)
            for (std::int64_t h = 0; h < H; ++h) {
                const std::int64_t base = ((b * T + t) * H + h) * D;
                for (std::int64_t i = 0; i < D / 2; ++i) {
                    const double angle = static_cast<double>(opt.start_pos + t) *
                                         std::pow(static_cast<double>(opt.theta), -2.0 * i / static_cast<double>(D));
                    const std::int64_t a = opt.style == RopeStyle::half ? i : 2 * i;
                    const std::int64_t c = opt.style == RopeStyle::half ? i + D / 2 : 2 * i + 1;
                    const double xa = x.at(base + a), xc = x.at(base + c);
                    y[static_cast<std::size_t>(base + a)] = xa * std::cos(angle) - xc * std::sin(angle);
                    y[static_cast<std::size_t>(base + c)] = xa * std::sin(angle) + xc * std::cos(angle);
                }
            }
    return y;
}

// The same vector at every position: [1, T, 1, D].
Tensor repeat_over_positions(const Tensor& vec, std::int64_t T) {
    const std::int64_t D = vec.numel();
    Tensor x = Tensor::empty({1, T, 1, D});
    for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t i = 0; i < D; ++i) x.at(t * D + i) = vec.at(i);
    return x;
}

}  // namespace

TEST_CASE("rope forward matches a naive loop for both pairings", "[rope]") {
    const auto style = GENERATE(RopeStyle::half, RopeStyle::interleaved);
    const auto start = GENERATE(std::int64_t{0}, std::int64_t{7});
    const RopeOptions opt{.theta = 500.0f, .start_pos = start, .style = style};
    Tensor x = random_tensor({2, 5, 3, 8}, 11);
    Tape tape;
    Var y = rope(tape.constant(x), opt);
    REQUIRE(y.shape() == x.shape());
    const auto expect = naive_rope(x, opt);
    for (std::int64_t k = 0; k < x.numel(); ++k) REQUIRE(y.value().at(k) == Approx(expect[k]).margin(1e-5));

    // The two pairings are different maps (a checkpoint read with the wrong one must not pass).
    if (start != 0) {
        RopeOptions other = opt;
        other.style = style == RopeStyle::half ? RopeStyle::interleaved : RopeStyle::half;
        Var z = rope(tape.constant(x), other);
        double diff = 0;
        for (std::int64_t k = 0; k < x.numel(); ++k) diff += std::abs(z.value().at(k) - y.value().at(k));
        REQUIRE(diff > 1e-2);
    }
}

TEST_CASE("rope: q·k depends only on the position offset m - n", "[rope]") {
    const auto style = GENERATE(RopeStyle::half, RopeStyle::interleaved);
    const std::int64_t T = 12, D = 16;
    Tensor qv = random_tensor({D}, 3), kv = random_tensor({D}, 4);
    Tape tape;
    const RopeOptions opt{.start_pos = 5, .style = style};
    const Tensor q = rope(tape.constant(repeat_over_positions(qv, T)), opt).value();
    const Tensor k = rope(tape.constant(repeat_over_positions(kv, T)), opt).value();
    auto dot = [&](std::int64_t m, std::int64_t n) {
        double s = 0;
        for (std::int64_t i = 0; i < D; ++i) s += static_cast<double>(q.at(m * D + i)) * k.at(n * D + i);
        return s;
    };
    for (std::int64_t offset : {-3, 0, 2, 5}) {
        const std::int64_t m0 = std::max<std::int64_t>(offset, 0);
        const double first = dot(m0, m0 - offset);
        for (std::int64_t m = m0 + 1; m < T && m - offset < T; ++m)
            REQUIRE(dot(m, m - offset) == Approx(first).margin(1e-4));
    }
    // ... and does depend on it (the property is not vacuous).
    REQUIRE(std::abs(dot(4, 4) - dot(4, 1)) > 1e-3);
}

TEST_CASE("rope gradient (rotation by the negative angle)", "[grad][rope]") {
    const auto style = GENERATE(RopeStyle::half, RopeStyle::interleaved);
    Tensor x = random_tensor({2, 4, 3, 6}, 21);
    const RopeOptions opt{.theta = 100.0f, .start_pos = 3, .style = style};
    auto r = gradcheck([opt](Tape&, std::span<const Var> v) { return rope(v[0], opt); }, {x});
    INFO(r);
    REQUIRE(r.ok);
}

TEST_CASE("rope shape errors name the op and the shape", "[rope]") {
    Tape tape;
    REQUIRE_THROWS_WITH(rope(tape.constant(Tensor::zeros({1, 2, 1, 5}))),
                        Catch::Contains("rope") && Catch::Contains("even") && Catch::Contains("[1, 2, 1, 5]"));
    REQUIRE_THROWS_WITH(rope(tape.constant(Tensor::zeros({2, 4, 8}))),
                        Catch::Contains("rope") && Catch::Contains("4-D") && Catch::Contains("[2, 4, 8]"));
}
