#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

TEST_CASE("add/sub/mul with and without row broadcasting", "[grad][elementwise]") {
    auto seed = GENERATE(1, 2, 3);
    const std::int64_t rows = 2 + seed, d = 3 + 2 * seed;
    Tensor a = random_tensor({rows, d}, seed), b = random_tensor({rows, d}, seed + 10),
           row = random_tensor({d}, seed + 20);
    for (auto fn : {&add, &sub, &mul}) {
        auto same = gradcheck([fn](Tape&, std::span<const Var> v) { return fn(v[0], v[1]); }, {a, b});
        INFO(same);
        REQUIRE(same.ok);
        auto bcast = gradcheck([fn](Tape&, std::span<const Var> v) { return fn(v[0], v[1]); }, {a, row});
        INFO(bcast);
        REQUIRE(bcast.ok);
    }
    Tape tape;
    Var y = add(tape.constant(a), tape.constant(row));
    REQUIRE(y.value().at(d + 1) == Approx(a.at(d + 1) + row.at(1)));
}

TEST_CASE("scale, reshape, sum and mean", "[grad][elementwise]") {
    Tensor x = random_tensor({2, 3, 4}, 7);
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return scale(reshape(v[0], {6, 4}), -1.5f); }, {x});
    INFO(r);
    REQUIRE(r.ok);
    auto s = gradcheck([](Tape&, std::span<const Var> v) { return mean(v[0]); }, {x});
    INFO(s);
    REQUIRE(s.ok);
    Tape tape;
    double expect = 0;
    for (float f : x.span()) expect += f;
    REQUIRE(sum(tape.constant(x)).item() == Approx(expect).margin(1e-4));
}

TEST_CASE("element-wise shape mismatches name both shapes and the op", "[elementwise]") {
    Tape tape;
    Var a = tape.constant(Tensor::zeros({2, 3})), b = tape.constant(Tensor::zeros({3, 2}));
    REQUIRE_THROWS_WITH(add(a, b), Catch::Contains("add") && Catch::Contains("[2, 3]") && Catch::Contains("[3, 2]"));
    REQUIRE_THROWS_WITH(mul(a, tape.constant(Tensor::zeros({2}))), Catch::Contains("mul"));
}

TEST_CASE("scale_rows multiplies each row by its scalar; gradients to both", "[grad][elementwise]") {
    auto seed = GENERATE(1, 2);
    Tensor x = random_tensor({2, 3, 5}, seed), s = random_tensor({6}, seed + 5);
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return scale_rows(v[0], v[1]); }, {x, s});
    INFO(r);
    REQUIRE(r.ok);
    Tape tape;
    Var y = scale_rows(tape.constant(x), tape.constant(s));
    for (std::int64_t row = 0; row < 6; ++row)
        for (std::int64_t j = 0; j < 5; ++j) REQUIRE(y.value().at(row * 5 + j) == s.at(row) * x.at(row * 5 + j));
    REQUIRE_THROWS_WITH(scale_rows(tape.constant(x), tape.constant(random_tensor({5}, 1))),
                        Catch::Contains("scale_rows") && Catch::Contains("6 rows"));
}
