#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

TEST_CASE("topk picks the largest entries in order, ties to the lower index", "[routing]") {
    std::vector<float> v{0.1f, 0.7f, 0.3f, 0.7f, /**/ -1.0f, -2.0f, 5.0f, 0.0f};
    Tape tape;
    TopK t = topk(tape.constant(Tensor::from({2, 4}, std::span<const float>(v))), 2);
    const std::int32_t* i = t.indices.data<std::int32_t>();
    REQUIRE(std::vector<std::int32_t>(i, i + 4) == std::vector<std::int32_t>{1, 3, 2, 3});
    REQUIRE(t.values.value().to_vector() == std::vector<float>{0.7f, 0.7f, 5.0f, 0.0f});
    REQUIRE_THROWS_WITH(topk(tape.constant(Tensor::zeros({2, 4})), 5), Catch::Contains("k = 5"));
}

TEST_CASE("topk values are differentiable through the gather", "[grad][routing]") {
    // Distinct values 0.1 apart, shuffled per row: a finite-difference step never changes the choice.
    Tensor x = Tensor::empty({5, 8});
    for (std::int64_t r = 0; r < 5; ++r)
        for (std::int64_t c = 0; c < 8; ++c) x.at(r * 8 + c) = 0.1f * static_cast<float>((c * 3 + r) % 8) - 0.35f;
    auto r = gradcheck([](Tape&, std::span<const Var> v) { return topk(v[0], 3).values; }, {x});
    INFO(r);
    REQUIRE(r.ok);
}

TEST_CASE("gather and scatter along the last axis", "[grad][routing]") {
    Tensor x = random_tensor({3, 6}, 1), src = random_tensor({3, 2}, 2);
    std::vector<std::int32_t> v{5, 0, 2, 3, 1, 4};
    Tensor idx = Tensor::from({3, 2}, std::span<const std::int32_t>(v));
    Tape tape;
    Var s = scatter(tape.constant(src), idx, 6);
    REQUIRE(s.value().at(5) == src.at(0));
    REQUIRE(s.value().at(1) == 0.0f);
    auto g = gradcheck([&idx](Tape&, std::span<const Var> a) { return gather(a[0], idx); }, {x});
    INFO(g);
    REQUIRE(g.ok);
    auto sc = gradcheck([&idx](Tape&, std::span<const Var> a) { return scatter(a[0], idx, 6); }, {src});
    INFO(sc);
    REQUIRE(sc.ok);
    REQUIRE_THROWS_WITH(scatter(tape.constant(src), idx, 5), Catch::Contains("5") && Catch::Contains("[0, 5)"));
}

TEST_CASE("dispatch rows to an expert and combine them back", "[grad][routing]") {
    Tensor x = random_tensor({6, 3}, 3), src = random_tensor({4, 3}, 4);
    std::vector<std::int32_t> v{4, 1, 4, 0};  // row 4 twice: its gradient adds up
    Tensor rows = Tensor::from({4}, std::span<const std::int32_t>(v));
    Tape tape;
    Var combined = scatter_add_rows(tape.constant(src), rows, 6);
    REQUIRE(combined.value().at(4 * 3) == Approx(src.at(0) + src.at(2 * 3)));
    REQUIRE(combined.value().at(5 * 3) == 0.0f);
    auto g = gradcheck([&rows](Tape&, std::span<const Var> a) { return gather_rows(a[0], rows); }, {x});
    INFO(g);
    REQUIRE(g.ok);
    auto s = gradcheck([&rows](Tape&, std::span<const Var> a) { return scatter_add_rows(a[0], rows, 6); }, {src});
    INFO(s);
    REQUIRE(s.ok);
}

TEST_CASE("scatter_add_rows_into adds rows into its accumulator's buffer", "[grad][routing]") {
    Tensor base = random_tensor({6, 3}, 5), src = random_tensor({4, 3}, 6), src2 = random_tensor({2, 3}, 7);
    std::vector<std::int32_t> v{4, 1, 4, 0}, v2{5, 4};  // row 4 three times over the two calls
    Tensor rows = Tensor::from({4}, std::span<const std::int32_t>(v));
    Tensor rows2 = Tensor::from({2}, std::span<const std::int32_t>(v2));
    Tape tape;
    Tensor acc = tape.alloc({6, 3});
    acc.copy_from(base);
    Var sum = scatter_add_rows_into(scatter_add_rows_into(tape.constant(acc), tape.constant(src), rows),
                                    tape.constant(src2), rows2);
    REQUIRE(sum.value().raw() == acc.raw());  // no new [n, d] buffer
    for (std::int64_t c = 0; c < 3; ++c) {
        REQUIRE(sum.value().at(4 * 3 + c) == Approx(base.at(4 * 3 + c) + src.at(c) + src.at(2 * 3 + c) + src2.at(3 + c)));
        REQUIRE(sum.value().at(5 * 3 + c) == Approx(base.at(5 * 3 + c) + src2.at(c)));
        REQUIRE(sum.value().at(2 * 3 + c) == base.at(2 * 3 + c));  // a row no index names is unchanged
    }
    // Gradients reach the accumulator (through the op that made it) and both sources.
    auto g = gradcheck(
        [&](Tape&, std::span<const Var> a) {
            return scatter_add_rows_into(scatter_add_rows_into(scale(a[0], 2.0f), a[1], rows), a[2], rows2);
        },
        {base, src, src2});
    INFO(g);
    REQUIRE(g.ok);
    REQUIRE_THROWS_WITH(scatter_add_rows_into(tape.constant(base), tape.constant(src), rows),
                        Catch::Contains("owns its storage"));
    REQUIRE_THROWS_WITH(scatter_add_rows_into(tape.constant(acc), tape.constant(src2), rows),
                        Catch::Contains("[n, d], [m, d] and [m]"));
}
