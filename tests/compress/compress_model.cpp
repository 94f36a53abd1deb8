// compress(model, recipe, calibration) on whole models: every projection of the chosen roles is
// compressed and packed, the model shrinks, still runs, saves and loads exactly; the data-aware
// methods beat the data-free ones on the committed base model's real activations.
#include <catch2/catch.hpp>

#include <filesystem>

#include "test_util.hpp"

using namespace mopt;
using namespace mopt::test;
using compress::Quantizer;
using compress::Recipe;
using compress::Saliency;

namespace {
using Dense = nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::Any>;
using Switch = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>, compress::Any>;

nn::ModelConfig tiny(std::int64_t experts = 0) {
    nn::ModelConfig c;
    c.vocab_size = 64;
    c.d_model = 64;
    c.n_layers = 2;
    c.n_heads = 4;
    c.d_ff = 128;
    c.max_seq = 64;
    c.num_experts = experts;
    return c;
}

Recipe pruning(Saliency s, double ratio) {
    Recipe r;
    r.prune = s;
    r.sparsity.ratio = ratio;
    return r;
}
Recipe quant(Quantizer q, int bits, std::int64_t group = 32) {
    Recipe r;
    r.quantizer = q;
    r.quant.bits = bits;
    r.quant.group = group;
    return r;
}

template <class Model>
Tensor logits_of(Model& m, const Tensor& ids) {
    NoGrad ng;
    Tape tape;
    return m.forward(tape, ids).logits.value().clone();
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
    double d = 0;
    for (std::int64_t i = 0; i < a.numel(); ++i) d = std::max(d, double(std::fabs(a.f32()[i] - b.f32()[i])));
    return d;
}
}  // namespace

TEST_CASE("compress: every method packs every selected projection and the model shrinks", "[compress]") {
    const Tensor calib = random_ids({8, 32}, 11, 64);
    const Tensor ids = random_ids({2, 16}, 12, 64);
    Recipe nm = pruning(Saliency::sparsegpt, 0.0);
    nm.sparsity.nm_zero = 2;
    nm.sparsity.nm_group = 4;
    Recipe combo = pruning(Saliency::sparsegpt, 0.5);
    combo.quantizer = Quantizer::gptq;
    combo.quant.bits = 4;
    combo.quant.group = 32;
    const std::vector<std::pair<Recipe, std::string>> recipes{
        {pruning(Saliency::magnitude, 0.5), "csr"}, {pruning(Saliency::wanda, 0.75), "csr"},
        {pruning(Saliency::sparsegpt, 0.5), "csr"}, {nm, "nm2:4"},
        {quant(Quantizer::int8, 8), "int8"},      {quant(Quantizer::rtn, 4), "int4"},
        {quant(Quantizer::gptq, 3), "int3"},      {combo, "int4"}};
    for (const auto& [recipe, format] : recipes) {
        DYNAMIC_SECTION(recipe.describe()) {
            Dense model(tiny(), 5);
            const Tensor before = logits_of(model, ids);
            const std::int64_t bytes = model.parameter_bytes();
            const auto report = compress::compress(model, recipe, calib);
            CHECK(report.layers.size() == 2 * 7);  // q k v o gate up down per block
            for (const auto& l : report.layers) {
                INFO(l.name);
                CHECK(l.format == format);
                CHECK(l.bytes_after < l.bytes_before);
                CHECK(l.fallback.empty());
                if (recipe.prune && !recipe.sparsity.structured()) CHECK(l.sparsity >= recipe.sparsity.ratio - 1e-6);
                if (recipe.prune && recipe.sparsity.structured()) CHECK(l.sparsity == Approx(0.5));
            }
            CHECK(report.model_bytes_before == bytes);
            CHECK(report.model_bytes_after == model.parameter_bytes());
            CHECK(model.parameter_bytes() < bytes);
            const Tensor after = logits_of(model, ids);
            for (float v : after.span()) REQUIRE(std::isfinite(v));
            CHECK(max_abs_diff(before, after) > 0.0);  // it did change the function
            // The packed model's weights are frozen and never visited as parameters.
            model.visit_parameters([](Parameter& p) { CHECK(p.value().numel() > 0); });
        }
    }
}

TEST_CASE("compress: a compressed checkpoint saves and loads exactly; compress::None refuses it", "[compress]") {
    TempDir dir;
    const Tensor calib = random_ids({4, 32}, 21, 64);
    const Tensor ids = random_ids({2, 16}, 22, 64);
    Recipe combo = pruning(Saliency::wanda, 0.5);
    combo.quantizer = Quantizer::rtn;
    combo.quant.bits = 4;
    combo.quant.group = 32;
    for (const Recipe& r : {combo, quant(Quantizer::int8, 8), pruning(Saliency::magnitude, 0.6)}) {
        Switch model(tiny(4), 3);
        compress::compress(model, r, calib);
        const Tensor expected = logits_of(model, ids);
        model.save(dir.path / "m", DType::bf16);  // packed scales and values stay f32 whatever the dtype
        Switch loaded = Switch::load(dir.path / "m");
        CHECK(loaded.parameter_bytes() == model.parameter_bytes());
        CHECK(loaded.compression_recipe().at("description") == r.describe());
        // bf16 only touches the dense parameters (embeddings, norms, router), so compare loosely
        // there and exactly for a full f32 save.
        CHECK(max_abs_diff(logits_of(loaded, ids), expected) < 0.05);
        model.save(dir.path / "f32");
        Switch exact = Switch::load(dir.path / "f32");
        CHECK(max_abs_diff(logits_of(exact, ids), expected) == 0.0);
    }
    using Plain = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>>;
    CHECK_THROWS_WITH(Plain::load(dir.path / "f32"),
                      Catch::Contains("config.json") && Catch::Contains("compressed") && Catch::Contains("compress::Any"));
}

TEST_CASE("compress: experts see only their routed rows; an unrouted expert falls back to data-free", "[compress]") {
    Switch model(tiny(4), 7);
    // Route every token to expert 0 in both expert layers: a router that only expert 0 wins.
    model.visit_linears([](nn::Linear& l, nn::LinearRole role) {
        if (role != nn::LinearRole::router) return;
        Tensor& w = l.weight.value();
        w.zero();
    });
    // With a zero router every expert ties; ties go to the first, so only expert 0 gets rows.
    const auto report = compress::compress(model, pruning(Saliency::sparsegpt, 0.5), random_ids({4, 32}, 3, 64));
    int fallbacks = 0, routed = 0;
    for (const auto& l : report.layers) {
        if (l.role != nn::LinearRole::expert) continue;
        if (l.name.find("experts.0.") != std::string::npos) {
            CHECK(l.calibration_rows == 4 * 32);
            CHECK(l.fallback.empty());
            ++routed;
        } else {
            CHECK(l.calibration_rows == 0);
            CHECK(l.fallback == "magnitude instead of sparsegpt");
            ++fallbacks;
        }
    }
    CHECK(routed == 2 * 3);
    CHECK(fallbacks == 2 * 3 * 3);
}

TEST_CASE("compress: bad recipes and calibration are named", "[compress]") {
    Dense model(tiny(), 1);
    CHECK_THROWS_WITH(compress::compress(model, pruning(Saliency::magnitude, 1.0), Tensor{}),
                      Catch::Contains("sparsity 1 is outside [0, 1)"));
    Recipe nm = pruning(Saliency::magnitude, 0.0);
    nm.sparsity.nm_zero = 4;
    nm.sparsity.nm_group = 4;
    CHECK_THROWS_WITH(compress::compress(model, nm, Tensor{}), Catch::Contains("1 <= N < M"));
    CHECK_THROWS_WITH(compress::compress(model, quant(Quantizer::rtn, 4, 48), Tensor{}),
                      Catch::Contains("group") && Catch::Contains("q_proj"));
    CHECK_THROWS_WITH(compress::compress(model, pruning(Saliency::sparsegpt, 0.5), Tensor::empty({0, 8}, DType::i32)),
                      Catch::Contains("at least one calibration window"));
    CHECK_THROWS_WITH(compress::compress(model, Recipe{}, Tensor{}), Catch::Contains("neither pruning nor quantisation"));
}

TEST_CASE("compress: on the dense base model's real activations SparseGPT < Wanda < magnitude and GPTQ < RTN",
          "[compress][models]") {
    const std::filesystem::path source = MOPT_SOURCE_DIR;
    const auto brown = source / "data" / "brown";
    if (!std::filesystem::exists(brown)) {
        WARN("skipped: " << brown << " is missing (scripts/fetch_brown downloads it)");
        return;
    }
    using Base = nn::Transformer<nn::Llama>;
    Base model = Base::load(source / "models" / "dense-brown");
    const data::Corpus corpus = data::read_brown(brown, data::BrownDomains::groups7);
    const data::CorpusSplits splits = data::split_corpus(corpus, 1234);
    const data::Tokenizer tok = data::Tokenizer::load(source / "models" / "dense-brown" / "tokenizer.model");
    data::Batches train(splits.train, tok, {.batch_size = 8, .seq_len = 128, .seed = 0});
    const Tensor calib = compress::calibration_windows(train, 16, 1);
    // The inputs of layer 1's up_proj and o_proj on real text.
    nn::Linear& up = model.blocks()[1].ffn.mlp.up;
    nn::Linear& o = model.blocks()[1].attn.o_proj;
    compress::InputStats up_stats(up.in_features()), o_stats(o.in_features());
    Tensor up_x, o_x;
    {
        NoGrad ng;
        Tape tape;
        nn::ObserveLinears observe([&](const nn::Linear& l, const Tensor& x) {
            if (&l == &up) { up_stats.add(x); up_x = x.clone(); }
            if (&l == &o) { o_stats.add(x); o_x = x.clone(); }
        });
        model.forward(tape, calib);
    }
    // ‖X Wᵀ − X Ŵᵀ‖_F / ‖X Wᵀ‖_F
    const auto rel_error = [](const Tensor& x, const Tensor& w, const Tensor& wq) {
        const std::int64_t rows = x.shape().rows(), in = w.dim(1), out = w.dim(0);
        Tensor y = Tensor::empty({rows, out}), yq = Tensor::empty({rows, out});
        backend::cpu::gemm({.trans_b = true, .m = rows, .n = out, .k = in, .a = x.f32(), .lda = in, .b = w.f32(), .ldb = in, .c = y.f32(), .ldc = out});
        backend::cpu::gemm({.trans_b = true, .m = rows, .n = out, .k = in, .a = x.f32(), .lda = in, .b = wq.f32(), .ldb = in, .c = yq.f32(), .ldc = out});
        double num = 0, den = 0;
        for (std::int64_t i = 0; i < y.numel(); ++i) {
            num += double(y.f32()[i] - yq.f32()[i]) * (y.f32()[i] - yq.f32()[i]);
            den += double(y.f32()[i]) * y.f32()[i];
        }
        return std::sqrt(num / den);
    };
    for (auto [lin, stats, x] : {std::tuple{&up, &up_stats, &up_x}, std::tuple{&o, &o_stats, &o_x}}) {
        const Tensor w = lin->weight.value();
        for (double ratio : {0.5, 0.75}) {
            double err[3];
            for (Saliency s : {Saliency::magnitude, Saliency::wanda, Saliency::sparsegpt}) {
                Tensor wq = w.clone();
                compress::prune(wq, s, {.ratio = ratio}, stats);
                err[int(s)] = rel_error(*x, w, wq);
            }
            INFO(lin->weight.name() << " at " << ratio << ": magnitude " << err[0] << ", wanda " << err[1]
                                    << ", sparsegpt " << err[2]);
            CHECK(err[2] < err[1]);
            CHECK(err[1] < err[0]);
        }
        for (int bits : {4, 3}) {
            compress::QuantSpec spec;
            spec.bits = bits;
            spec.group = 64;
            Tensor w_rtn = w.clone(), w_gptq = w.clone();
            compress::quantize_rtn(w_rtn, spec);
            compress::quantize_gptq(w_gptq, *stats, spec);
            const double e_rtn = rel_error(*x, w, w_rtn), e_gptq = rel_error(*x, w, w_gptq);
            INFO(lin->weight.name() << " int" << bits << ": rtn " << e_rtn << ", gptq " << e_gptq);
            CHECK(e_gptq < e_rtn);
        }
    }
}

TEST_CASE("compress: a recipe chosen by the Compression slot's type", "[compress]") {
    using Pruned = nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::Prune<compress::SparseGPT, compress::NM<2, 4>>>;
    using Quantized = nn::Transformer<nn::Llama, nn::DenseFFN<>,
                                      compress::PruneThenQuantize<compress::Prune<compress::Wanda, compress::Unstructured<500>>,
                                                                  compress::Quantize<compress::GPTQ<3, 32>>>>;
    const Tensor calib = random_ids({4, 32}, 31, 64);
    Pruned pruned(tiny(), 2);
    for (const auto& l : compress::compress(pruned, calib).layers) CHECK(l.format == "nm2:4");
    Quantized quantized(tiny(), 2);
    const auto report = compress::compress(quantized, calib);
    CHECK(report.recipe.describe() == "wanda 50% + gptq int3 g32");
    for (const auto& l : report.layers) {
        CHECK(l.format == "int3");
        CHECK(l.sparsity >= 0.5);  // the pruned zeros survive quantisation exactly
    }
    CHECK(compress::Prune<compress::Magnitude, compress::Unstructured<625>>::recipe()->sparsity.ratio == 0.625);
}
