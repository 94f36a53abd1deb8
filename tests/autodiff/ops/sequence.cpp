#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

TEST_CASE("concat_seq puts a before b along the sequence axis", "[grad][sequence]") {
    Tensor a = random_tensor({2, 3, 4}, 1), b = random_tensor({2, 5, 4}, 2);
    Tape tape;
    Var c = concat_seq(tape.constant(a), tape.constant(b));
    REQUIRE(c.shape() == Shape{2, 8, 4});
    REQUIRE(c.value().at((1 * 8 + 2) * 4 + 1) == a.at((1 * 3 + 2) * 4 + 1));
    REQUIRE(c.value().at((1 * 8 + 3) * 4 + 1) == b.at((1 * 5 + 0) * 4 + 1));
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return concat_seq(v[0], v[1]); }, {a, b});
    INFO(r);
    REQUIRE(r.ok);
    REQUIRE_THROWS_WITH(concat_seq(tape.constant(a), tape.constant(Tensor::zeros({2, 5, 3}))),
                        Catch::Contains("concat_seq") && Catch::Contains("[2, 5, 3]"));
}

TEST_CASE("slice_seq keeps a window of positions", "[grad][sequence]") {
    Tensor x = random_tensor({2, 6, 2, 3}, 3);  // trailing axes are one feature axis
    Tape tape;
    Var s = slice_seq(tape.constant(x), 2, 5);
    REQUIRE(s.shape() == Shape{2, 3, 2, 3});
    REQUIRE(s.value().at(6 * 3 + 1) == x.at((1 * 6 + 2) * 6 + 1));
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return slice_seq(v[0], 1, 4); }, {x});
    INFO(r);
    REQUIRE(r.ok);
    REQUIRE_THROWS_WITH(slice_seq(tape.constant(x), 4, 7), Catch::Contains("out of bounds"));
}

TEST_CASE("mean_seq averages over positions", "[grad][sequence]") {
    Tensor x = random_tensor({3, 5, 4}, 4);
    Tape tape;
    Var m = mean_seq(tape.constant(x));
    REQUIRE(m.shape() == Shape{3, 4});
    double ref = 0;
    for (int t = 0; t < 5; ++t) ref += x.at((2 * 5 + t) * 4 + 3);
    REQUIRE(m.value().at(2 * 4 + 3) == Approx(ref / 5).margin(1e-6));
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return mean_seq(v[0]); }, {x});
    INFO(r);
    REQUIRE(r.ok);
}
