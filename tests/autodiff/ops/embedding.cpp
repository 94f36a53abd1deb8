#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

TEST_CASE("embedding looks up rows and scatter-adds gradients", "[grad][embedding]") {
    Tensor table = random_tensor({6, 4}, 1);
    std::vector<std::int32_t> v{0, 5, 2, 5, 5, 1};  // token 5 three times
    Tensor ids = Tensor::from({2, 3}, std::span<const std::int32_t>(v));
    Tape tape;
    Parameter p("table", table);
    Var e = embedding(tape.parameter(p), ids);
    REQUIRE(e.shape() == Shape{2, 3, 4});
    for (int i = 0; i < 6; ++i)
        for (int c = 0; c < 4; ++c) REQUIRE(e.value().at(i * 4 + c) == table.at(v[i] * 4 + c));
    tape.backward(sum(e));
    REQUIRE(p.grad().at(5 * 4) == Approx(3.0f));  // three uses add up
    REQUIRE(p.grad().at(3 * 4) == 0.0f);          // unused row
    auto r = gradcheck([&ids](Tape&, std::span<const Var> x) { return embedding(x[0], ids); }, {table});
    INFO(r);
    REQUIRE(r.ok);
}

TEST_CASE("embedding rejects ids outside the vocabulary", "[embedding]") {
    Tape tape;
    std::vector<std::int32_t> v{1, 7};
    Var table = tape.constant(Tensor::zeros({6, 4}));
    REQUIRE_THROWS_WITH(embedding(table, Tensor::from({2}, std::span<const std::int32_t>(v))),
                        Catch::Contains("embedding") && Catch::Contains("7") && Catch::Contains("[0, 6)"));
    REQUIRE_THROWS_WITH(embedding(table, Tensor::zeros({2})), Catch::Contains("i32"));
}
