// Pre-training end to end at toy scale: a tiny Llama and a tiny Switch model trained with AdamW on
// batches of a tiny two-domain corpus must drive their loss well below the uniform baseline ln V.
#include <catch2/catch.hpp>

#include <cmath>

#include "test_util.hpp"

using namespace mopt;

namespace {

data::Corpus tiny_corpus() {
    data::Corpus c;
    for (int i = 0; i < 6; ++i) {
        c.docs.push_back({"the cat sat on the mat. the cat sat on the mat. ", "cats", "c" + std::to_string(i)});
        c.docs.push_back({"one two three four five six seven eight nine ten. ", "numbers", "n" + std::to_string(i)});
    }
    c.domains = {"cats", "numbers"};
    return c;
}

template <class Model>
std::pair<double, double> train_tiny(nn::ModelConfig c) {
    Model model(c, 7);
    std::vector<autodiff::Parameter*> params;
    model.visit_parameters([&](autodiff::Parameter& p) { params.push_back(&p); });
    train::AdamW opt(params, {.lr = 1e-2f, .weight_decay = 0.0f});
    data::Batches batches(tiny_corpus(), test::ByteTokenizer{.symbols = 128}, {.batch_size = 4, .seq_len = 24, .seed = 3});
    autodiff::Tape tape;
    data::Batch b;
    double first = 0.0, last = 0.0;
    for (int step = 0; step < 60; ++step) {
        tape.reset();
        batches.next_wrapping(b);
        nn::ForwardOutput out = model.forward(tape, b.ids, {.targets = &b.targets});
        const double loss = out.loss.item();
        if (step == 0) first = loss;
        last = loss;
        tape.backward(out.aux_loss.defined() ? autodiff::add(out.loss, out.aux_loss) : out.loss);
        train::clip_grad_norm(params, 1.0);
        opt.step();
    }
    return {first, last};
}
}  // namespace

TEST_CASE("A tiny dense model's loss falls on a tiny corpus", "[train][pretraining]") {
    nn::ModelConfig c{.vocab_size = 131, .d_model = 32, .n_layers = 2, .n_heads = 4, .d_ff = 64, .max_seq = 24};
    const auto [first, last] = train_tiny<nn::Transformer<nn::Llama>>(c);
    INFO("loss " << first << " -> " << last);
    CHECK(first == Approx(std::log(131.0)).epsilon(0.05));  // starts near uniform
    CHECK(last < 0.4 * first);
}

TEST_CASE("A tiny Switch model's loss falls on a tiny corpus", "[train][pretraining]") {
    nn::ModelConfig c{.vocab_size = 131, .d_model = 32, .n_layers = 2, .n_heads = 4, .d_ff = 32, .max_seq = 24,
                      .num_experts = 4, .capacity_factor = 1.5f};
    const auto [first, last] = train_tiny<nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer>>>(c);
    INFO("loss " << first << " -> " << last);
    CHECK(last < 0.4 * first);
}
