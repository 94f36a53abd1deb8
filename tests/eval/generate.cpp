#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>
#include <mopt/eval/generate.hpp>
#include <mopt/io/llama2c_import.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;

namespace {

using Llama = nn::Transformer<nn::Llama>;

// A small random Llama whose logits are not flat (weights larger than the default init), so
// greedy and sampled paths are not decided by rounding.
Llama small_model(std::int64_t max_seq = 64) {
    nn::ModelConfig c{.vocab_size = 37, .d_model = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .d_ff = 48,
                      .max_seq = max_seq};
    Llama m(c, 11);
    test::randomize_matrices(m, 100, 0.4f);
    return m;
}

// Greedy decoding without a cache: the whole sequence is run again for every new token.
std::vector<std::int32_t> greedy_recompute(Llama& model, std::vector<std::int32_t> seq, std::int64_t steps) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const std::size_t prompt = seq.size();
    for (std::int64_t s = 0; s < steps; ++s) {
        tape.reset();
        const Tensor ids = Tensor::from({1, static_cast<std::int64_t>(seq.size())}, std::span<const std::int32_t>(seq));
        const Tensor& logits = model.forward(tape, ids).logits.value();
        const std::int64_t V = logits.dim(2);
        const float* last = logits.f32() + (static_cast<std::int64_t>(seq.size()) - 1) * V;
        seq.push_back(static_cast<std::int32_t>(std::max_element(last, last + V) - last));
    }
    return {seq.begin() + static_cast<std::ptrdiff_t>(prompt), seq.end()};
}

}  // namespace

TEST_CASE("generate: greedy with the KV cache equals greedy recomputing the sequence", "[generate]") {
    Llama model = small_model();
    const std::vector<std::int32_t> prompt = {1, 7, 30, 4, 4, 19};
    const eval::GenerateOptions opt{.steps = 40, .temperature = 0.0f, .stop_at_eos = false};
    const auto cached = eval::generate(model, prompt, opt);
    REQUIRE(cached.size() == 40);
    CHECK(cached == greedy_recompute(model, prompt, 40));
    // Not a constant sequence (the check above would be weak on one).
    CHECK(std::set<std::int32_t>(cached.begin(), cached.end()).size() > 3);

    if (!test::have_files({test::stories260k(), test::tok512()}, "skipped the stories260K half")) return;
    Llama stories = io::import_llama2c<Llama>(test::stories260k());
    const auto tok = data::Llama2cTokenizer::load(test::tok512(), 512);
    const auto p = tok.encode("Once upon a time, there was a little dog");
    const eval::GenerateOptions g{.steps = 50, .temperature = 0.0f, .stop_at_eos = false};
    CHECK(eval::generate(stories, p, g) == greedy_recompute(stories, p, 50));
}

TEST_CASE("generate: a soft-prompted model decodes past its prompt's positions", "[generate]") {
    // The cache holds the prompt's K positions too: K + P + steps − 1 of them (a cache sized for the
    // text alone overflows on the first forward).
    using Prompted = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::None, prompt::SoftPrompt>;
    nn::ModelConfig c{.vocab_size = 37, .d_model = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .d_ff = 48,
                      .max_seq = 16};
    Prompted model(c, 11);
    test::randomize_matrices(model, 100, 0.4f);
    model.init_prompt({.length = 4, .init = prompt::PromptInit::uniform, .seed = 3});
    const std::vector<std::int32_t> text = {1, 7, 30};
    const auto out = eval::generate(model, text, {.steps = 10, .temperature = 0.0f, .stop_at_eos = false});
    REQUIRE(out.size() == 10);  // 4 + 3 + 9 = 16 positions: exactly the context
    // greedy without the cache, the prompt entering every full forward
    std::vector<std::int32_t> seq = text;
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    for (int s = 0; s < 10; ++s) {
        tape.reset();
        const Tensor ids = Tensor::from({1, static_cast<std::int64_t>(seq.size())}, std::span<const std::int32_t>(seq));
        const Tensor& logits = model.forward(tape, ids).logits.value();
        const float* last = logits.f32() + (logits.dim(1) - 1) * logits.dim(2);
        seq.push_back(static_cast<std::int32_t>(std::max_element(last, last + logits.dim(2)) - last));
    }
    CHECK(out == std::vector<std::int32_t>(seq.begin() + 3, seq.end()));
    CHECK_THROWS_WITH(eval::generate(model, text, {.steps = 11, .temperature = 0.0f}),
                      Catch::Contains("4 prompt positions") && Catch::Contains("generate at most 10 tokens"));
}

TEST_CASE("generate: the seed decides the sampled text", "[generate]") {
    Llama model = small_model();
    const std::vector<std::int32_t> prompt = {1, 3};
    const eval::GenerateOptions a{.steps = 50, .temperature = 1.0f, .seed = 5, .stop_at_eos = false};
    eval::GenerateOptions b = a;
    b.seed = 6;
    const auto first = eval::generate(model, prompt, a);
    CHECK(first.size() == 50);
    CHECK(eval::generate(model, prompt, a) == first);
    CHECK(eval::generate(model, prompt, b) != first);  // equal with probability far below 1e-10
    // Sampling is not greedy decoding in disguise.
    CHECK(first != eval::generate(model, prompt, {.steps = 50, .temperature = 0.0f, .stop_at_eos = false}));
}

TEST_CASE("generate: a tiny top_p is greedy decoding", "[generate]") {
    Llama model = small_model();
    const std::vector<std::int32_t> prompt = {1, 20, 21};
    const auto greedy = eval::generate(model, prompt, {.steps = 30, .temperature = 0.0f, .stop_at_eos = false});
    for (std::uint64_t seed : {1u, 2u, 3u})
        CHECK(eval::generate(model, prompt,
                             {.steps = 30, .temperature = 1.5f, .top_p = 1e-6f, .seed = seed, .stop_at_eos = false}) ==
              greedy);
}

TEST_CASE("generate: nucleus sampling draws only from the top-p set, in proportion", "[generate]") {
    // Probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs, temperature 1).
    const std::vector<float> logits = {std::log(0.3f), std::log(0.05f), std::log(0.5f), std::log(0.15f)};
    std::mt19937_64 rng(42);
    std::vector<double> prob;
    std::vector<std::int32_t> order;
    const int n = 20000;
    std::vector<int> count(4, 0);
    // top_p 0.7: the smallest prefix reaching 0.7 is {2 (0.5), 0 (0.3)}, renormalised to 0.625 / 0.375.
    for (int i = 0; i < n; ++i)
        ++count[eval::detail::choose_token(logits, {.temperature = 1.0f, .top_p = 0.7f}, rng, prob, order)];
    CHECK(count[1] == 0);
    CHECK(count[3] == 0);
    CHECK(std::abs(count[2] / double(n) - 0.625) < 0.015);  // 4.4 standard deviations
    // top_p 1: the full distribution.
    std::fill(count.begin(), count.end(), 0);
    for (int i = 0; i < n; ++i)
        ++count[eval::detail::choose_token(logits, {.temperature = 1.0f, .top_p = 1.0f}, rng, prob, order)];
    CHECK(std::abs(count[1] / double(n) - 0.05) < 0.008);
    CHECK(std::abs(count[3] / double(n) - 0.15) < 0.012);
    // Temperature 2 flattens: p ∝ sqrt(p0), so token 1 gets sqrt(.05)/Σ sqrt ≈ 0.114.
    double z = 0;
    for (double p : {0.3, 0.05, 0.5, 0.15}) z += std::sqrt(p);
    std::fill(count.begin(), count.end(), 0);
    for (int i = 0; i < n; ++i)
        ++count[eval::detail::choose_token(logits, {.temperature = 2.0f, .top_p = 1.0f}, rng, prob, order)];
    CHECK(std::abs(count[1] / double(n) - std::sqrt(0.05) / z) < 0.012);
}

TEST_CASE("generate: positions beyond max_seq and bad options are clear errors", "[generate]") {
    Llama model = small_model(16);
    const std::vector<std::int32_t> prompt = {1, 2, 3, 4, 5, 6};
    // 6 + 11 - 1 = 16 positions: exactly the context.
    CHECK(eval::generate(model, prompt, {.steps = 11, .temperature = 0.0f, .stop_at_eos = false}).size() == 11);
    REQUIRE_THROWS_WITH(eval::generate(model, prompt, {.steps = 12, .temperature = 0.0f}),
                        Catch::Contains("max_seq = 16") && Catch::Contains("at most 11"));
    REQUIRE_THROWS_WITH(eval::generate(model, std::vector<std::int32_t>{}, {}), Catch::Contains("empty prompt"));
    REQUIRE_THROWS_WITH(eval::generate(model, std::vector<std::int32_t>{1, 37}, {}),
                        Catch::Contains("prompt token 1") && Catch::Contains("37"));
    REQUIRE_THROWS_WITH(eval::generate(model, prompt, {.temperature = -1.0f}), Catch::Contains("temperature"));
    REQUIRE_THROWS_WITH(eval::generate(model, prompt, {.top_p = 0.0f}), Catch::Contains("top_p"));
    REQUIRE_THROWS_WITH(eval::generate(model, prompt, {.top_p = 1.5f}), Catch::Contains("top_p"));
    CHECK(eval::generate(model, prompt, {.steps = 0}).empty());
}

TEST_CASE("generate: stories260K continues \"Once upon a time\" in English", "[generate]") {
    if (!test::have_files({test::stories260k(), test::tok512()})) return;
    Llama model = io::import_llama2c<Llama>(test::stories260k());
    const auto tok = data::Llama2cTokenizer::load(test::tok512(), model.config().vocab_size);
    std::vector<std::int32_t> ids = tok.encode("Once upon a time");
    const auto cont = eval::generate(model, ids, {.steps = 60, .temperature = 0.0f, .stop_at_eos = false});
    REQUIRE(cont.size() == 60);
    ids.insert(ids.end(), cont.begin(), cont.end());
    const std::string text = tok.decode(ids);
    WARN("stories260K, greedy, 60 tokens: " << text);
    REQUIRE(text.rfind("Once upon a time", 0) == 0);
    const std::string continuation = text.substr(16);

    // Words of the continuation against a list of very common English words (and TinyStories'
    // usual names): a real model writes mostly these; random tokens of a 512-piece vocabulary
    // make fragments like "ap", "ind", "ul" that are not on the list.
    static const std::set<std::string> common = {
        "a", "about", "after", "all", "always", "an", "and", "are", "as", "asked", "at", "away", "back", "ball",
        "be", "because", "big", "bird", "but", "by", "came", "can", "cat", "could", "day", "did", "do", "dog",
        "down", "every", "felt", "find", "for", "friend", "friends", "from", "fun", "gave", "get", "girl", "go",
        "good", "got", "had", "happy", "has", "have", "he", "her", "him", "his", "home", "how", "i", "in", "into",
        "is", "it", "its", "just", "know", "like", "liked", "little", "look", "looked", "lots", "love", "loved",
        "made", "make", "many", "me", "mom", "mommy", "more", "named", "new", "no", "not", "now", "of", "on",
        "once", "one", "or", "out", "park", "play", "played", "playing", "ran", "red", "said", "sad", "saw", "see",
        "she", "so", "some", "something", "started", "that", "the", "their", "them", "then", "there", "they",
        "thing", "things", "this", "time", "to", "too", "toy", "toys", "tree", "up", "upon", "very", "wanted",
        "was", "we", "went", "were", "what", "when", "where", "who", "wanted", "will", "with", "would", "you",
        "your", "lily", "ben", "tim", "timmy", "sue", "sam", "tom", "anna", "mia", "max", "lucy", "jack", "sara",
        "boy", "man", "sun", "sky", "water", "house", "car", "fish", "garden", "help", "helped", "hug", "each",
        "other", "together", "smiled", "laughed", "other", "two", "best", "wanted", "big", "small", "old", "kind"};
    std::istringstream words(continuation);
    std::string w;
    int total = 0, known = 0;
    while (words >> w) {
        std::string clean;
        for (char ch : w)
            if (std::isalpha(static_cast<unsigned char>(ch))) clean += static_cast<char>(std::tolower(ch));
        if (clean.empty()) continue;
        ++total;
        known += common.count(clean) > 0;
    }
    INFO("continuation: " << continuation << " (" << known << " of " << total << " words are common English)");
    CHECK(total >= 25);  // 60 tokens of a 512-piece vocabulary make whole words, not letters
    CHECK(known >= 0.7 * total);
    CHECK((continuation.find(" the ") != std::string::npos || continuation.find(" a ") != std::string::npos));
}
