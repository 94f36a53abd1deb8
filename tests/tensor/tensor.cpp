#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

using namespace mopt;

TEST_CASE("tensor storage is 64-byte aligned and row-major", "[tensor]") {
    for (std::int64_t n : {1, 3, 17, 1000}) {
        Tensor t = Tensor::zeros({n, 3});
        REQUIRE(reinterpret_cast<std::uintptr_t>(t.raw()) % 64 == 0);
        REQUIRE(t.numel() == n * 3);
        REQUIRE(t.bytes() == static_cast<std::size_t>(n * 3 * 4));
    }
    std::vector<float> v{0, 1, 2, 3, 4, 5};
    Tensor t = Tensor::from({2, 3}, std::span<const float>(v));
    REQUIRE(t.at(1 * 3 + 2) == 5.0f);  // [1][2] at offset 1*3+2
}

TEST_CASE("views share storage: slice, select, reshape", "[tensor]") {
    Tensor t = Tensor::zeros({4, 2, 3});
    for (std::int64_t i = 0; i < t.numel(); ++i) t.at(i) = static_cast<float>(i);
    Tensor s = t.slice(1, 3);
    REQUIRE(s.shape() == Shape{2, 2, 3});
    REQUIRE(s.at(0) == 6.0f);
    Tensor row = t.select(2).select(1);
    REQUIRE(row.shape() == Shape{3});
    REQUIRE(row.at(0) == 2 * 6 + 3);
    row.at(0) = -1.0f;  // writes through to the parent
    REQUIRE(t.at(15) == -1.0f);
    Tensor r = t.reshape({8, 3});
    REQUIRE(r.raw() == t.raw());
    REQUIRE(r.at(15) == -1.0f);
    Tensor c = t.clone();
    c.at(0) = 42.0f;
    REQUIRE(t.at(0) == 0.0f);
}

TEST_CASE("tensor errors name the shapes", "[tensor]") {
    Tensor t = Tensor::zeros({2, 3});
    REQUIRE_THROWS_WITH(t.reshape({4, 2}), Catch::Contains("[2, 3]") && Catch::Contains("[4, 2]"));
    REQUIRE_THROWS_WITH(t.slice(1, 3), Catch::Contains("out of bounds"));
    REQUIRE_THROWS_AS(Shape({1, 2, 3, 4, 5}), Error);
    REQUIRE_THROWS_WITH(t.data<std::int32_t>(), Catch::Contains("f32") && Catch::Contains("i32"));
}

TEST_CASE("dtypes declare their storage sizes", "[tensor]") {
    REQUIRE(storage_bytes(DType::f32, 10) == 40);
    REQUIRE(storage_bytes(DType::bf16, 10) == 20);
    REQUIRE(storage_bytes(DType::f16, 10) == 20);
    REQUIRE(storage_bytes(DType::q8, 10) == 10);
    REQUIRE(storage_bytes(DType::q4, 11) == 6);
    Tensor q = Tensor::zeros({4, 8}, DType::q4);
    REQUIRE(q.bytes() == 16);
    REQUIRE(q.slice(1, 2).bytes() == 4);
}

TEST_CASE("arena reuses one block after the first step", "[tensor]") {
    Arena arena(256);
    for (int step = 0; step < 5; ++step) {
        for (int k = 0; k < 10; ++k) {
            Tensor t = arena.tensor({100});
            REQUIRE(reinterpret_cast<std::uintptr_t>(t.raw()) % 64 == 0);
        }
        if (step > 0) REQUIRE(arena.blocks() == 1);
        arena.reset();
    }
    REQUIRE(arena.capacity() >= 10 * 448);
}
