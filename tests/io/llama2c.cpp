#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;

namespace {

const fs::path stories260k = test::stories260k();

using mopt::test::TempDir;

std::vector<char> read_bytes(const fs::path& file) {
    std::ifstream in(file, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const fs::path& file, const std::vector<char>& bytes) {
    std::ofstream out(file, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
void put_i32(std::vector<char>& bytes, std::size_t offset, std::int32_t v) { std::memcpy(bytes.data() + offset, &v, 4); }
void put_f32(std::vector<char>& bytes, std::size_t offset, float v) { std::memcpy(bytes.data() + offset, &v, 4); }

io::Llama2cConfig small_config(bool shared) {
    // head_size 2, two query heads per key/value head, a hidden width that is not a multiple of dim.
    return {.dim = 8, .hidden_dim = 12, .n_layers = 3, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 11,
            .seq_len = 6, .shared_classifier = shared};
}

io::Llama2cCheckpoint random_checkpoint(const io::Llama2cConfig& c, std::uint64_t seed) {
    io::Llama2cCheckpoint ck;
    ck.config = c;
    ck.token_embedding = test::random_tensor({c.vocab_size, c.dim}, seed++);
    for (std::int64_t l = 0; l < c.n_layers; ++l) {
        io::Llama2cLayer layer;
        layer.rms_att = test::random_tensor({c.dim}, seed++);
        layer.wq = test::random_tensor({c.dim, c.dim}, seed++);
        layer.wk = test::random_tensor({c.kv_dim(), c.dim}, seed++);
        layer.wv = test::random_tensor({c.kv_dim(), c.dim}, seed++);
        layer.wo = test::random_tensor({c.dim, c.dim}, seed++);
        layer.rms_ffn = test::random_tensor({c.dim}, seed++);
        layer.w1 = test::random_tensor({c.hidden_dim, c.dim}, seed++);
        layer.w2 = test::random_tensor({c.dim, c.hidden_dim}, seed++);
        layer.w3 = test::random_tensor({c.hidden_dim, c.dim}, seed++);
        ck.layers.push_back(layer);
    }
    ck.rms_final = test::random_tensor({c.dim}, seed++);
    ck.classifier = c.shared_classifier ? ck.token_embedding : test::random_tensor({c.vocab_size, c.dim}, seed++);
    return ck;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.bytes()) == 0;
}

void require_equal(const io::Llama2cCheckpoint& a, const io::Llama2cCheckpoint& b) {
    REQUIRE(a.config == b.config);
    REQUIRE(bit_equal(a.token_embedding, b.token_embedding));
    REQUIRE(a.layers.size() == b.layers.size());
    for (std::size_t l = 0; l < a.layers.size(); ++l) {
        const auto& x = a.layers[l];
        const auto& y = b.layers[l];
        REQUIRE(bit_equal(x.rms_att, y.rms_att));
        REQUIRE(bit_equal(x.wq, y.wq));
        REQUIRE(bit_equal(x.wk, y.wk));
        REQUIRE(bit_equal(x.wv, y.wv));
        REQUIRE(bit_equal(x.wo, y.wo));
        REQUIRE(bit_equal(x.rms_ffn, y.rms_ffn));
        REQUIRE(bit_equal(x.w1, y.w1));
        REQUIRE(bit_equal(x.w2, y.w2));
        REQUIRE(bit_equal(x.w3, y.w3));
    }
    REQUIRE(bit_equal(a.rms_final, b.rms_final));
    REQUIRE(bit_equal(a.classifier, b.classifier));
}

// Byte offsets of the stored sections of `c`, computed independently of the reader.
struct Layout {
    std::int64_t embedding, layers_begin, rms_final, freq, classifier, end_shared, end;
    std::int64_t kind(const io::Llama2cConfig& c, int k, std::int64_t layer) const {
        const std::int64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim(), L = c.n_layers;
        const std::int64_t per[9] = {d, d * d, kv * d, kv * d, d * d, d, h * d, d * h, h * d};
        std::int64_t off = layers_begin;
        for (int i = 0; i < k; ++i) off += L * per[i] * 4;
        return off + layer * per[k] * 4;
    }
};
Layout layout(const io::Llama2cConfig& c) {
    Layout o{};
    const std::int64_t d = c.dim, h = c.hidden_dim, kv = c.kv_dim(), L = c.n_layers;
    o.embedding = 28;
    o.layers_begin = o.embedding + c.vocab_size * d * 4;
    o.rms_final = o.layers_begin + L * (2 * d + 2 * d * d + 2 * kv * d + 3 * h * d) * 4;
    o.freq = o.rms_final + d * 4;
    o.classifier = o.freq + 2 * c.seq_len * (d / c.n_heads / 2) * 4;
    o.end_shared = o.classifier;
    o.end = o.classifier + (c.shared_classifier ? 0 : c.vocab_size * d * 4);
    return o;
}

}  // namespace

TEST_CASE("llama2c: the real stories260K checkpoint loads with the README's config", "[io][llama2c]") {
    if (!test::have_files({stories260k})) return;
    const io::Llama2cCheckpoint ck = io::load_llama2c(stories260k);
    const io::Llama2cConfig& c = ck.config;
    REQUIRE(c.dim == 64);
    REQUIRE(c.hidden_dim == 172);
    REQUIRE(c.n_layers == 5);
    REQUIRE(c.n_heads == 8);
    REQUIRE(c.n_kv_heads == 4);
    REQUIRE(c.vocab_size == 512);
    REQUIRE(c.seq_len == 512);
    REQUIRE(c.shared_classifier);
    REQUIRE(c.kv_dim() == 32);

    REQUIRE(ck.token_embedding.shape() == Shape{512, 64});
    REQUIRE(ck.layers.size() == 5);
    for (const auto& layer : ck.layers) {
        REQUIRE(layer.rms_att.shape() == Shape{64});
        REQUIRE(layer.wq.shape() == Shape{64, 64});
        REQUIRE(layer.wk.shape() == Shape{32, 64});
        REQUIRE(layer.wv.shape() == Shape{32, 64});
        REQUIRE(layer.wo.shape() == Shape{64, 64});
        REQUIRE(layer.rms_ffn.shape() == Shape{64});
        REQUIRE(layer.w1.shape() == Shape{172, 64});
        REQUIRE(layer.w2.shape() == Shape{64, 172});
        REQUIRE(layer.w3.shape() == Shape{172, 64});
    }
    REQUIRE(ck.rms_final.shape() == Shape{64});
    REQUIRE(ck.classifier.shape() == Shape{512, 64});
    REQUIRE(ck.classifier.raw() == ck.token_embedding.raw());  // shared, not copied

    // First and last weights against the raw bytes: the first float after the header, and the last
    // float before the legacy RoPE tables (the end of rms_final).
    const auto bytes = read_bytes(stories260k);
    const Layout o = layout(c);
    REQUIRE(static_cast<std::int64_t>(bytes.size()) == o.end);
    float first = 0, last = 0, wk_l3 = 0;
    std::memcpy(&first, bytes.data() + o.embedding, 4);
    std::memcpy(&last, bytes.data() + o.freq - 4, 4);
    std::memcpy(&wk_l3, bytes.data() + o.kind(c, 2, 3), 4);
    REQUIRE(std::isfinite(first));
    REQUIRE(std::isfinite(last));
    REQUIRE(std::bit_cast<std::uint32_t>(ck.token_embedding.at(0)) == std::bit_cast<std::uint32_t>(first));
    REQUIRE(std::bit_cast<std::uint32_t>(ck.rms_final.at(63)) == std::bit_cast<std::uint32_t>(last));
    REQUIRE(std::bit_cast<std::uint32_t>(ck.layers[3].wk.at(0)) == std::bit_cast<std::uint32_t>(wk_l3));
    // RMSNorm gains of a trained model are positive-ish and O(1), not garbage from a misaligned read.
    for (float g : ck.rms_final.span()) REQUIRE(std::abs(g) < 100.0f);
}

TEST_CASE("llama2c: save then load is bit-exact, shared and unshared classifier", "[io][llama2c]") {
    TempDir dir;
    for (bool shared : {true, false}) {
        INFO("shared_classifier = " << shared);
        const io::Llama2cConfig c = small_config(shared);
        const io::Llama2cCheckpoint ck = random_checkpoint(c, shared ? 100 : 200);
        const fs::path file = dir.path / (shared ? "shared.bin" : "unshared.bin");
        io::save_llama2c(file, ck);
        REQUIRE(static_cast<std::int64_t>(fs::file_size(file)) == layout(c).end);
        const auto bytes = read_bytes(file);
        std::int32_t vocab_field = 0;
        std::memcpy(&vocab_field, bytes.data() + 20, 4);
        REQUIRE(vocab_field == (shared ? 11 : -11));  // the sign carries the classifier's sharing

        const io::Llama2cCheckpoint back = io::load_llama2c(file);
        require_equal(ck, back);
        if (shared)
            REQUIRE(back.classifier.raw() == back.token_embedding.raw());
        else
            REQUIRE(back.classifier.raw() != back.token_embedding.raw());
    }
    REQUIRE(dir.entries() == 2);  // no temporary file left behind
}

TEST_CASE("llama2c: save replaces an existing file atomically", "[io][llama2c]") {
    TempDir dir;
    const fs::path file = dir.path / "model.bin";
    write_bytes(file, std::vector<char>(5, 'x'));  // something already there
    const auto a = random_checkpoint(small_config(false), 1);
    io::save_llama2c(file, a);
    require_equal(a, io::load_llama2c(file));
    const auto b = random_checkpoint(small_config(true), 2);
    io::save_llama2c(file, b);
    require_equal(b, io::load_llama2c(file));
    REQUIRE(dir.entries() == 1);

    // A failed save leaves the old file untouched and no temporary behind.
    auto bad = random_checkpoint(small_config(true), 3);
    bad.layers[1].w2 = Tensor::zeros({4, 4});
    REQUIRE_THROWS_WITH(io::save_llama2c(file, bad), Catch::Contains("model.bin") && Catch::Contains("w2 (layer 1)") &&
                                                         Catch::Contains("[8, 12]"));
    auto nan = random_checkpoint(small_config(true), 4);
    nan.rms_final.at(2) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(io::save_llama2c(file, nan), Catch::Contains("rms_final") && Catch::Contains("non-finite"));
    require_equal(b, io::load_llama2c(file));
    REQUIRE(dir.entries() == 1);
    REQUIRE_THROWS_WITH(io::save_llama2c(dir.path / "no-such-folder" / "m.bin", b), Catch::Contains("m.bin"));
}

TEST_CASE("llama2c: the legacy RoPE tables may be absent only when nothing follows them", "[io][llama2c]") {
    TempDir dir;
    const io::Llama2cConfig c = small_config(true);
    const auto ck = random_checkpoint(c, 7);
    const fs::path file = dir.path / "nofreq.bin";
    io::save_llama2c(file, ck);
    auto bytes = read_bytes(file);
    bytes.resize(static_cast<std::size_t>(layout(c).freq));
    write_bytes(file, bytes);
    require_equal(ck, io::load_llama2c(file));

    // Unshared: the classifier must follow the tables, so dropping them reads as a short classifier.
    const io::Llama2cConfig cu = small_config(false);
    const auto cku = random_checkpoint(cu, 8);
    const fs::path fu = dir.path / "nofreq-unshared.bin";
    io::save_llama2c(fu, cku);
    auto bu = read_bytes(fu);
    const Layout o = layout(cu);
    bu.erase(bu.begin() + o.freq, bu.begin() + o.classifier);
    write_bytes(fu, bu);
    REQUIRE_THROWS_WITH(io::load_llama2c(fu), Catch::Contains("nofreq-unshared.bin") && Catch::Contains("classifier") &&
                                                  Catch::Contains("truncated"));
}

TEST_CASE("llama2c: hostile files give errors naming the file and the problem", "[io][llama2c]") {
    TempDir dir;
    const io::Llama2cConfig c = small_config(false);
    const Layout o = layout(c);
    const fs::path good = dir.path / "good.bin";
    io::save_llama2c(good, random_checkpoint(c, 11));
    const auto bytes = read_bytes(good);

    // Writes `b` under a unique name and expects load to fail mentioning the name and `what`.
    int n = 0;
    const auto expect_error = [&](std::vector<char> b, const std::string& what, const std::string& what2 = "") {
        const std::string name = "hostile-" + std::to_string(n++) + ".bin";
        write_bytes(dir.path / name, b);
        INFO("case " << name << ": expecting '" << what << "'");
        REQUIRE_THROWS_AS(io::load_llama2c(dir.path / name), Error);
        REQUIRE_THROWS_WITH(io::load_llama2c(dir.path / name),
                            Catch::Contains(name) && Catch::Contains(what) && Catch::Contains(what2));
    };
    const auto truncated = [&](std::int64_t size) { return std::vector<char>(bytes.begin(), bytes.begin() + size); };
    const auto with_header = [&](std::int32_t dim, std::int32_t hidden, std::int32_t layers, std::int32_t heads,
                                 std::int32_t kv_heads, std::int32_t vocab, std::int32_t seq) {
        auto b = bytes;
        const std::int32_t h[7] = {dim, hidden, layers, heads, kv_heads, vocab, seq};
        for (int i = 0; i < 7; ++i) put_i32(b, static_cast<std::size_t>(4 * i), h[i]);
        return b;
    };

    REQUIRE_THROWS_WITH(io::load_llama2c(dir.path / "absent.bin"),
                        Catch::Contains("absent.bin") && Catch::Contains("no such file"));
    // Truncated: in the header, in the embedding, in the middle of a layer block, in the RoPE
    // tables, in the classifier.
    expect_error({}, "header", "28");
    expect_error(truncated(10), "header", "28");
    expect_error(truncated(27), "header", "28");
    expect_error(truncated(o.embedding + 17), "token_embedding", "truncated");
    expect_error(truncated(o.kind(c, 1, 1) + 5), "tensor wq needs", "truncated");
    expect_error(truncated(o.kind(c, 8, 2)), "tensor w3 needs " + std::to_string(c.n_layers * c.hidden_dim * c.dim * 4) + " bytes");
    expect_error(truncated(o.freq + 4), "freq_cis_real", "truncated");
    expect_error(truncated(o.end - 1), "classifier", std::to_string(c.vocab_size * c.dim * 4 - 1) + " remain");
    // Absurd sizes: non-positive, overflowing products, and plausible sizes the file cannot hold.
    expect_error(with_header(0, 12, 3, 4, 2, -11, 6), "dim = 0", "positive");
    expect_error(with_header(8, 12, -3, 4, 2, -11, 6), "n_layers = -3");
    expect_error(with_header(8, 12, 3, 4, 2, 0, 6), "vocab_size = 0");
    expect_error(with_header(8, 12, 3, 4, 2, -11, 0), "seq_len = 0");
    expect_error(with_header(8, 12, 3, 0, 2, -11, 6), "n_heads = 0");
    expect_error(with_header(1 << 30, 2147483647, 2147483647, 1 << 29, 1 << 29, -2147483647, 2147483647),
                 "overflow");
    expect_error(with_header(8, 12, 3, 4, 2, std::numeric_limits<std::int32_t>::min(), 6), "vocab_size = 2147483648");
    expect_error(with_header(4096, 11008, 32, 32, 32, 32000, 2048), "token_embedding", "truncated");
    // Inconsistent head counts.
    expect_error(with_header(8, 12, 3, 3, 1, -11, 6), "n_heads = 3", "does not divide dim = 8");
    expect_error(with_header(8, 12, 3, 4, 3, -11, 6), "n_kv_heads = 3", "does not divide n_heads = 4");
    expect_error(with_header(8, 12, 3, 8, 8, -11, 6), "head_size", "odd");
    // A header that disagrees with the weights (one layer too many) and trailing garbage.
    expect_error(with_header(8, 12, 4, 4, 2, -11, 6), "truncated");
    {
        auto b = bytes;
        b.insert(b.end(), {'j', 'u', 'n', 'k'});
        expect_error(b, "4 trailing bytes");
    }
    expect_error(with_header(8, 12, 3, 4, 2, 11, 6), "trailing bytes");  // unshared file read as shared
    // Non-finite weights are named by tensor and layer.
    {
        auto b = bytes;
        put_f32(b, static_cast<std::size_t>(o.kind(c, 7, 1) + 4 * 5), std::numeric_limits<float>::quiet_NaN());
        expect_error(b, "w2 (layer 1)", "non-finite");
    }
    {
        auto b = bytes;
        put_f32(b, static_cast<std::size_t>(o.classifier + 4 * 3), std::numeric_limits<float>::infinity());
        expect_error(b, "classifier", "non-finite");
    }
    {
        auto b = bytes;
        put_f32(b, static_cast<std::size_t>(o.embedding), -std::numeric_limits<float>::infinity());
        expect_error(b, "token_embedding", "non-finite");
    }
    // The untouched file still loads.
    REQUIRE_NOTHROW(io::load_llama2c(good));
}
