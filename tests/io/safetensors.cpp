// safetensors: conversions against references computed in double, round trips, the byte layout
// parsed by hand, a file made by hand as another producer would, sharded indexes, hostile files.
#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;

namespace {

using mopt::test::TempDir;

std::string le64(std::uint64_t v) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
    return s;
}
std::string le32(std::uint32_t v) {
    std::string s(4, '\0');
    for (int i = 0; i < 4; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
    return s;
}
std::string le16(std::uint16_t v) { return {static_cast<char>(v & 0xff), static_cast<char>(v >> 8)}; }

// A whole file as an independent producer lays it out: length, JSON, buffer.
std::string st_file(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

void write_bytes(const fs::path& p, const std::string& bytes) {
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
std::string read_bytes(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Mathematical value of a non-negative bit pattern of a float format with `mant_bits` fraction bits
// and exponent bias `bias`; the Inf pattern stands for 2^(emax+1), the value rounding overflows to.
double ref_value(std::uint32_t pattern, int mant_bits, int bias) {
    const std::uint32_t e = pattern >> mant_bits;
    const std::uint32_t m = pattern & ((1u << mant_bits) - 1);
    if (e == 0) return std::ldexp(static_cast<double>(m), 1 - bias - mant_bits);
    return std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -mant_bits), static_cast<int>(e) - bias);
}
double ref_f16(std::uint32_t p) { return ref_value(p, 10, 15); }
double ref_bf16(std::uint32_t p) { return ref_value(p, 7, 127); }

// Round-to-nearest-even into a 16-bit format, by search over its ordered patterns (no bit tricks,
// so it shares nothing with the implementation). x must not be NaN.
template <class Value>
std::uint16_t ref_round(float x, Value value_of, std::uint32_t inf_pattern) {
    const std::uint32_t sign = std::signbit(x) ? 0x8000u : 0u;
    const double a = std::fabs(static_cast<double>(x));
    std::uint32_t lo = 0, hi = inf_pattern;  // largest pattern with value <= a
    while (lo < hi) {
        const std::uint32_t mid = (lo + hi + 1) / 2;
        if (value_of(mid) <= a) lo = mid; else hi = mid - 1;
    }
    std::uint32_t r = lo;
    if (lo < inf_pattern && value_of(lo) != a) {
        const double below = a - value_of(lo), above = value_of(lo + 1) - a;
        if (above < below || (above == below && (lo & 1u))) r = lo + 1;
    }
    return static_cast<std::uint16_t>(sign | r);
}

std::uint32_t bits(float f) { return std::bit_cast<std::uint32_t>(f); }
float from_bits(std::uint32_t b) { return std::bit_cast<float>(b); }

}  // namespace

TEST_CASE("f16 -> f32 equals the IEEE formula for all 65536 patterns", "[io][safetensors]") {
    int wrong = 0, first_wrong = -1;
    for (std::uint32_t h = 0; h < 65536; ++h) {
        const float f = io::f16_to_f32(static_cast<std::uint16_t>(h));
        const std::uint32_t mag = h & 0x7fffu;
        bool ok;
        if (mag > 0x7c00u) {
            ok = std::isnan(f) && std::signbit(f) == bool(h & 0x8000u);
        } else if (mag == 0x7c00u) {
            ok = std::isinf(f) && std::signbit(f) == bool(h & 0x8000u);
        } else {
            const double want = (h & 0x8000u ? -1.0 : 1.0) * ref_f16(mag);
            ok = static_cast<double>(f) == want && std::signbit(f) == bool(h & 0x8000u);
            // And back: every half is a float, so narrowing it again is the identity.
            ok = ok && io::f32_to_f16(f) == h;
        }
        if (!ok && wrong++ == 0) first_wrong = static_cast<int>(h);
    }
    INFO("first wrong pattern " << first_wrong);
    REQUIRE(wrong == 0);
    REQUIRE(io::f16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
    REQUIRE(io::f16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));  // largest subnormal
    REQUIRE(io::f16_to_f32(0x7bff) == 65504.0f);
    REQUIRE(io::f16_to_f32(0x3c00) == 1.0f);
    REQUIRE(io::f16_to_f32(0xc000) == -2.0f);
}

TEST_CASE("bf16 -> f32 equals the formula for all 65536 patterns", "[io][safetensors]") {
    int wrong = 0;
    for (std::uint32_t h = 0; h < 65536; ++h) {
        const float f = io::bf16_to_f32(static_cast<std::uint16_t>(h));
        const std::uint32_t mag = h & 0x7fffu;
        bool ok;
        if (mag > 0x7f80u) ok = std::isnan(f);
        else if (mag == 0x7f80u) ok = std::isinf(f) && std::signbit(f) == bool(h & 0x8000u);
        else ok = static_cast<double>(f) == (h & 0x8000u ? -1.0 : 1.0) * ref_bf16(mag) && io::f32_to_bf16(f) == h;
        wrong += !ok;
    }
    REQUIRE(wrong == 0);
}

TEST_CASE("f32 -> bf16 rounds to nearest even; inf and nan kept", "[io][safetensors]") {
    // Ties built from bit patterns: the 16 dropped bits are exactly 0x8000.
    for (std::uint32_t h : {0x3f80u, 0x3f81u, 0x4049u, 0x404au, 0x0000u, 0x0001u, 0x8001u, 0xbf80u, 0x7f7eu}) {
        const std::uint32_t tie = h << 16 | 0x8000u;
        const std::uint16_t even = static_cast<std::uint16_t>(h & 1u ? h + 1 : h);
        INFO("pattern " << std::hex << h);
        REQUIRE(io::f32_to_bf16(from_bits(tie)) == even);
        REQUIRE(io::f32_to_bf16(from_bits(tie + 1)) == static_cast<std::uint16_t>(h + 1));  // just above
        REQUIRE(io::f32_to_bf16(from_bits(tie - 1)) == static_cast<std::uint16_t>(h));      // just below
    }
    // The largest float's tie-and-above rounds to Inf, as IEEE overflow does.
    REQUIRE(io::f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80u);
    REQUIRE(io::f32_to_bf16(from_bits(0x7f7f7fffu)) == 0x7f7fu);
    REQUIRE(io::f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80u);
    REQUIRE(io::f32_to_bf16(-std::numeric_limits<float>::infinity()) == 0xff80u);
    // NaN must not round into Inf (a NaN whose payload sits only in the dropped bits).
    REQUIRE(std::isnan(io::bf16_to_f32(io::f32_to_bf16(from_bits(0x7f800001u)))));
    REQUIRE(std::isnan(io::bf16_to_f32(io::f32_to_bf16(from_bits(0xffffffffu)))));
    REQUIRE(std::isnan(io::bf16_to_f32(io::f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));

    // Random patterns over the whole float range against the search reference.
    std::mt19937 rng(7);
    int wrong = 0;
    for (int i = 0; i < 200000; ++i) {
        const float x = from_bits(rng());
        if (std::isnan(x)) continue;
        wrong += io::f32_to_bf16(x) != ref_round(x, ref_bf16, 0x7f80u);
    }
    REQUIRE(wrong == 0);
}

TEST_CASE("f32 -> f16 rounds to nearest even, with subnormals and overflow to inf", "[io][safetensors]") {
    // Exact midpoints between neighbouring halves (exact in f32: a half has 11 significant bits).
    int wrong = 0;
    for (std::uint32_t h = 0; h < 0x7c00u; ++h) {
        const double mid = (ref_f16(h) + ref_f16(h + 1)) / 2;
        const auto f = static_cast<float>(mid);
        REQUIRE(static_cast<double>(f) == mid);
        const std::uint16_t even = static_cast<std::uint16_t>(h & 1u ? h + 1 : h);
        wrong += io::f32_to_f16(f) != even;
        wrong += io::f32_to_f16(-f) != (even | 0x8000u);
        wrong += io::f32_to_f16(std::nextafter(f, 0.0f)) != h;
        wrong += io::f32_to_f16(std::nextafter(f, 1e30f)) != h + 1;
    }
    REQUIRE(wrong == 0);

    REQUIRE(io::f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000u);                                  // tie 0|1 -> 0
    REQUIRE(io::f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001u);
    REQUIRE(io::f32_to_f16(3 * std::ldexp(1.0f, -25)) == 0x0002u);                              // tie 1|2 -> 2
    REQUIRE(io::f32_to_f16(std::numeric_limits<float>::denorm_min()) == 0x0000u);
    REQUIRE(io::f32_to_f16(-std::numeric_limits<float>::denorm_min()) == 0x8000u);              // sign kept
    REQUIRE(io::f32_to_f16(-0.0f) == 0x8000u);
    REQUIRE(io::f32_to_f16(65504.0f) == 0x7bffu);
    REQUIRE(io::f32_to_f16(std::nextafter(65520.0f, 0.0f)) == 0x7bffu);
    REQUIRE(io::f32_to_f16(65520.0f) == 0x7c00u);                                               // tie -> Inf
    REQUIRE(io::f32_to_f16(1e6f) == 0x7c00u);
    REQUIRE(io::f32_to_f16(-1e30f) == 0xfc00u);
    REQUIRE(io::f32_to_f16(std::numeric_limits<float>::infinity()) == 0x7c00u);
    REQUIRE(std::isnan(io::f16_to_f32(io::f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
    REQUIRE(std::isnan(io::f16_to_f32(io::f32_to_f16(from_bits(0x7f800001u)))));  // payload below the kept bits

    // Random floats: the whole range, and concentrated where halves live.
    std::mt19937 rng(11);
    wrong = 0;
    for (int i = 0; i < 200000; ++i) {
        std::uint32_t b = rng();
        if (i % 2) b = (b & 0x807fffffu) | ((100u + b % 46u) << 23);  // exponents 2^-27 .. 2^18
        const float x = from_bits(b);
        if (std::isnan(x)) continue;
        wrong += io::f32_to_f16(x) != ref_round(x, ref_f16, 0x7c00u);
    }
    REQUIRE(wrong == 0);
}

TEST_CASE("safetensors round trip: f32 bit-exact, bf16/f16 to the rounded value, metadata", "[io][safetensors]") {
    TempDir dir;
    std::map<std::string, Tensor> tensors;
    tensors["scalar"] = Tensor::full({}, 3.25f);
    tensors["vec"] = test::random_tensor({7}, 1, -100.0f, 100.0f);
    tensors["layers.0.w"] = test::random_tensor({2, 3, 1, 5}, 2);
    tensors["empty"] = Tensor::zeros({0, 3});
    tensors["ids"] = test::random_ids({5}, 3, 1000);
    Tensor special = Tensor::from({6}, std::span<const float>(std::vector<float>{
        std::numeric_limits<float>::infinity(), -0.0f, std::numeric_limits<float>::quiet_NaN(),
        std::numeric_limits<float>::denorm_min(), 1e-6f, -70000.0f}));
    tensors["special"] = special;
    const std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "ünïcode \"quoted\""}};

    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
        INFO("dtype " << name(dt));
        const auto file = dir / (std::string(name(dt)) + ".safetensors");
        io::write_safetensors(file, tensors, dt, meta);
        const auto back = io::read_safetensors(file);
        REQUIRE(back.metadata == meta);
        REQUIRE(back.tensors.size() == tensors.size());
        for (const auto& [n, t] : tensors) {
            INFO("tensor " << n);
            const Tensor& r = back.tensors.at(n);
            REQUIRE(r.shape() == t.shape());
            REQUIRE(r.owns_storage());
            if (t.dtype() == DType::i32) {  // integers are never converted
                REQUIRE(r.dtype() == DType::i32);
                REQUIRE(std::memcmp(r.raw(), t.raw(), t.bytes()) == 0);
                continue;
            }
            REQUIRE(r.dtype() == DType::f32);
            for (std::int64_t i = 0; i < t.numel(); ++i) {
                const float x = t.at(i);
                const float want = dt == DType::f32    ? x
                                   : dt == DType::bf16 ? io::bf16_to_f32(io::f32_to_bf16(x))
                                                       : io::f16_to_f32(io::f32_to_f16(x));
                if (std::isnan(want)) REQUIRE(std::isnan(r.at(i)));
                else REQUIRE(bits(r.at(i)) == bits(want));
            }
        }
        // keep_dtype: the stored 16-bit patterns themselves.
        if (dt != DType::f32) {
            const auto raw = io::read_safetensors(file, true);
            const Tensor& w = raw.tensors.at("layers.0.w");
            REQUIRE(w.dtype() == dt);
            const auto* p = static_cast<const std::uint16_t*>(w.raw());
            for (std::int64_t i = 0; i < w.numel(); ++i) {
                const float x = tensors["layers.0.w"].at(i);
                REQUIRE(p[i] == (dt == DType::bf16 ? io::f32_to_bf16(x) : io::f32_to_f16(x)));
            }
            // bf16/f16 tensors written again as f32 widen exactly.
            const auto file2 = dir / "again.safetensors";
            io::write_safetensors(file2, raw.tensors);
            const auto wide = io::read_safetensors(file2);
            REQUIRE(wide.tensors.at("layers.0.w").to_vector() == back.tensors.at("layers.0.w").to_vector());
        }
    }
}

TEST_CASE("safetensors layout byte by byte: length, padded JSON, sorted names, packed aligned data",
          "[io][safetensors]") {
    TempDir dir;
    std::map<std::string, Tensor> tensors;
    tensors["b"] = Tensor::from({3}, std::span<const float>(std::vector<float>{1.0f, -2.5f, 0.1f}));
    tensors["a"] = Tensor::from({1, 1}, std::span<const float>(std::vector<float>{7.0f}));
    tensors["c.ids"] = Tensor::from({3}, std::span<const std::int32_t>(std::vector<std::int32_t>{1, -2, 300000}));
    const auto file = dir / "layout.safetensors";

    for (DType dt : {DType::f32, DType::bf16}) {
        INFO("dtype " << name(dt));
        io::write_safetensors(file, tensors, dt, {{"k", "v"}});
        const std::string bytes = read_bytes(file);
        REQUIRE(bytes.size() >= 8);
        std::uint64_t n = 0;
        for (int i = 7; i >= 0; --i) n = n << 8 | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
        REQUIRE(n % 8 == 0);  // so the buffer starts 8-byte aligned in the file
        REQUIRE(8 + n <= bytes.size());
        const std::string text = bytes.substr(8, n);
        const auto close = text.find_last_of('}');
        REQUIRE(close != std::string::npos);
        REQUIRE(text.size() - 1 - close < 8);  // padding: fewer than 8 spaces, nothing else
        REQUIRE(text.find_first_not_of(' ', close + 1) == std::string::npos);

        const auto header = nlohmann::ordered_json::parse(text);
        std::vector<std::string> keys;
        for (const auto& item : header.items()) keys.push_back(item.key());
        REQUIRE(keys == std::vector<std::string>{"__metadata__", "a", "b", "c.ids"});
        REQUIRE(header["__metadata__"] == nlohmann::ordered_json{{"k", "v"}});

        const std::string data = bytes.substr(8 + n);
        const std::string fdt = dt == DType::f32 ? "F32" : "BF16";
        const std::size_t esize = dt == DType::f32 ? 4 : 2;
        REQUIRE(header["a"]["dtype"] == fdt);
        REQUIRE(header["b"]["dtype"] == fdt);
        REQUIRE(header["c.ids"]["dtype"] == "I32");
        REQUIRE(header["a"]["shape"].get<std::vector<std::int64_t>>() == std::vector<std::int64_t>{1, 1});
        REQUIRE(header["b"]["shape"].get<std::vector<std::int64_t>>() == std::vector<std::int64_t>{3});

        // No holes (reference readers reject them), each tensor aligned to its element size.
        std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
        for (const char* k : {"a", "b", "c.ids"}) {
            const auto off = header[k]["data_offsets"].get<std::vector<std::uint64_t>>();
            REQUIRE(off.size() == 2);
            REQUIRE(off[0] % (std::string(k) == "c.ids" ? 4 : esize) == 0);
            ranges.emplace_back(off[0], off[1]);
        }
        std::sort(ranges.begin(), ranges.end());
        REQUIRE(ranges.front().first == 0);
        for (std::size_t i = 1; i < ranges.size(); ++i) REQUIRE(ranges[i].first == ranges[i - 1].second);
        REQUIRE(ranges.back().second == data.size());

        // The bytes: little-endian values at the stated offsets.
        const auto at = [&](const char* k) { return header[k]["data_offsets"][0].get<std::size_t>(); };
        REQUIRE(data.substr(at("c.ids"), 12) == le32(1) + le32(static_cast<std::uint32_t>(-2)) + le32(300000));
        if (dt == DType::f32) {
            REQUIRE(data.substr(at("b"), 12) == le32(bits(1.0f)) + le32(bits(-2.5f)) + le32(bits(0.1f)));
            REQUIRE(data.substr(at("a"), 4) == le32(bits(7.0f)));
        } else {
            // bf16 of 0.1f = 0x3dcccccd: dropped half 0xcccd > 0x8000 rounds up to 0x3dcd.
            REQUIRE(data.substr(at("b"), 6) == le16(0x3f80) + le16(0xc020) + le16(0x3dcd));
            REQUIRE(data.substr(at("a"), 2) == le16(0x40e0));
        }
    }
}

TEST_CASE("safetensors file made by hand: I32, BF16, F16, F32, padded header, any key order",
          "[io][safetensors]") {
    TempDir dir;
    // Buffer: w (F32 [2]) at 0, ids (I32 [2, 2]) at 8, h (F16 [3]) at 24, b (BF16 [1]) at 30.
    const std::string data = le32(bits(0.5f)) + le32(bits(-3.0f)) +                        //
                             le32(7) + le32(static_cast<std::uint32_t>(-1)) + le32(0) + le32(2147483647u) +
                             le16(0x3c00) + le16(0x0001) + le16(0xfc00) +                   // 1, 2^-24, -Inf
                             le16(0xc049);                                                  // -3.140625
    const std::string header =
        R"({"ids": {"shape": [2, 2], "dtype": "I32", "data_offsets": [8, 24]},)"
        R"( "h": {"dtype": "F16", "shape": [3], "data_offsets": [24, 30]},)"
        R"( "__metadata__": {"format": "pt", "source": "hand"},)"
        R"( "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
        R"( "b": {"dtype": "BF16", "shape": [], "data_offsets": [30, 32]}})"
        "          ";  // padded with spaces, as the reference writer does
    const auto file = dir / "hand.safetensors";
    write_bytes(file, st_file(header, data));

    const auto f = io::read_safetensors(file);
    REQUIRE(f.metadata == std::map<std::string, std::string>{{"format", "pt"}, {"source", "hand"}});
    REQUIRE(f.tensors.size() == 4);
    REQUIRE(f.tensors.at("w").shape() == Shape{2});
    REQUIRE(f.tensors.at("w").to_vector() == std::vector<float>{0.5f, -3.0f});
    const Tensor& ids = f.tensors.at("ids");
    REQUIRE(ids.dtype() == DType::i32);
    REQUIRE(ids.shape() == Shape{2, 2});
    REQUIRE(std::vector<std::int32_t>(ids.span<std::int32_t>().begin(), ids.span<std::int32_t>().end()) ==
            std::vector<std::int32_t>{7, -1, 0, 2147483647});
    const auto h = f.tensors.at("h").to_vector();
    REQUIRE(h[0] == 1.0f);
    REQUIRE(h[1] == std::ldexp(1.0f, -24));
    REQUIRE((std::isinf(h[2]) && h[2] < 0));
    REQUIRE(f.tensors.at("b").shape() == Shape{});
    REQUIRE(f.tensors.at("b").item() == -3.140625f);

    const auto raw = io::read_safetensors(file, true);
    REQUIRE(raw.tensors.at("h").dtype() == DType::f16);
    REQUIRE(raw.tensors.at("b").dtype() == DType::bf16);
    REQUIRE(*static_cast<const std::uint16_t*>(raw.tensors.at("b").raw()) == 0xc049);
    REQUIRE(raw.tensors.at("ids").dtype() == DType::i32);

    // NaN and Inf are data, not errors: the loader only moves bytes.
    write_bytes(dir / "nan.safetensors",
                st_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                        le32(0x7fc00000u) + le32(0x7f800000u)));
    const auto nan = io::read_safetensors(dir / "nan.safetensors").tensors.at("x").to_vector();
    REQUIRE(std::isnan(nan[0]));
    REQUIRE(std::isinf(nan[1]));

    // Zero tensors and no metadata.
    write_bytes(dir / "none.safetensors", st_file("{}      ", ""));
    const auto none = io::read_safetensors(dir / "none.safetensors");
    REQUIRE(none.tensors.empty());
    REQUIRE(none.metadata.empty());
}

TEST_CASE("sharded safetensors: an index and two shards read as one", "[io][safetensors]") {
    TempDir dir;
    const Tensor emb = test::random_tensor({4, 3}, 5);
    const Tensor w0 = test::random_tensor({3, 3}, 6);
    const Tensor w1 = test::random_tensor({3}, 7);
    io::write_safetensors(dir / "model-00001-of-00002.safetensors", {{"embed", emb}, {"layers.0.w", w0}}, DType::f32,
                          {{"format", "pt"}});
    io::write_safetensors(dir / "model-00002-of-00002.safetensors", {{"layers.1.w", w1}});
    const std::string index = R"({"metadata": {"total_size": 96},
        "weight_map": {"embed": "model-00001-of-00002.safetensors",
                       "layers.0.w": "model-00001-of-00002.safetensors",
                       "layers.1.w": "model-00002-of-00002.safetensors"}})";
    write_bytes(dir / "model.safetensors.index.json", index);

    const auto all = io::read_safetensors_index(dir / "model.safetensors.index.json");
    REQUIRE(all.tensors.size() == 3);
    REQUIRE(all.tensors.at("embed").to_vector() == emb.to_vector());
    REQUIRE(all.tensors.at("layers.0.w").to_vector() == w0.to_vector());
    REQUIRE(all.tensors.at("layers.1.w").to_vector() == w1.to_vector());
    REQUIRE(all.tensors.at("embed").shape() == Shape{4, 3});
    REQUIRE(all.metadata.at("total_size") == "96");
    REQUIRE(all.metadata.at("format") == "pt");

    SECTION("a missing shard names the index and the shard") {
        write_bytes(dir / "missing.index.json",
                    R"({"weight_map": {"embed": "model-00001-of-00002.safetensors", "x": "gone.safetensors"}})");
        REQUIRE_THROWS_WITH(io::read_safetensors_index(dir / "missing.index.json"),
                            Catch::Contains("missing.index.json") && Catch::Contains("gone.safetensors") &&
                                Catch::Contains("does not exist"));
    }
    SECTION("a tensor mapped to a shard without it names both") {
        write_bytes(dir / "wrong.index.json",
                    R"({"weight_map": {"layers.1.w": "model-00001-of-00002.safetensors"}})");
        REQUIRE_THROWS_WITH(io::read_safetensors_index(dir / "wrong.index.json"),
                            Catch::Contains("'layers.1.w'") && Catch::Contains("model-00001-of-00002.safetensors") &&
                                Catch::Contains("does not contain"));
    }
    SECTION("shards must sit beside the index") {
        write_bytes(dir / "escape.index.json", R"({"weight_map": {"x": "../model.safetensors"}})");
        REQUIRE_THROWS_WITH(io::read_safetensors_index(dir / "escape.index.json"),
                            Catch::Contains("escape.index.json") && Catch::Contains("not a file name"));
    }
    SECTION("an index without weight_map, or not JSON") {
        write_bytes(dir / "empty.index.json", R"({"metadata": {}})");
        REQUIRE_THROWS_WITH(io::read_safetensors_index(dir / "empty.index.json"),
                            Catch::Contains("empty.index.json") && Catch::Contains("weight_map"));
        write_bytes(dir / "broken.index.json", R"({"weight_map": )");
        REQUIRE_THROWS_WITH(io::read_safetensors_index(dir / "broken.index.json"),
                            Catch::Contains("broken.index.json") && Catch::Contains("invalid JSON"));
        REQUIRE_THROWS_WITH(io::read_safetensors_index(dir / "nothing.index.json"),
                            Catch::Contains("nothing.index.json") && Catch::Contains("does not exist"));
    }
}

TEST_CASE("hostile safetensors files give errors naming the file and the problem", "[io][safetensors]") {
    TempDir dir;
    const std::string f32x2 = le32(bits(1.0f)) + le32(bits(2.0f));
    const auto entry = [](const std::string& body) { return R"({"w": )" + body + "}"; };
    struct Case {
        std::string file, bytes, what;
    };
    const std::vector<Case> cases{
        {"short.safetensors", std::string("\x08\x00\x00", 3), "shorter than the 8-byte"},
        {"empty.safetensors", "", "shorter than the 8-byte"},
        {"longer.safetensors", le64(1000) + "{}", "larger than the file"},
        {"absurd.safetensors", le64(std::uint64_t{1} << 40) + "{}", "absurd"},
        {"huge.safetensors", le64(~std::uint64_t{0}) + "{}", "absurd"},
        {"notjson.safetensors", st_file(R"({"w": {"dtype": )", ""), "invalid JSON"},
        {"noheader.safetensors", st_file("", ""), "invalid JSON"},
        {"badutf8.safetensors", st_file("{\"w\xff\": {}}", ""), "invalid JSON"},
        {"array.safetensors", st_file("[1, 2]", ""), "not an object"},
        {"entry.safetensors", st_file(entry("3"), ""), "'w': entry is number, not an object"},
        {"nodtype.safetensors", st_file(entry(R"({"shape": [2], "data_offsets": [0, 8]})"), f32x2),
         "'w': missing field 'dtype'"},
        {"noshape.safetensors", st_file(entry(R"({"dtype": "F32", "data_offsets": [0, 8]})"), f32x2),
         "'w': missing field 'shape'"},
        {"nooffsets.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [2]})"), f32x2),
         "'w': missing field 'data_offsets'"},
        {"f64.safetensors", st_file(entry(R"({"dtype": "F64", "shape": [1], "data_offsets": [0, 8]})"), f32x2),
         "unsupported dtype 'F64'"},
        {"dtypenum.safetensors", st_file(entry(R"({"dtype": 5, "shape": [2], "data_offsets": [0, 8]})"), f32x2),
         "'w': dtype is 5, not a string"},
        {"negative.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]})"), f32x2),
         "'w': shape has negative value -1"},
        {"rank5.safetensors",
         st_file(entry(R"({"dtype": "F32", "shape": [1, 1, 1, 2, 1], "data_offsets": [0, 8]})"), f32x2),
         "at most 4 dimensions"},
        {"overflow.safetensors",
         st_file(entry(R"({"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]})"), f32x2),
         "'w': shape [4294967296,4294967296]: the number of elements overflows"},
        {"u64.safetensors",
         st_file(entry(R"({"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 8]})"), f32x2),
         "overflows"},
        {"float.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]})"), f32x2),
         "not an integer"},
        {"shapestr.safetensors", st_file(entry(R"({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]})"), f32x2),
         "'w': shape is \"2\", not an array"},
        {"outside.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [100], "data_offsets": [0, 400]})"), f32x2),
         "'w': data_offsets [0, 400] out of the data buffer of 8 bytes"},
        {"backwards.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [1], "data_offsets": [8, 4]})"), f32x2),
         "'w': data_offsets [8, 4] end before begin"},
        {"negoffset.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]})"), f32x2),
         "negative value -8"},
        {"threeoffsets.safetensors",
         st_file(entry(R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]})"), f32x2), "not [begin, end]"},
        {"size.safetensors", st_file(entry(R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]})"), f32x2),
         "'w': data_offsets [0, 8] hold 8 bytes but shape [3] of F32 needs 12"},
        {"bf16size.safetensors", st_file(entry(R"({"dtype": "BF16", "shape": [2], "data_offsets": [0, 8]})"), f32x2),
         "needs 4"},
        {"overlap.safetensors",
         st_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                 R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                 f32x2 + f32x2),
         "tensors 'a' [0, 8) and 'b' [4, 12) overlap"},
        {"metadata.safetensors", st_file(R"({"__metadata__": {"epoch": 3}})", ""), "__metadata__ value of 'epoch'"},
        {"metaarray.safetensors", st_file(R"({"__metadata__": ["x"]})", ""), "__metadata__ is array"},
    };
    for (const auto& c : cases) {
        INFO("case " << c.file);
        write_bytes(dir / c.file, c.bytes);
        REQUIRE_THROWS_AS(io::read_safetensors(dir / c.file), Error);
        REQUIRE_THROWS_WITH(io::read_safetensors(dir / c.file), Catch::Contains(c.file) && Catch::Contains(c.what));
    }
    REQUIRE_THROWS_WITH(io::read_safetensors(dir / "missing.safetensors"),
                        Catch::Contains("missing.safetensors") && Catch::Contains("does not exist"));
    fs::create_directories(dir / "folder.safetensors");
    REQUIRE_THROWS_WITH(io::read_safetensors(dir / "folder.safetensors"),
                        Catch::Contains("folder.safetensors") && Catch::Contains("not a regular file"));
}

TEST_CASE("write_safetensors is atomic: replaces the file, leaves no temporary behind", "[io][safetensors]") {
    TempDir dir;
    const auto file = dir / "model.safetensors";
    write_bytes(file, "an older, unrelated file");
    const Tensor w = test::random_tensor({3, 4}, 9);
    io::write_safetensors(file, {{"w", w}}, DType::bf16);
    io::write_safetensors(file, {{"w", w}});  // and once more over a real checkpoint
    REQUIRE(io::read_safetensors(file).tensors.at("w").to_vector() == w.to_vector());

    const auto listing = [&] {
        std::vector<std::string> names;
        for (const auto& e : fs::directory_iterator(dir.path)) names.push_back(e.path().filename().string());
        return names;
    };
    REQUIRE(listing() == std::vector<std::string>{"model.safetensors"});

    // Refused writes touch nothing: the old file stays, no temporary appears.
    const std::string before = read_bytes(file);
    REQUIRE_THROWS_WITH(io::write_safetensors(file, {{"w", w}}, DType::i32),
                        Catch::Contains("model.safetensors") && Catch::Contains("i32"));
    REQUIRE_THROWS_WITH(io::write_safetensors(file, {{"q", Tensor::zeros({4}, DType::q8)}}),
                        Catch::Contains("model.safetensors") && Catch::Contains("'q'"));
    REQUIRE_THROWS_WITH(io::write_safetensors(dir / "no" / "such" / "folder.safetensors", {{"w", w}}),
                        Catch::Contains("folder.safetensors"));
    REQUIRE(read_bytes(file) == before);
    REQUIRE(listing() == std::vector<std::string>{"model.safetensors"});
}
