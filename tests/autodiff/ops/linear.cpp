#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include "../../test_util.hpp"

using namespace mopt;
using namespace mopt::autodiff;
using mopt::test::random_tensor;

TEST_CASE("linear matches a naive loop", "[linear]") {
    Tensor x = random_tensor({2, 3, 5}, 1), w = random_tensor({4, 5}, 2), b = random_tensor({4}, 3);
    Tape tape;
    Var y = linear(tape.constant(x), tape.constant(w), tape.constant(b));
    REQUIRE(y.shape() == Shape{2, 3, 4});
    for (std::int64_t r = 0; r < 6; ++r)
        for (std::int64_t o = 0; o < 4; ++o) {
            double ref = b.at(o);
            for (std::int64_t i = 0; i < 5; ++i) ref += static_cast<double>(x.at(r * 5 + i)) * w.at(o * 5 + i);
            REQUIRE(y.value().at(r * 4 + o) == Approx(ref).margin(1e-5));
        }
}

TEST_CASE("linear gradients: input, weight, bias", "[grad][linear]") {
    auto seed = GENERATE(1, 2);
    Tensor x = random_tensor({3, 2 + seed, 7}, seed), w = random_tensor({5, 7}, seed + 1), b = random_tensor({5}, seed + 2);
    auto with_bias = gradcheck([](Tape&, std::span<const Var> v) { return linear(v[0], v[1], v[2]); }, {x, w, b});
    INFO(with_bias);
    REQUIRE(with_bias.ok);
    auto no_bias = gradcheck([](Tape&, std::span<const Var> v) { return linear(v[0], v[1]); }, {x, w});
    INFO(no_bias);
    REQUIRE(no_bias.ok);
}

TEST_CASE("linear with a frozen weight runs no weight-gradient GEMM", "[linear]") {
    Parameter w("w", random_tensor({4, 3}, 5), /*trainable=*/false);
    Tape tape;
    Var x = tape.input(random_tensor({2, 3}, 6));
    tape.backward(sum(linear(x, tape.parameter(w))));
    REQUIRE(x.grad().defined());
    REQUIRE_FALSE(w.grad().defined());
    REQUIRE_FALSE(tape.node(1).grad.defined());  // the frozen weight's leaf received nothing
}

TEST_CASE("batched matmul in every transpose combination", "[grad][linear]") {
    const std::int64_t B = 2, m = 3, k = 4, n = 5;
    for (bool ta : {false, true})
        for (bool tb : {false, true}) {
            Tensor a = random_tensor(ta ? Shape{B, k, m} : Shape{B, m, k}, 11 + ta);
            Tensor b = random_tensor(tb ? Shape{B, n, k} : Shape{B, k, n}, 21 + tb);
            Tape tape;
            Var c = matmul(tape.constant(a), tape.constant(b), ta, tb);
            REQUIRE(c.shape() == Shape{B, m, n});
            for (std::int64_t p = 0; p < B; ++p)
                for (std::int64_t i = 0; i < m; ++i)
                    for (std::int64_t j = 0; j < n; ++j) {
                        double ref = 0;
                        for (std::int64_t q = 0; q < k; ++q) {
                            const float av = ta ? a.at((p * k + q) * m + i) : a.at((p * m + i) * k + q);
                            const float bv = tb ? b.at((p * n + j) * k + q) : b.at((p * k + q) * n + j);
                            ref += static_cast<double>(av) * bv;
                        }
                        REQUIRE(c.value().at((p * m + i) * n + j) == Approx(ref).margin(1e-5));
                    }
            auto r = gradcheck([ta, tb](Tape&, std::span<const Var> v) { return matmul(v[0], v[1], ta, tb); }, {a, b});
            INFO("trans_a " << ta << " trans_b " << tb << ": " << r);
            REQUIRE(r.ok);
        }
}

TEST_CASE("linear and matmul name mismatched shapes", "[linear]") {
    Tape tape;
    Var x = tape.constant(Tensor::zeros({2, 3})), w = tape.constant(Tensor::zeros({4, 5}));
    REQUIRE_THROWS_WITH(linear(x, w), Catch::Contains("linear") && Catch::Contains("[2, 3]") && Catch::Contains("[4, 5]"));
    Var a = tape.constant(Tensor::zeros({2, 3, 4})), b = tape.constant(Tensor::zeros({2, 5, 6}));
    REQUIRE_THROWS_WITH(matmul(a, b), Catch::Contains("matmul") && Catch::Contains("[2, 3, 4]"));
}
