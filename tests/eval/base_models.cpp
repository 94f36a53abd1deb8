// The committed base models (models/dense-brown, models/switch-brown): they load into their types,
// fit the size budget, and their test-split perplexity recomputed here matches what training
// recorded (models/*/training_result.json, quoted in docs/models.md) within 0.5%.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "test_util.hpp"

using namespace mopt;

namespace {
const std::filesystem::path source = MOPT_SOURCE_DIR;

template <class Model>
void check_base_model(const std::string& name) {
    const auto dir = source / "models" / name;
    const auto brown = source / "data" / "brown";
    REQUIRE(std::filesystem::exists(dir / "config.json"));
    CHECK(std::filesystem::file_size(dir / "model.safetensors") <= 20u * 1000u * 1000u);
    std::ifstream in(dir / "training_result.json");
    const nlohmann::json recorded = nlohmann::json::parse(in);
    Model model = Model::load(dir);
    CHECK(model.num_parameters() == recorded.at("parameters").get<std::int64_t>());
    if (!std::filesystem::exists(brown)) {
        WARN("skipped the perplexity check: " << brown << " is missing (scripts/fetch_brown downloads it)");
        return;
    }
    const nlohmann::json run = recorded.at("run");
    const data::Corpus corpus = data::read_brown(brown, run.at("domains") == "genres15" ? data::BrownDomains::genres15
                                                                                       : data::BrownDomains::groups7);
    const data::CorpusSplits splits = data::split_corpus(corpus, run.at("split_seed").get<std::uint64_t>());
    const data::Tokenizer tok = data::Tokenizer::load(dir / "tokenizer.model");
    REQUIRE(tok.vocab_size() == model.config().vocab_size);
    data::Batches test(splits.test, tok, {.batch_size = run.at("batch").get<std::int64_t>(),
                                          .seq_len = run.at("seq_len").get<std::int64_t>(), .seed = 0});
    const eval::CorpusPerplexity p = eval::corpus_perplexity(model, test);
    const double expected = recorded.at("test").at("ppl").get<double>();
    INFO(name << ": test ppl " << p.ppl() << ", recorded " << expected);
    CHECK(p.tokens == recorded.at("test").at("tokens").get<std::int64_t>());
    CHECK(std::abs(p.ppl() / expected - 1.0) <= 0.005);
    for (const auto& d : p.domains) {
        const double e = recorded.at("test").at("per_domain").at(d.domain).get<double>();
        CHECK(std::abs(d.ppl() / e - 1.0) <= 0.005);
    }
    // Far below a unigram model's perplexity: the model learned more than word frequencies.
    CHECK(p.ppl() < recorded.at("unigram_val_ppl").get<double>() / 5.0);
}
}  // namespace

TEST_CASE("models/dense-brown reproduces its recorded test perplexity", "[models]") {
    check_base_model<nn::Transformer<nn::Llama>>("dense-brown");
}

TEST_CASE("models/switch-brown reproduces its recorded test perplexity and expert load", "[models]") {
    using Switch = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer>>;
    check_base_model<Switch>("switch-brown");
    // The type must match: loading the Switch checkpoint as a dense model is an error naming the file.
    CHECK_THROWS_WITH(nn::Transformer<nn::Llama>::load(source / "models" / "switch-brown"),
                      Catch::Contains("config.json") && Catch::Contains("SwitchFFN"));
}

TEST_CASE("The base models' tokenizer round-trips the whole Brown corpus", "[models][data]") {
    const auto brown = source / "data" / "brown";
    if (!std::filesystem::exists(brown)) {
        WARN("skipped: " << brown << " is missing (scripts/fetch_brown downloads it)");
        return;
    }
    const data::Corpus corpus = data::read_brown(brown);
    const data::Tokenizer tok = data::Tokenizer::load(source / "models" / "dense-brown" / "tokenizer.model");
    REQUIRE(corpus.docs.size() == 500);
    std::int64_t tokens = 0, unk = 0, mismatched = 0;
    for (const data::Document& d : corpus.docs) {
        const std::vector<std::int32_t> ids = tok.encode(d.text, /*add_bos=*/false);
        tokens += static_cast<std::int64_t>(ids.size());
        unk += std::count(ids.begin(), ids.end(), 0);
        if (tok.decode(ids) != d.text) ++mismatched;
    }
    INFO(tokens << " tokens");
    CHECK(mismatched == 0);
    CHECK(unk == 0);
    CHECK(tokens > 1'000'000);  // ~1.0 M words in a 4096-piece vocabulary
}
