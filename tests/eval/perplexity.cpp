#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>
#include <mopt/eval/perplexity.hpp>
#include <mopt/io/llama2c_import.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;

namespace {

using Llama = nn::Transformer<nn::Llama>;

Llama small_model(std::int64_t max_seq = 64) {
    nn::ModelConfig c{.vocab_size = 29, .d_model = 32, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2, .d_ff = 40,
                      .max_seq = max_seq};
    Llama m(c, 3);
    test::randomize_matrices(m, 200, 0.3f);
    return m;
}

std::vector<std::int32_t> random_text(std::int64_t n, std::int32_t vocab, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<std::int32_t> d(3, vocab - 1);
    std::vector<std::int32_t> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = d(rng);
    return v;
}

// Σ −log p(inputs[t + 1] | inputs[0..t]) for t in [first, T - 1) from one plain forward, in double.
double naive_nll(Llama& model, const std::vector<std::int32_t>& inputs, std::int64_t first = 0) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const auto T = static_cast<std::int64_t>(inputs.size());
    const Tensor ids = Tensor::from({1, T}, std::span<const std::int32_t>(inputs));
    const Tensor& logits = model.forward(tape, ids).logits.value();
    const std::int64_t V = logits.dim(2);
    double nll = 0;
    for (std::int64_t t = first; t + 1 < T; ++t) {
        double z = 0;
        for (std::int64_t j = 0; j < V; ++j) z += std::exp(static_cast<double>(logits.f32()[t * V + j]));
        nll -= std::log(std::exp(static_cast<double>(logits.f32()[t * V + inputs[t + 1]])) / z);
    }
    return nll;
}

std::vector<std::int32_t> with_bos(const std::vector<std::int32_t>& text) {
    std::vector<std::int32_t> s{1};
    s.insert(s.end(), text.begin(), text.end());
    return s;
}

}  // namespace

TEST_CASE("perplexity: one window equals the naive sum over forward logits", "[perplexity]") {
    Llama model = small_model();
    const auto text = random_text(20, 29, 1);
    const auto r = eval::perplexity(model, text);
    CHECK(r.tokens == 20);
    CHECK(r.windows == 1);
    const double nll = naive_nll(model, with_bos(text));
    CHECK(r.nll == Approx(nll).epsilon(1e-6));
    CHECK(r.ppl == Approx(std::exp(nll / 20)).epsilon(1e-6));
    // The model's own cross-entropy loss (mean over the predicted positions) agrees.
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const auto seq = with_bos(text);
    const Tensor ids = Tensor::from({1, 21}, std::span<const std::int32_t>(seq));
    const Tensor targets = nn::next_token_targets(ids);
    const float loss = model.forward(tape, ids, {.targets = &targets}).loss.item();
    CHECK(r.nll / 20 == Approx(loss).epsilon(1e-5));
}

TEST_CASE("perplexity: sliding windows predict every token exactly once", "[perplexity]") {
    Llama model = small_model(64);
    const auto text = random_text(50, 29, 2);
    const auto seq = with_bos(text);
    for (const auto& [context, stride] : std::vector<std::pair<std::int64_t, std::int64_t>>{
             {8, 8}, {8, 3}, {8, 1}, {16, 5}, {50, 7}, {64, 64}, {13, 13}}) {
        INFO("context " << context << ", stride " << stride);
        const auto r = eval::perplexity(model, text, {.context = context, .stride = stride});
        CHECK(r.tokens == 50);
        const std::int64_t expected_windows = 1 + (std::max<std::int64_t>(50 - context, 0) + stride - 1) / stride;
        CHECK(r.windows == expected_windows);
        CHECK(std::isfinite(r.nll));
        CHECK(r.ppl == Approx(std::exp(r.nll / 50)).epsilon(1e-12));
    }

    // stride = context: non-overlapping chunks of inputs [kC, (k+1)C), each from scratch; the last,
    // short one (inputs 48, 49) is filled up to C positions with the history before it.
    const std::int64_t C = 8;
    double chunks = 0;
    for (std::int64_t b = 0; b < 50; b += C) {
        const std::int64_t e = std::min<std::int64_t>(b + C, 50), from = e - C;
        // inputs seq[from, e) and the target after the last one; only targets after b are scored
        chunks += naive_nll(model, std::vector<std::int32_t>(seq.begin() + from, seq.begin() + e + 1), b - from);
    }
    CHECK(eval::perplexity(model, text, {.context = C, .stride = C}).nll == Approx(chunks).epsilon(1e-6));

    // stride 3, context 8: a window predicts its last 3 positions with 5 tokens of history.
    double sliding = naive_nll(model, std::vector<std::int32_t>(seq.begin(), seq.begin() + 9));  // targets 1..8
    for (std::int64_t done = 8; done < 50;) {
        const std::int64_t end = std::min<std::int64_t>(done + 3, 50), begin = end - C;
        sliding += naive_nll(model, std::vector<std::int32_t>(seq.begin() + begin, seq.begin() + end + 1), done - begin);
        done = end;
    }
    CHECK(eval::perplexity(model, text, {.context = C, .stride = 3}).nll == Approx(sliding).epsilon(1e-6));

    // A context that holds the whole text: every stride is the single-window score.
    const double whole = eval::perplexity(model, text, {.context = 64, .stride = 64}).nll;
    CHECK(eval::perplexity(model, text, {.context = 51, .stride = 2}).nll == Approx(whole).epsilon(1e-9));
    CHECK(eval::perplexity(model, text).nll == Approx(whole).epsilon(1e-9));  // context 0 = max_seq
}

TEST_CASE("perplexity: stories260K, more context means lower perplexity", "[perplexity]") {
    if (!test::have_files({test::stories260k(), test::tok512()})) return;
    Llama model = io::import_llama2c<Llama>(test::stories260k());
    const auto tok = data::Llama2cTokenizer::load(test::tok512(), 512);
    const std::string story =
        "Once upon a time, there was a little boy named Tim. Tim liked to play with his red ball in the park. "
        "One day, Tim saw a big dog. The dog was sad because he had no friends. Tim said, \"Do you want to play "
        "with me?\" The dog wagged his tail and said, \"Yes!\" Tim and the dog played with the ball all day. "
        "They ran and jumped and laughed. When the sun went down, Tim had to go home. He said goodbye to the dog. "
        "The dog was happy because now he had a friend. Tim was happy too. The next day, Tim went to the park "
        "again, and the dog was there. They played together every day and were best friends forever.";
    const auto text = tok.encode(story, /*add_bos=*/false);
    const auto n = static_cast<std::int64_t>(text.size());
    REQUIRE(n > 120);
    const auto full = eval::perplexity(model, text);  // one window of up to 512 positions
    const auto s32 = eval::perplexity(model, text, {.context = 32, .stride = 32});
    const auto s8 = eval::perplexity(model, text, {.context = 32, .stride = 8});
    const auto s4 = eval::perplexity(model, text, {.context = 16, .stride = 16});
    WARN("stories260K on a " << n << "-token story: ppl " << full.ppl << " (one window), " << s8.ppl
                             << " (context 32, stride 8), " << s32.ppl << " (context 32, stride 32), " << s4.ppl
                             << " (context 16, stride 16)");
    CHECK(full.tokens == n);
    CHECK(s32.tokens == n);
    CHECK(s8.tokens == n);
    CHECK(full.windows == 1);
    CHECK(s8.windows > s32.windows);
    // Each prediction of stride 8 sees at least as much history as with stride 32: lower perplexity.
    CHECK(s8.ppl < s32.ppl);
    CHECK(full.ppl <= s8.ppl);
    CHECK(s32.ppl < s4.ppl);
    // A trained model on in-domain text: far below the uniform 512.
    CHECK(full.ppl < 20);
    // The same tokens in random order are much less likely.
    auto shuffled = text;
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937_64(9));
    CHECK(eval::perplexity(model, shuffled).ppl > 3 * full.ppl);
}

TEST_CASE("perplexity: empty text and bad options are clear errors", "[perplexity]") {
    Llama model = small_model(32);
    const auto text = random_text(10, 29, 3);
    REQUIRE_THROWS_WITH(eval::perplexity(model, std::vector<std::int32_t>{}), Catch::Contains("empty text"));
    REQUIRE_THROWS_WITH(eval::perplexity(model, text, {.context = 33}),
                        Catch::Contains("context 33") && Catch::Contains("max_seq = 32"));
    REQUIRE_THROWS_WITH(eval::perplexity(model, text, {.context = -1}), Catch::Contains("context -1"));
    REQUIRE_THROWS_WITH(eval::perplexity(model, text, {.context = 8, .stride = 9}),
                        Catch::Contains("stride 9") && Catch::Contains("context = 8"));
    REQUIRE_THROWS_WITH(eval::perplexity(model, text, {.stride = -2}), Catch::Contains("stride -2"));
    REQUIRE_THROWS_WITH(eval::perplexity(model, std::vector<std::int32_t>{4, 29}),
                        Catch::Contains("token 1") && Catch::Contains("29"));
}
