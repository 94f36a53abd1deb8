// eval::corpus_perplexity: a model with uniform logits has perplexity equal to the vocabulary size
// (overall and in every domain); a trained model's per-domain sums add up to the overall result.
#include <catch2/catch.hpp>

#include "test_util.hpp"

using namespace mopt;

namespace {

data::Corpus two_domains() {
    data::Corpus c;
    c.docs = {{"the cat sat on the mat and looked at the dog", "animals", "a0"},
              {"a dog ran after the cat around the garden twice", "animals", "a1"},
              {"prices rose sharply as the market opened today", "markets", "m0"},
              {"shares fell when the bank raised its rates again", "markets", "m1"}};
    c.domains = {"animals", "markets"};
    return c;
}
}  // namespace

TEST_CASE("corpus_perplexity of uniform logits is the vocabulary size", "[perplexity][corpus]") {
    nn::ModelConfig c{.vocab_size = 259, .d_model = 16, .n_layers = 1, .n_heads = 2, .d_ff = 24, .max_seq = 16};
    nn::Transformer<nn::Llama> model(c, 3);
    // A zero output head makes every logit 0: p = 1/V for every token.
    model.visit_parameters([](autodiff::Parameter& p) {
        if (p.name() == "lm_head.weight") p.value().fill(0.0f);
    });
    data::Batches batches(two_domains(), test::ByteTokenizer{.symbols = 256}, {.batch_size = 3, .seq_len = 16, .seed = 0, .pad_tail = true});
    const eval::CorpusPerplexity p = eval::corpus_perplexity(model, batches);
    CHECK(p.ppl() == Approx(259.0).epsilon(1e-5));
    REQUIRE(p.domains.size() == 2);
    std::int64_t text_tokens = 0;
    for (const auto& d : two_domains().docs) text_tokens += static_cast<std::int64_t>(d.text.size()) + 1;  // + EOS
    CHECK(p.tokens == text_tokens);
    for (const auto& d : p.domains) CHECK(d.ppl() == Approx(259.0).epsilon(1e-5));
}

TEST_CASE("corpus_perplexity per-domain sums add up and match the model's loss", "[perplexity][corpus]") {
    nn::ModelConfig c{.vocab_size = 259, .d_model = 16, .n_layers = 2, .n_heads = 2, .d_ff = 24, .max_seq = 12};
    nn::Transformer<nn::Llama> model(c, 4);
    data::Batches batches(two_domains(), test::ByteTokenizer{.symbols = 256}, {.batch_size = 2, .seq_len = 12, .seed = 5});
    const eval::CorpusPerplexity p = eval::corpus_perplexity(model, batches);
    double nll = 0.0;
    std::int64_t tokens = 0;
    for (const auto& d : p.domains) {
        nll += d.nll;
        tokens += d.tokens;
    }
    CHECK(nll == Approx(p.nll).epsilon(1e-12));
    CHECK(tokens == p.tokens);
    CHECK(tokens == batches.num_windows() * 12);  // no padding: every position predicts
    // The same sum from the model's own mean cross-entropy, batch by batch.
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    data::Batch b;
    double from_loss = 0.0;
    batches.start_epoch(0);
    while (batches.next(b)) {
        tape.reset();
        from_loss += model.forward(tape, b.ids, {.targets = &b.targets}).loss.item() * static_cast<double>(b.ids.numel());
    }
    CHECK(from_loss == Approx(p.nll).epsilon(1e-5));
}
