// Packed weight storage (compress/packed_*.hpp): exact round trips of every format, checkpoint
// tensors and their validation, the packed kernels against dense GEMM, packed_linear's gradient,
// and nn::Linear::pack.
#include <cstring>
#include <map>
#include <numeric>

#include "packed_data.hpp"
#include "test_util.hpp"

using namespace mopt;
using namespace mopt::test;
using compress::IntCodes;
using compress::PackedWeight;

namespace {

using test::packed::nm_matrix;
using test::packed::random_codes;

// A dense matrix with about `density` of its entries non-zero.
Tensor sparse_matrix(std::int64_t out, std::int64_t in, double density, std::uint64_t seed) {
    Tensor w = random_tensor({out, in}, seed);
    std::mt19937_64 rng(seed + 1);
    std::bernoulli_distribution keep(density);
    for (float& v : w.span()) if (!keep(rng)) v = 0.0f;
    return w;
}

bool same_bits(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

// The formats the kernel tests run, all [out, in] with in a multiple of 32.
std::vector<PackedWeight> all_formats(std::int64_t out, std::int64_t in, std::uint64_t seed) {
    std::vector<PackedWeight> ws;
    ws.push_back(PackedWeight::quantized(random_codes(out, in, 8, in, seed, {3, 17})));
    for (int bits : {4, 3, 2}) ws.push_back(PackedWeight::quantized(random_codes(out, in, bits, 32, seed + bits)));
    ws.push_back(PackedWeight::nm(nm_matrix(out, in, 2, 4, seed + 10), 2, 4));
    ws.push_back(PackedWeight::sparse(sparse_matrix(out, in, 0.2, seed + 11)));
    return ws;
}

// Checkpoint tensors by name, with get() as from_tensors wants it.
struct Store {
    std::map<std::string, Tensor> t;
    explicit Store(const std::vector<std::pair<std::string, Tensor>>& v) : t(v.begin(), v.end()) {}
    std::function<const Tensor*(const std::string&)> getter() const {
        return [this](const std::string& name) -> const Tensor* {
            auto it = t.find(name);
            return it == t.end() ? nullptr : &it->second;
        };
    }
};

// Reference y = x Ŵᵀ in double.
std::vector<double> dense_forward(const Tensor& w, const Tensor& x) {
    const std::int64_t out = w.dim(0), in = w.dim(1), rows = x.dim(0);
    std::vector<double> y(static_cast<std::size_t>(rows * out));
    for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t o = 0; o < out; ++o) {
            double s = 0;
            for (std::int64_t c = 0; c < in; ++c) s += double(x.f32()[r * in + c]) * w.f32()[o * in + c];
            y[static_cast<std::size_t>(r * out + o)] = s;
        }
    return y;
}

void expect_close(const float* got, const std::vector<double>& want, const std::string& what) {
    double scale = 1.0, err = 0.0;
    for (double v : want) scale = std::max(scale, std::abs(v));
    for (std::size_t i = 0; i < want.size(); ++i) err = std::max(err, std::abs(got[i] - want[i]));
    INFO(what << ": max |error| " << err << " at scale " << scale);
    CHECK(err <= 1e-4 * scale);
}

}  // namespace

TEST_CASE("packed quantised codes dequantise exactly to IntCodes::value", "[compress]") {
    for (int bits = 2; bits <= 8; ++bits)
        for (std::int64_t group : {32, 96}) {
            const IntCodes c = random_codes(67, 96, bits, group, 100 + bits, bits == 8 ? std::vector<std::int32_t>{0, 41, 95}
                                                                                      : std::vector<std::int32_t>{});
            const PackedWeight p = PackedWeight::quantized(c);
            CHECK(p.format() == "int" + std::to_string(bits));
            CHECK(p.out() == 67);
            CHECK(p.in() == 96);
            const Tensor d = p.dequantize();
            std::int64_t wrong = 0;
            for (std::int64_t r = 0; r < c.out; ++r)
                for (std::int64_t col = 0; col < c.in; ++col) wrong += d.f32()[r * c.in + col] != c.value(r, col);
            INFO(bits << "-bit, group " << group);
            CHECK(wrong == 0);
            const std::int64_t per_word = 32 / bits, words = (96 + per_word - 1) / per_word;
            CHECK(p.bytes() == static_cast<std::size_t>(4 * (67 * words + 2 * 67 * (96 / group)) +
                                                        (bits == 8 ? 4 * 3 * (1 + 67) : 0)));
        }
}

TEST_CASE("int4 costs half a byte a weight plus the group parameters", "[compress]") {
    const PackedWeight p = PackedWeight::quantized(random_codes(64, 1024, 4, 128, 3));
    CHECK(p.bytes() == 64 * 1024 / 2 + 2 * 4 * 64 * 8);
    CHECK(double(p.bytes()) <= 0.16 * 64 * 1024 * 4);
}

TEST_CASE("N:M and CSR storage equal their dense source", "[compress]") {
    for (auto [n, m] : {std::pair{2, 4}, std::pair{1, 4}, std::pair{4, 8}, std::pair{3, 6}}) {
        const Tensor w = nm_matrix(67, 96, n, m, 7 + n + m);
        const PackedWeight p = PackedWeight::nm(w, n, m);
        CHECK(p.format() == "nm" + std::to_string(n) + ":" + std::to_string(m));
        CHECK(p.dequantize().to_vector() == w.to_vector());
    }
    // 2:4 stores 2 f32 values and 2 two-bit indices per group of 4: 64 columns are 32 values + 2 words.
    CHECK(PackedWeight::nm(nm_matrix(8, 64, 2, 4, 1), 2, 4).bytes() == 8 * (32 * 4 + 8));
    // Groups with more zeros than required still pack (zeros fill the kept slots).
    CHECK(PackedWeight::nm(Tensor::zeros({3, 8}), 2, 4).dequantize().to_vector() == std::vector<float>(24, 0.0f));

    Tensor dense = nm_matrix(5, 16, 2, 4, 2);
    dense.f32()[1 * 16 + 8 + 1] = 1.0f;
    dense.f32()[1 * 16 + 8 + 2] = 1.0f;
    dense.f32()[1 * 16 + 8 + 3] = 1.0f;
    CHECK_THROWS_WITH(PackedWeight::nm(dense, 2, 4), Catch::Contains("row 1, group 2"));
    CHECK_THROWS_AS(PackedWeight::nm(Tensor::zeros({2, 10}), 2, 4), Error);
    CHECK_THROWS_AS(PackedWeight::nm(Tensor::zeros({2, 8}), 4, 4), Error);

    const Tensor s = sparse_matrix(67, 96, 0.1, 5);
    const PackedWeight c = PackedWeight::sparse(s);
    CHECK(c.format() == "csr");
    CHECK(c.dequantize().to_vector() == s.to_vector());
    const auto nnz = std::count_if(s.span().begin(), s.span().end(), [](float v) { return v != 0.0f; });
    CHECK(c.bytes() == static_cast<std::size_t>(6 * nnz + 4 * 68));
    CHECK(compress::PackedSparse::smaller_than_dense(s));
    CHECK_FALSE(compress::PackedSparse::smaller_than_dense(random_tensor({4, 8}, 1)));
    CHECK_THROWS_WITH(PackedWeight::sparse(Tensor::zeros({1, 65536})), Catch::Contains("65536 columns"));
}

TEST_CASE("packed weights round-trip through checkpoint tensors bit for bit", "[compress]") {
    for (const PackedWeight& p : all_formats(67, 96, 11)) {
        INFO(p.format());
        const auto tensors = p.to_tensors("layers.0.wq");
        for (const auto& [name, t] : tensors) {
            CHECK(name.rfind("layers.0.wq.", 0) == 0);
            CHECK((t.dtype() == DType::f32 || t.dtype() == DType::i32));
        }
        const auto meta = p.meta();
        CHECK(meta["format"] == p.format());
        CHECK(meta["tensors"].size() == tensors.size());
        const Store store(tensors);
        const PackedWeight back = PackedWeight::from_tensors(meta, store.getter(), "layers.0.wq");
        CHECK(back.format() == p.format());
        CHECK(back.bytes() == p.bytes());
        const auto again = back.to_tensors("layers.0.wq");
        REQUIRE(again.size() == tensors.size());
        for (std::size_t i = 0; i < tensors.size(); ++i) {
            CHECK(again[i].first == tensors[i].first);
            CHECK(same_bits(again[i].second, tensors[i].second));
        }
        CHECK(same_bits(back.dequantize(), p.dequantize()));
    }
    // An odd number of CSR non-zeros leaves half of the last packed column word unused.
    Tensor one = Tensor::zeros({2, 5});
    one.f32()[7] = 3.0f;
    const PackedWeight c = PackedWeight::sparse(one);
    const Store store(c.to_tensors("w"));
    CHECK(PackedWeight::from_tensors(c.meta(), store.getter(), "w").dequantize().to_vector() == one.to_vector());
}

TEST_CASE("from_tensors rejects hostile checkpoints with errors naming the tensor", "[compress]") {
    auto load = [](const PackedWeight& p, const std::function<void(nlohmann::json&, Store&)>& corrupt) {
        Store store(p.to_tensors("m.w"));
        nlohmann::json meta = p.meta();
        corrupt(meta, store);
        return PackedWeight::from_tensors(meta, store.getter(), "m.w");
    };
    const PackedWeight q3 = PackedWeight::quantized(random_codes(5, 64, 3, 32, 1));
    CHECK_NOTHROW(load(q3, [](nlohmann::json&, Store&) {}));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json&, Store& s) { s.t["m.w.qweight"] = s.t["m.w.qweight"].slice(0, 4); }),
                      Catch::Contains("m.w.qweight") && Catch::Contains("shape"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json&, Store& s) {
                          s.t["m.w.scales"] = s.t["m.w.scales"].reshape({2, 5});
                      }),
                      Catch::Contains("m.w.scales"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json&, Store& s) { s.t.erase("m.w.zeros"); }),
                      Catch::Contains("m.w.zeros") && Catch::Contains("missing"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json&, Store& s) {
                          s.t["m.w.qweight"] = Tensor::zeros(s.t["m.w.qweight"].shape());  // f32, not i32
                      }),
                      Catch::Contains("m.w.qweight") && Catch::Contains("i32"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json&, Store& s) {  // 64 3-bit codes: the 7th word uses 4 of 10 fields
                          Tensor t = s.t["m.w.qweight"].clone();
                          t.data<std::int32_t>()[6] |= 1 << 20;
                          s.t["m.w.qweight"] = t;
                      }),
                      Catch::Contains("m.w.qweight") && Catch::Contains("row 0"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json&, Store& s) {
                          Tensor t = s.t["m.w.zeros"].clone();
                          t.f32()[3] = 8.0f;  // a 3-bit zero point is < 8
                          s.t["m.w.zeros"] = t;
                      }),
                      Catch::Contains("m.w.zeros"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json& m, Store&) { m["bits"] = 9; }), Catch::Contains("bits"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json& m, Store&) { m["format"] = "int9"; }), Catch::Contains("int9"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json& m, Store&) { m["group"] = 24; }), Catch::Contains("group"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json& m, Store&) { m.erase("out"); }), Catch::Contains("'out'"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json& m, Store&) { m["in"] = "96"; }), Catch::Contains("'in'"));
    CHECK_THROWS_WITH(load(q3, [](nlohmann::json& m, Store&) { m["format"] = "fp4"; }), Catch::Contains("fp4"));
    CHECK_THROWS_AS(load(q3, [](nlohmann::json& m, Store&) { m = nlohmann::json::array(); }), Error);

    const PackedWeight q8 = PackedWeight::quantized(random_codes(4, 32, 8, 32, 2, {5, 9}));
    CHECK_NOTHROW(load(q8, [](nlohmann::json&, Store&) {}));
    CHECK_THROWS_WITH(load(q8, [](nlohmann::json&, Store& s) {
                          Tensor t = s.t["m.w.outlier_cols"].clone();
                          t.data<std::int32_t>()[1] = 32;
                          s.t["m.w.outlier_cols"] = t;
                      }),
                      Catch::Contains("m.w.outlier_cols"));

    const PackedWeight nm = PackedWeight::nm(nm_matrix(3, 24, 3, 6, 4), 3, 6);  // 3-bit index fields
    CHECK_NOTHROW(load(nm, [](nlohmann::json&, Store&) {}));
    CHECK_THROWS_WITH(load(nm, [](nlohmann::json&, Store& s) {
                          Tensor t = s.t["m.w.indices"].clone();
                          t.data<std::int32_t>()[0] |= 7 << 6;  // third index of group 0 := 7 >= 6
                          s.t["m.w.indices"] = t;
                      }),
                      Catch::Contains("m.w.indices") && Catch::Contains("group 0"));
    CHECK_THROWS_WITH(load(nm, [](nlohmann::json&, Store& s) { s.t["m.w.values"] = s.t["m.w.values"].slice(0, 2); }),
                      Catch::Contains("m.w.values"));
    CHECK_THROWS_WITH(load(nm, [](nlohmann::json& m, Store&) { m["m"] = 5; }), Catch::Contains("nm3:6"));

    const PackedWeight csr = PackedWeight::sparse(sparse_matrix(6, 40, 0.3, 5));
    CHECK_NOTHROW(load(csr, [](nlohmann::json&, Store&) {}));
    CHECK_THROWS_WITH(load(csr, [](nlohmann::json&, Store& s) {
                          Tensor t = s.t["m.w.row_ptr"].clone();
                          std::swap(t.data<std::int32_t>()[2], t.data<std::int32_t>()[3]);
                          s.t["m.w.row_ptr"] = t;
                      }),
                      Catch::Contains("m.w.row_ptr") && Catch::Contains("monotone"));
    CHECK_THROWS_WITH(load(csr, [](nlohmann::json&, Store& s) {
                          Tensor t = s.t["m.w.col_idx"].clone();
                          t.data<std::int32_t>()[0] = (t.data<std::int32_t>()[0] & ~0xffff) | 40;  // column 40 of 40
                          s.t["m.w.col_idx"] = t;
                      }),
                      Catch::Contains("m.w.col_idx") && Catch::Contains("40"));
    CHECK_THROWS_WITH(load(csr, [](nlohmann::json& m, Store&) { m["nnz"] = m["nnz"].get<int>() + 1; }),
                      Catch::Contains("m.w.values"));
    CHECK_THROWS_WITH(load(csr, [](nlohmann::json& m, Store&) { m["in"] = 70000; }), Catch::Contains("uint16"));
}

TEST_CASE("packed matmul and its backward match dense GEMM on the dequantised weight", "[compress]") {
    for (auto [out, in] : {std::pair<std::int64_t, std::int64_t>{67, 96}, {300, 64}})
        for (const PackedWeight& p : all_formats(out, in, 21))
            for (std::int64_t rows : {1, 37, 150}) {  // the backward splits tiles below 128 rows, rows above
                const std::string what = p.format() + " [" + std::to_string(out) + ", " + std::to_string(in) +
                                         "], rows " + std::to_string(rows);
                const Tensor w = p.dequantize();
                const Tensor x = random_tensor({rows, in}, 31 + rows);
                Tensor y = Tensor::full({rows, out}, 123.0f);  // overwritten
                compress::matmul(p, x.f32(), rows, y.f32());
                expect_close(y.f32(), dense_forward(w, x), what + " forward");

                const Tensor dy = random_tensor({rows, out}, 41 + rows);
                Tensor dx = random_tensor({rows, in}, 51);  // accumulated into
                std::vector<double> want(static_cast<std::size_t>(rows * in));
                for (std::int64_t r = 0; r < rows; ++r)
                    for (std::int64_t c = 0; c < in; ++c) {
                        double s = dx.f32()[r * in + c];
                        for (std::int64_t o = 0; o < out; ++o) s += double(dy.f32()[r * out + o]) * w.f32()[o * in + c];
                        want[static_cast<std::size_t>(r * in + c)] = s;
                    }
                compress::matmul_backward(p, dy.f32(), rows, dx.f32());
                expect_close(dx.f32(), want, what + " backward");
            }
}

TEST_CASE("packed_linear's input gradient matches finite differences and dense linear", "[compress]") {
    for (const PackedWeight& p : all_formats(19, 32, 61)) {
        INFO(p.format());
        const Tensor x = random_tensor({2, 3, 32}, 71);
        const auto r = autodiff::gradcheck([&](Tape&, std::span<const Var> v) { return autodiff::packed_linear(v[0], p); }, {x});
        INFO(r);
        CHECK(r.ok);

        Tape tape, dense;
        Var xp = tape.input(x), xd = dense.input(x);
        Var yp = autodiff::packed_linear(xp, p);
        Var yd = autodiff::linear(xd, dense.constant(p.dequantize()));
        CHECK(tape.node(yp).context == &p);
        CHECK(yp.shape() == Shape{2, 3, 19});
        const Tensor g = random_tensor({2, 3, 19}, 81);
        tape.backward(yp, g);
        dense.backward(yd, g);
        for (std::int64_t i = 0; i < yp.value().numel(); ++i) CHECK(yp.value().at(i) == Approx(yd.value().at(i)).margin(1e-5));
        for (std::int64_t i = 0; i < x.numel(); ++i) CHECK(xp.grad().at(i) == Approx(xd.grad().at(i)).margin(1e-5));
    }
    const PackedWeight p = PackedWeight::sparse(sparse_matrix(4, 8, 0.5, 1));
    Tape tape;
    CHECK_THROWS_WITH(autodiff::packed_linear(tape.input(random_tensor({2, 7}, 1)), p), Catch::Contains("csr"));
}

TEST_CASE("Linear::pack swaps the dense weight for the packed one", "[compress]") {
    std::mt19937_64 rng(3);
    nn::Linear lin("blk.wq", 48, 256, rng);
    CHECK_FALSE(lin.is_packed());
    CHECK(lin.bytes() == 48 * 256 * 4);
    CHECK(parameters_of(lin).size() == 1);
    CHECK_THROWS_WITH(lin.pack(PackedWeight::quantized(random_codes(48, 128, 4, 64, 1))), Catch::Contains("blk.wq.weight"));

    lin.pack(PackedWeight::quantized(random_codes(48, 256, 4, 128, 9)));
    CHECK(lin.is_packed());
    CHECK(lin.out_features() == 48);
    CHECK(lin.in_features() == 256);
    CHECK(lin.weight.name() == "blk.wq.weight");
    CHECK_FALSE(lin.weight.trainable());
    CHECK_FALSE(lin.weight.value().defined());
    CHECK(parameters_of(lin).empty());
    CHECK(double(lin.bytes()) <= 0.16 * 48 * 256 * 4 + 2 * 4 * 48 * 2);
    const Tensor w = lin.dense_weight();
    CHECK(w.shape() == Shape{48, 256});

    const Tensor x = random_tensor({5, 256}, 4);
    Tape tape;
    Var xv = tape.input(x);
    Var y = lin(tape, xv);
    CHECK(std::string(tape.node(y).op) == "packed_linear");
    CHECK(tape.node(y).context == &*lin.packed);
    Var yd = autodiff::linear(tape.constant(x), tape.constant(w));
    for (std::int64_t i = 0; i < y.value().numel(); ++i) CHECK(y.value().at(i) == Approx(yd.value().at(i)).margin(1e-5));
    tape.backward(autodiff::sum(y));
    CHECK(xv.grad().defined());
}
