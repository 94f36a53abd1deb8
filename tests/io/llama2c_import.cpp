#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>
#include <mopt/io/llama2c_import.hpp>
#include <mopt/io/load_model.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;

namespace {

using Llama = nn::Transformer<nn::Llama>;

using mopt::test::TempDir;

// The forward pass of llama2.c's run.c, one position at a time with plain loops in double:
// interleaved RoPE pairs (2i, 2i+1), grouped-query attention, RMSNorm eps 1e-5, SwiGLU, and the
// classifier (shared with the embedding or not). Written from the format, independent of mopt's ops.
// ids: [T] -> logits [T][vocab]
std::vector<std::vector<double>> reference_forward(const io::Llama2cCheckpoint& ck, const std::vector<std::int32_t>& ids) {
    const io::Llama2cConfig& c = ck.config;
    const std::int64_t dim = c.dim, hidden = c.hidden_dim, hs = c.head_size(), kv_dim = c.kv_dim();
    const std::int64_t kv_mul = c.n_heads / c.n_kv_heads, T = static_cast<std::int64_t>(ids.size());
    using Vec = std::vector<double>;
    // out[r] = sum_k w[r, k] x[k]; w: [rows, cols]
    auto matvec = [](const Tensor& w, const Vec& x) {
        Vec out(static_cast<std::size_t>(w.dim(0)), 0.0);
        for (std::int64_t r = 0; r < w.dim(0); ++r)
            for (std::int64_t k = 0; k < w.dim(1); ++k) out[r] += static_cast<double>(w.f32()[r * w.dim(1) + k]) * x[k];
        return out;
    };
    auto rmsnorm = [](const Vec& x, const Tensor& w) {
        double ss = 0;
        for (double v : x) ss += v * v;
        const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + 1e-5);
        Vec o(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) o[i] = static_cast<double>(w.f32()[i]) * x[i] * inv;
        return o;
    };
    // Key/value caches per layer: [T][kv_dim]
    std::vector<std::vector<Vec>> kc(ck.layers.size()), vc(ck.layers.size());
    std::vector<Vec> logits;
    for (std::int64_t pos = 0; pos < T; ++pos) {
        Vec x(static_cast<std::size_t>(dim));
        for (std::int64_t i = 0; i < dim; ++i) x[i] = ck.token_embedding.f32()[ids[pos] * dim + i];
        for (std::size_t l = 0; l < ck.layers.size(); ++l) {
            const io::Llama2cLayer& L = ck.layers[l];
            Vec xb = rmsnorm(x, L.rms_att);
            Vec q = matvec(L.wq, xb), k = matvec(L.wk, xb), v = matvec(L.wv, xb);
            for (std::int64_t i = 0; i < dim; i += 2) {
                const std::int64_t head_dim = i % hs;
                const double freq = 1.0 / std::pow(10000.0, static_cast<double>(head_dim) / static_cast<double>(hs));
                const double angle = static_cast<double>(pos) * freq, fcr = std::cos(angle), fci = std::sin(angle);
                auto rotate = [&](Vec& u) {
                    const double a = u[i], b = u[i + 1];
                    u[i] = a * fcr - b * fci;
                    u[i + 1] = a * fci + b * fcr;
                };
                rotate(q);
                if (i < kv_dim) rotate(k);
            }
            kc[l].push_back(k);
            vc[l].push_back(v);
            Vec att_out(static_cast<std::size_t>(dim), 0.0);
            for (std::int64_t h = 0; h < c.n_heads; ++h) {
                const std::int64_t kv_off = (h / kv_mul) * hs;
                Vec score(static_cast<std::size_t>(pos + 1));
                double mx = -1e300;
                for (std::int64_t t = 0; t <= pos; ++t) {
                    double s = 0;
                    for (std::int64_t i = 0; i < hs; ++i) s += q[h * hs + i] * kc[l][t][kv_off + i];
                    score[t] = s / std::sqrt(static_cast<double>(hs));
                    mx = std::max(mx, score[t]);
                }
                double sum = 0;
                for (double& s : score) sum += (s = std::exp(s - mx));
                for (std::int64_t t = 0; t <= pos; ++t)
                    for (std::int64_t i = 0; i < hs; ++i) att_out[h * hs + i] += score[t] / sum * vc[l][t][kv_off + i];
            }
            Vec o = matvec(L.wo, att_out);
            for (std::int64_t i = 0; i < dim; ++i) x[i] += o[i];
            xb = rmsnorm(x, L.rms_ffn);
            Vec h1 = matvec(L.w1, xb), h3 = matvec(L.w3, xb);
            for (std::int64_t i = 0; i < hidden; ++i) h1[i] = h1[i] / (1.0 + std::exp(-h1[i])) * h3[i];
            Vec down = matvec(L.w2, h1);
            for (std::int64_t i = 0; i < dim; ++i) x[i] += down[i];
        }
        logits.push_back(matvec(ck.classifier, rmsnorm(x, ck.rms_final)));
    }
    return logits;
}

// mopt's logits for one sequence. ids: [T] -> [1, T, vocab]
Tensor mopt_logits(Llama& model, const std::vector<std::int32_t>& ids) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const Tensor in = Tensor::from({1, static_cast<std::int64_t>(ids.size())}, std::span<const std::int32_t>(ids));
    return model.forward(tape, in).logits.value().clone();
}

// max |a - ref| / max |ref| over all logits (relative to the logits' scale), and the largest
// per-element |a - ref| / max(|ref|, 1): relative for large logits, absolute (in nats) for those
// near zero, whose relative error is float rounding noise.
struct Diff {
    double scaled = 0, elementwise = 0;
};
Diff compare(const Tensor& got, const std::vector<std::vector<double>>& ref) {
    double max_ref = 0, max_diff = 0;
    for (const auto& row : ref)
        for (double v : row) max_ref = std::max(max_ref, std::abs(v));
    Diff d;
    const std::int64_t V = got.shape().back();
    for (std::size_t t = 0; t < ref.size(); ++t)
        for (std::int64_t j = 0; j < V; ++j) {
            const double r = ref[t][j], diff = std::abs(got.f32()[t * V + j] - r);
            max_diff = std::max(max_diff, diff);
            d.elementwise = std::max(d.elementwise, diff / std::max(std::abs(r), 1.0));
        }
    d.scaled = max_diff / max_ref;
    return d;
}

std::vector<char> read_bytes(const fs::path& file) {
    std::ifstream in(file, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("interleaved_to_half_rows: new row j*half+i of each head is old row 2i+j", "[llama2c]") {
    const std::int64_t heads = 2, head_dim = 6, half = 3, in = 2;
    Tensor w = Tensor::empty({heads * head_dim, in});
    for (std::int64_t r = 0; r < heads * head_dim; ++r)
        for (std::int64_t k = 0; k < in; ++k) w.f32()[r * in + k] = static_cast<float>(100 * r + k);
    const Tensor p = io::interleaved_to_half_rows(w, heads);
    for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < half; ++i)
            for (std::int64_t j = 0; j < 2; ++j)
                for (std::int64_t k = 0; k < in; ++k)
                    REQUIRE(p.f32()[(h * head_dim + j * half + i) * in + k] ==
                            w.f32()[(h * head_dim + 2 * i + j) * in + k]);
    REQUIRE_THROWS_WITH(io::interleaved_to_half_rows(w, 4), Catch::Contains("[12, 2]"));
}

TEST_CASE("import_llama2c: stories260K logits match llama2.c's forward", "[llama2c]") {
    if (!test::have_files({test::stories260k(), test::tok512()})) return;
    const auto ck = io::load_llama2c(test::stories260k());
    Llama model = io::import_llama2c<Llama>(test::stories260k());
    const nn::ModelConfig& c = model.config();
    CHECK(c.vocab_size == 512);
    CHECK(c.d_model == 64);
    CHECK(c.d_ff == 172);
    CHECK(c.n_layers == 5);
    CHECK(c.n_heads == 8);
    CHECK(c.n_kv_heads == 4);
    CHECK(c.max_seq == 512);
    CHECK(c.tie_embeddings);
    // Embedding, 5 × (2 norms + q, k, v, o + 3 FFN), final norm; no lm_head (shared classifier).
    std::int64_t expected = 512 * 64 + 64;
    expected += 5 * (2 * 64 + 64 * 64 * 2 + 32 * 64 * 2 + 3 * 172 * 64);
    CHECK(model.num_parameters() == expected);

    const auto tok = data::Llama2cTokenizer::load(test::tok512(), c.vocab_size);
    const auto ids = tok.encode("Once upon a time, there was a little girl named Lily. She loved to play outside.");
    REQUIRE(ids.size() > 15);
    const Tensor got = mopt_logits(model, ids);
    REQUIRE(got.shape() == Shape{1, static_cast<std::int64_t>(ids.size()), 512});
    const auto ref = reference_forward(ck, ids);
    const Diff d = compare(got, ref);
    INFO("max |diff| / max |logit| = " << d.scaled << ", per-element |diff| / max(|ref|, 1) = " << d.elementwise);
    CHECK(d.scaled <= 1e-5);
    CHECK(d.elementwise <= 1e-4);
    WARN("stories260K vs llama2.c reference on " << ids.size() << " tokens: max |diff| / max |logit| = " << d.scaled
                                                << ", per-element |diff| / max(|ref|, 1) = " << d.elementwise);

    // The model is a real one: after "Once upon a" it predicts " time".
    const auto prefix = tok.encode("Once upon a");
    const Tensor lp = mopt_logits(model, prefix);
    const float* last = lp.f32() + (static_cast<std::int64_t>(prefix.size()) - 1) * 512;
    const auto best = static_cast<std::int32_t>(std::max_element(last, last + 512) - last);
    CHECK(tok.vocab_piece(best) == " time");

    // load_model picks the llama2.c reader for a .bin and gives the same model.
    Llama again = io::load_model<Llama>(test::stories260k());
    const Tensor got2 = mopt_logits(again, ids);
    CHECK(std::equal(got.span().begin(), got.span().end(), got2.span().begin()));
}

TEST_CASE("import_llama2c: unshared classifier, GQA and odd sizes match the reference", "[llama2c]") {
    // A random checkpoint written by save_llama2c: classifier stored (negative vocab in the header),
    // 4 query heads on 2 key/value heads of size 4, hidden width not a multiple of dim.
    io::Llama2cCheckpoint ck;
    ck.config = {.dim = 16, .hidden_dim = 20, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 13,
                 .seq_len = 12, .shared_classifier = false};
    const auto& c = ck.config;
    std::uint64_t seed = 7;
    ck.token_embedding = test::random_tensor({c.vocab_size, c.dim}, seed++);
    for (std::int64_t l = 0; l < c.n_layers; ++l) {
        io::Llama2cLayer L;
        L.rms_att = test::random_tensor({c.dim}, seed++, 0.5f, 1.5f);
        L.wq = test::random_tensor({c.dim, c.dim}, seed++, -0.5f, 0.5f);
        L.wk = test::random_tensor({c.kv_dim(), c.dim}, seed++, -0.5f, 0.5f);
        L.wv = test::random_tensor({c.kv_dim(), c.dim}, seed++, -0.5f, 0.5f);
        L.wo = test::random_tensor({c.dim, c.dim}, seed++, -0.5f, 0.5f);
        L.rms_ffn = test::random_tensor({c.dim}, seed++, 0.5f, 1.5f);
        L.w1 = test::random_tensor({c.hidden_dim, c.dim}, seed++, -0.5f, 0.5f);
        L.w2 = test::random_tensor({c.dim, c.hidden_dim}, seed++, -0.5f, 0.5f);
        L.w3 = test::random_tensor({c.hidden_dim, c.dim}, seed++, -0.5f, 0.5f);
        ck.layers.push_back(L);
    }
    ck.rms_final = test::random_tensor({c.dim}, seed++, 0.5f, 1.5f);
    ck.classifier = test::random_tensor({c.vocab_size, c.dim}, seed++);
    TempDir tmp;
    const fs::path file = tmp.path / "random.bin";
    io::save_llama2c(file, ck);

    Llama model = io::import_llama2c<Llama>(file);
    CHECK_FALSE(model.config().tie_embeddings);
    bool saw_head = false;
    model.visit_parameters([&](autodiff::Parameter& p) {
        if (p.name() != "lm_head.weight") return;
        saw_head = true;
        CHECK(std::equal(p.value().span().begin(), p.value().span().end(), ck.classifier.span().begin()));
    });
    CHECK(saw_head);
    std::vector<std::int32_t> ids = {1, 5, 12, 0, 7, 7, 3, 9, 2, 11, 4, 6};  // all 12 positions
    const Diff d = compare(mopt_logits(model, ids), reference_forward(ck, ids));
    INFO("max |diff| / max |logit| = " << d.scaled << ", per-element |diff| / max(|ref|, 1) = " << d.elementwise);
    CHECK(d.scaled <= 1e-5);
    CHECK(d.elementwise <= 1e-4);
}

TEST_CASE("import_llama2c: a truncated checkpoint is an error naming the file", "[llama2c]") {
    if (!test::have_files({test::stories260k()})) return;
    TempDir tmp;
    const fs::path cut = tmp.path / "cut-stories.bin";
    std::vector<char> bytes = read_bytes(test::stories260k());
    bytes.resize(bytes.size() / 2);
    std::ofstream(cut, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    REQUIRE_THROWS_WITH(io::import_llama2c<Llama>(cut), Catch::Contains("cut-stories.bin") &&
                                                            Catch::Contains("truncated"));
    REQUIRE_THROWS_WITH(io::load_model<Llama>(cut), Catch::Contains("cut-stories.bin"));
}

TEST_CASE("load_model: paths that are no checkpoint are errors naming the path", "[llama2c]") {
    TempDir tmp;
    const fs::path missing = tmp.path / "nothing-here.bin";
    REQUIRE_THROWS_WITH(io::load_model<Llama>(missing), Catch::Contains("nothing-here.bin"));
    const fs::path text = tmp.path / "notes.txt";
    std::ofstream(text) << "not a model";
    REQUIRE_THROWS_WITH(io::load_model<Llama>(text), Catch::Contains("notes.txt") && Catch::Contains("llama2.c"));
    // A folder without config.json: load_hf's error, naming the folder.
    const fs::path empty = tmp.path / "empty-model";
    fs::create_directories(empty);
    REQUIRE_THROWS_WITH(io::load_model<Llama>(empty), Catch::Contains("empty-model"));
}

TEST_CASE("tokenizer_next_to: the tokenizer file beside a checkpoint", "[llama2c]") {
    TempDir tmp;
    const fs::path model = tmp.path / "model.bin";
    std::ofstream(model) << "x";
    CHECK(io::tokenizer_next_to(model, 512).empty());
    std::ofstream(tmp.path / "tokenizer.bin") << "x";
    CHECK(io::tokenizer_next_to(model, 512) == tmp.path / "tokenizer.bin");
    std::ofstream(tmp.path / "tok512.bin") << "x";  // the vocabulary's own tokenizer comes first
    CHECK(io::tokenizer_next_to(model, 512) == tmp.path / "tok512.bin");
    CHECK(io::tokenizer_next_to(model, 4096) == tmp.path / "tokenizer.bin");
    CHECK(io::tokenizer_next_to(tmp.path, 512).empty());  // a HF folder: tokenizer.model only
    std::ofstream(tmp.path / "tokenizer.model") << "x";
    CHECK(io::tokenizer_next_to(tmp.path, 512) == tmp.path / "tokenizer.model");
}

TEST_CASE("import_llama2c: a model type of another structure is refused", "[llama2c]") {
    if (!test::have_files({test::stories260k()})) return;
    REQUIRE_THROWS_WITH(io::import_llama2c<nn::Transformer<nn::GPT>>(test::stories260k()),
                        Catch::Contains("stories260K.bin") && Catch::Contains("LayerNorm"));
}

TEST_CASE("load_model: a Hugging Face folder or its config.json goes to load_hf", "[llama2c]") {
    const fs::path dir = fs::path(MOPT_SOURCE_DIR) / "tests" / "reference" / "llama_gqa";
    if (!fs::exists(dir / "config.json")) {
        WARN("skipped: " << dir << " missing");
        return;
    }
    Llama from_dir = io::load_model<Llama>(dir);
    Llama from_json = io::load_model<Llama>(dir / "config.json");
    Llama direct = io::load_hf<Llama>(dir);
    CHECK(from_dir.config().n_kv_heads == 2);
    CHECK_FALSE(from_dir.config().tie_embeddings);
    const std::vector<std::int32_t> ids = {1, 9, 4, 30, 47, 2};
    const Tensor a = mopt_logits(from_dir, ids), b = mopt_logits(from_json, ids), c = mopt_logits(direct, ids);
    CHECK(std::equal(a.span().begin(), a.span().end(), c.span().begin()));
    CHECK(std::equal(b.span().begin(), b.span().end(), c.span().begin()));
}
