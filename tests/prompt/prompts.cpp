// Tests of the prompt policies on tiny frozen models: PEFT's position convention (a soft prompt
// equals the same vectors fed as tokens), identities between the policies (injected at layer 0 =
// soft; one-expert mixture = injected), finite-difference gradients of the loss w.r.t. every
// prompt and gate parameter, the gate op, the backward pass stopping at L_int, KV-cache decoding
// with each policy, the gate's normalisation and top-k, learning a pattern, config errors, and the
// per-domain gate analysis (eval/gate_analysis.hpp).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <span>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using mopt::nn::ForwardOptions;
using mopt::nn::ModelConfig;
using mopt::nn::Transformer;
using mopt::prompt::PromptConfig;
using mopt::prompt::PromptInit;
using namespace mopt::test;

namespace nn = mopt::nn;
namespace prompt = mopt::prompt;
namespace ad = mopt::autodiff;

namespace {

template <class P>
using Llama = Transformer<nn::Llama, nn::Llama::FFN, mopt::compress::None, P>;
template <class P>
using Gpt = Transformer<nn::GPT, nn::GPT::FFN, mopt::compress::None, P>;

ModelConfig tiny_config(std::int64_t layers = 2) {
    ModelConfig c;
    c.vocab_size = 11;
    c.d_model = 8;
    c.n_layers = layers;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.d_ff = 12;
    c.max_seq = 24;
    c.rope_theta = 100.0f;
    return c;
}

// A frozen model with weights large enough that attention and positions matter.
template <class M>
M frozen_model(std::int64_t layers = 2, std::uint64_t seed = 3) {
    M m(tiny_config(layers), seed);
    randomize_matrices(m, seed + 100, 0.5f);
    m.set_trainable(false);
    return m;
}

PromptConfig config(std::int64_t K, std::int64_t inject = 0, std::int64_t experts = 1, std::int64_t input = 0) {
    PromptConfig c;
    c.length = K;
    c.inject_layer = inject;
    c.experts = experts;
    c.input_prompt = input;
    c.gate_dim = 5;
    c.init = PromptInit::uniform;
    c.seed = 11;
    return c;
}

Tensor logits_of(auto& model, const Tensor& ids) {
    NoGrad no_grad;
    Tape tape;
    return model.forward(tape, ids).logits.value().clone();
}

double max_diff(const Tensor& a, const Tensor& b) {
    REQUIRE(a.shape() == b.shape());
    double m = 0.0;
    for (std::int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(double(a.at(i)) - double(b.at(i))));
    return m;
}

// Rows ids of the embedding table [vocab, d] -> [K, d]
Tensor embedding_rows(const Tensor& table, const std::vector<std::int32_t>& ids) {
    const std::int64_t d = table.dim(1);
    Tensor out = Tensor::empty({static_cast<std::int64_t>(ids.size()), d});
    for (std::size_t k = 0; k < ids.size(); ++k)
        for (std::int64_t j = 0; j < d; ++j) out.at(static_cast<std::int64_t>(k) * d + j) = table.at(ids[k] * d + j);
    return out;
}

Tensor concat_ids(const std::vector<std::int32_t>& front, const Tensor& ids) {
    const std::int64_t B = ids.dim(0), T = ids.dim(1), K = static_cast<std::int64_t>(front.size());
    Tensor out = Tensor::empty({B, K + T}, DType::i32);
    for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t k = 0; k < K; ++k) out.data<std::int32_t>()[b * (K + T) + k] = front[static_cast<std::size_t>(k)];
        for (std::int64_t t = 0; t < T; ++t)
            out.data<std::int32_t>()[b * (K + T) + K + t] = ids.data<std::int32_t>()[b * T + t];
    }
    return out;
}

template <class M>
Parameter& model_parameter(M& model, const std::string& name) {
    Parameter* found = nullptr;
    model.visit_parameters([&](Parameter& p) {
        if (p.name() == name) found = &p;
    });
    REQUIRE(found != nullptr);
    return *found;
}

// Finite differences of the model's text loss against the gradients backward() leaves in the
// prompt layer's trainable parameters.
template <class M>
FdResult prompt_fd(M& model, const Tensor& ids) {
    const Tensor targets = nn::next_token_targets(ids);
    std::vector<Parameter*> params;
    model.prompt().visit([&](Parameter& p) {
        if (p.trainable()) params.push_back(&p);
    });
    for (Parameter* p : params) p->zero_grad();
    {
        Tape tape;
        tape.backward(model.forward(tape, ids, {.targets = &targets}).loss);
    }
    std::vector<FdTarget> fd;
    std::mt19937_64 rng(5);
    for (Parameter* p : params) {
        FdTarget& t = fd.emplace_back(p->name(), p->value(), p->grad().clone());
        std::uniform_int_distribution<std::int64_t> pick(0, p->numel() - 1);
        for (int j = 0; j < 16; ++j) t.coords.push_back(pick(rng));
    }
    return check_parameter_gradients(fd, [&] {
        Tape tape;
        return double(model.forward(tape, ids, {.targets = &targets}).loss.item());
    }, {.eps = 1e-2f, .atol = 2e-3, .rtol = 3e-2});
}

// Greedy-free decode check: logits of the last position from a cached token-by-token run equal
// those of one full forward.
template <class M>
void check_decode_matches(M& model, const Tensor& ids) {
    const Tensor full = logits_of(model, ids);
    const std::int64_t B = ids.dim(0), T = ids.dim(1), V = full.dim(2);
    NoGrad no_grad;
    nn::KVCache cache(model.config(), B);
    for (int run = 0; run < 2; ++run) {  // twice: a second generation reuses the cleared cache
        cache.clear();
        for (std::int64_t t = 0; t < T; ++t) {
            Tensor step = Tensor::empty({B, 1}, DType::i32);
            for (std::int64_t b = 0; b < B; ++b) step.data<std::int32_t>()[b] = ids.data<std::int32_t>()[b * T + t];
            Tape tape;
            const Tensor& l = model.forward(tape, step, {.cache = &cache}).logits.value();
            for (std::int64_t b = 0; b < B; ++b)
                for (std::int64_t v = 0; v < V; ++v)
                    REQUIRE(l.at(b * V + v) == Approx(full.at((b * T + t) * V + v)).margin(1e-4));
        }
        CHECK(cache.length() == model.prompt_positions() + T);
    }
}

}  // namespace

TEST_CASE("scale_row_groups: forward and finite-difference gradients w.r.t. x and g", "[prompt]") {
    const Tensor x = random_tensor({2, 7, 3}, 1), g = random_tensor({2, 3}, 2, 0.1f, 1.0f);
    {
        Tape tape;
        const Tensor& y = prompt::scale_row_groups(tape.constant(x), tape.constant(g), 2).value();
        for (std::int64_t b = 0; b < 2; ++b)
            for (std::int64_t r = 0; r < 7; ++r)
                for (std::int64_t j = 0; j < 3; ++j) {
                    const float s = r < 6 ? g.at(b * 3 + r / 2) : 1.0f;
                    CHECK(y.at((b * 7 + r) * 3 + j) == s * x.at((b * 7 + r) * 3 + j));
                }
    }
    const auto r = ad::gradcheck(
        [](Tape&, std::span<const Var> in) { return prompt::scale_row_groups(in[0], in[1], 2); }, {x, g});
    INFO(r);
    CHECK(r.ok);
    CHECK_THROWS_WITH(([&] {
                          Tape tape;
                          prompt::scale_row_groups(tape.constant(x), tape.constant(g), 3);
                      }()),
                      Catch::Contains("do not fit"));
}

TEST_CASE("SoftPrompt follows PEFT's positions: prompt vectors equal the tokens they copy", "[prompt]") {
    const Tensor ids = random_ids({2, 5}, 4, 11);
    const std::vector<std::int32_t> words{7, 2, 9};
    auto run = [&](auto& model) {
        model.init_prompt(config(3));
        model.prompt().prompt.value().copy_from(
            embedding_rows(model_parameter(model, "model.embed_tokens.weight").value(), words));
        const Tensor got = logits_of(model, ids);
        REQUIRE(got.shape() == Shape{2, 5, 11});
        // Reference: the words as tokens at positions 0..2, the text at 3..7, causal throughout
        // (PEFT's semantics): the plain model run on words + text.
        NoGrad no_grad;
        Tape tape;
        Var x = model.embed(tape, concat_ids(words, ids), 0);
        nn::AttentionContext actx{};
        nn::FeedForwardContext fctx;
        for (std::size_t l = 0; l < model.blocks().size(); ++l) x = model.block(tape, l, x, actx, fctx);
        const Tensor want = model.head(tape, ad::slice_seq(x, 3, 8)).value();
        CHECK(max_diff(got, want) < 1e-5);
        return got;
    };
    SECTION("RoPE") {
        auto model = frozen_model<Llama<prompt::SoftPrompt>>();
        run(model);
    }
    SECTION("learned positions") {
        auto model = frozen_model<Gpt<prompt::SoftPrompt>>();
        run(model);
    }
    SECTION("one layer: the same as feeding the words as tokens") {
        auto model = frozen_model<Llama<prompt::SoftPrompt>>(1);
        const Tensor got = run(model);
        auto plain = Llama<prompt::None>(tiny_config(1), 3);
        randomize_matrices(plain, 103, 0.5f);
        const Tensor all = logits_of(plain, concat_ids(words, ids));
        NoGrad no_grad;
        Tape tape;
        const Tensor want = ad::slice_seq(tape.constant(all), 3, 8).value();
        CHECK(max_diff(got, want) < 1e-5);
    }
}

TEST_CASE("Prompt policies agree where they coincide", "[prompt]") {
    const Tensor ids = random_ids({2, 6}, 5, 11);
    SECTION("InjectedPrompt at layer 0 is the SoftPrompt") {
        auto soft = frozen_model<Llama<prompt::SoftPrompt>>();
        auto injected = frozen_model<Llama<prompt::InjectedPrompt>>();
        soft.init_prompt(config(4));
        injected.init_prompt(config(4));
        CHECK(max_diff(soft.prompt().prompt.value(), injected.prompt().prompt.value()) == 0.0);
        CHECK(max_diff(logits_of(soft, ids), logits_of(injected, ids)) == 0.0);
    }
    SECTION("a one-expert mixture without input prompt is the injected prompt (gate = 1)") {
        auto injected = frozen_model<Gpt<prompt::InjectedPrompt>>(3);
        auto mop = frozen_model<Gpt<prompt::MixtureOfPrompts>>(3);
        injected.init_prompt(config(4, 1));
        mop.init_prompt(config(4, 1));
        Tape tape;
        NoGrad no_grad;
        const auto out = mop.forward(tape, ids);
        REQUIRE(out.gate.shape() == Shape{2, 1});
        CHECK(out.gate.value().at(0) == 1.0f);
        CHECK(max_diff(logits_of(injected, ids), out.logits.value()) < 1e-6);
    }
    SECTION("without init_prompt the model runs alone") {
        auto soft = frozen_model<Llama<prompt::SoftPrompt>>();
        auto plain = frozen_model<Llama<prompt::None>>();
        CHECK(soft.prompt_positions() == 0);
        CHECK(max_diff(logits_of(soft, ids), logits_of(plain, ids)) == 0.0);
    }
}

TEST_CASE("MixtureOfPrompts follows Algorithm 1 of Dun et al. step by step", "[prompt]") {
    // Reference built from the model's pieces: P¹ before the text at layer 0, the gate from the
    // mean of the layer-L_int input over P¹ and text, the expert prompts prepended at L_int and
    // each expert's rows scaled by its gate value at the input of EVERY layer from L_int on.
    auto m = frozen_model<Llama<prompt::MixtureOfPrompts>>(3);
    m.init_prompt(config(4, 1, 2, 2));
    randomize(m.prompt().gate, 4, 1.0f);
    auto& mop = m.prompt();
    const Tensor ids = random_ids({2, 5}, 13, 11);
    NoGrad no_grad;
    Tape tape;
    const auto out = m.forward(tape, ids);

    auto rows = [&](Parameter& p) {  // [K, d] -> [B, K, d]
        Tensor t = Tensor::empty({2, p.shape()[0], 8});
        for (std::int64_t b = 0; b < 2; ++b) std::copy_n(p.value().f32(), p.numel(), t.f32() + b * p.numel());
        return tape.constant(t);
    };
    Var x = m.embed(tape, ids, 6);  // text at positions 6..10 (4 expert prompts + 2 input prompts)
    x = ad::concat_seq(rows(mop.input_prompt), x);
    nn::AttentionContext actx{.start_pos = 4};
    nn::FeedForwardContext fctx;
    x = m.block(tape, 0, x, actx, fctx);
    const Var avg = ad::mean_seq(x);
    const Var logits = ad::linear(ad::relu(ad::linear(avg, tape.constant(mop.gate.w1.value()))),
                                  tape.constant(mop.gate.w2.value()));
    const Var g = ad::softmax(logits);
    x = ad::concat_seq(rows(mop.prompt), x);
    actx.start_pos = 0;
    for (std::size_t l = 1; l < 3; ++l) x = m.block(tape, l, prompt::scale_row_groups(x, g, 2), actx, fctx);
    const Tensor want = m.head(tape, ad::slice_seq(x, 6, 11)).value();
    CHECK(max_diff(out.gate_logits.value(), logits.value()) < 1e-6);
    CHECK(max_diff(out.gate.value(), g.value()) < 1e-6);
    CHECK(max_diff(out.logits.value(), want) < 1e-5);
    // Scaling only at L_int (not at every later layer) would differ.
    CHECK(std::abs(g.value().at(0) - 0.5f) > 0.05f);
}

TEST_CASE("Prompt parameters are the prompt layer's; the model stays frozen", "[prompt]") {
    auto mop = frozen_model<Llama<prompt::MixtureOfPrompts>>(3);
    mop.init_prompt(config(6, 1, 3, 2));
    std::vector<std::string> names;
    std::vector<bool> trainable;
    mop.prompt().visit([&](Parameter& p) {
        names.push_back(p.name());
        trainable.push_back(p.trainable());
    });
    CHECK(names == std::vector<std::string>{"prompt_embeddings", "input_prompt", "gate.w1", "gate.w2"});
    CHECK(trainable == std::vector<bool>{true, false, true, true});
    CHECK(mop.prompt().prompt.shape() == Shape{6, 8});
    CHECK(mop.prompt().gate.w1.shape() == Shape{5, 8});
    CHECK(mop.prompt().gate.w2.shape() == Shape{3, 5});
    bool any_prompt = false;
    mop.visit_parameters([&](Parameter& p) { any_prompt = any_prompt || p.name().find("prompt") != std::string::npos; });
    CHECK_FALSE(any_prompt);
    CHECK(mop.prompt_positions() == 8);
}

TEST_CASE("Finite-difference gradients of the text loss w.r.t. prompts and gate", "[prompt]") {
    const Tensor ids = random_ids({2, 5}, 6, 11);
    SECTION("SoftPrompt, RoPE") {
        auto m = frozen_model<Llama<prompt::SoftPrompt>>();
        m.init_prompt(config(3));
        const FdResult r = prompt_fd(m, ids);
        INFO(describe(r));
        CHECK(r.ok);
        CHECK(r.max_checked_grad > 1e-3);
    }
    SECTION("SoftPrompt, learned positions") {
        auto m = frozen_model<Gpt<prompt::SoftPrompt>>();
        m.init_prompt(config(3));
        const FdResult r = prompt_fd(m, ids);
        INFO(describe(r));
        CHECK(r.ok);
    }
    SECTION("InjectedPrompt at layer 1") {
        auto m = frozen_model<Llama<prompt::InjectedPrompt>>(3);
        m.init_prompt(config(3, 1));
        const FdResult r = prompt_fd(m, ids);
        INFO(describe(r));
        CHECK(r.ok);
        CHECK(r.max_checked_grad > 1e-3);
    }
    SECTION("MixtureOfPrompts: prompts, W1 and W2, with a frozen input prompt") {
        for (std::int64_t inject : {0, 1}) {
            auto m = frozen_model<Llama<prompt::MixtureOfPrompts>>(3);
            PromptConfig c = config(6, inject, 3, 2);
            m.init_prompt(c);
            randomize(m.prompt().gate, 9, 1.0f);  // gate values far from uniform
            const FdResult r = prompt_fd(m, ids);
            INFO("inject_layer " << inject << ": " << describe(r));
            CHECK(r.ok);
            REQUIRE(r.max_grad.size() == 3);  // prompt_embeddings, gate.w1, gate.w2 (input prompt frozen)
            for (double g : r.max_grad) CHECK(g > 1e-4);
        }
    }
}

TEST_CASE("The backward pass visits no node below the injection layer", "[prompt]") {
    using M = Llama<prompt::InjectedPrompt>;
    const Tensor ids = random_ids({2, 6}, 7, 11);
    const Tensor targets = nn::next_token_targets(ids);
    std::vector<std::size_t> visits;
    for (std::int64_t inject = 0; inject < 3; ++inject) {
        auto m = frozen_model<M>(3);
        m.init_prompt(config(3, inject));
        // Nodes the model records below the injection point: the embedding and blocks < L_int.
        std::size_t below = 0;
        {
            Tape tape;
            Var x = m.embed(tape, ids, 3);
            nn::AttentionContext actx{.start_pos = 3};
            nn::FeedForwardContext fctx;
            for (std::int64_t l = 0; l < inject; ++l) x = m.block(tape, static_cast<std::size_t>(l), x, actx, fctx);
            below = tape.size();
        }
        Tape tape;
        tape.backward(m.forward(tape, ids, {.targets = &targets}).loss);
        visits.push_back(tape.last_backward_visits());
        // No node recorded before the prompt entered needs or got a gradient.
        std::size_t first = tape.size();
        for (std::size_t i = 0; i < tape.size(); ++i)
            if (tape.node(static_cast<std::int32_t>(i)).requires_grad) {
                first = i;
                break;
            }
        INFO("inject_layer " << inject);
        CHECK(first >= below);
        CHECK(std::string(tape.node(static_cast<std::int32_t>(first)).op) == "parameter");
        for (std::size_t i = 0; i < first; ++i) CHECK_FALSE(tape.node(static_cast<std::int32_t>(i)).grad.defined());
        CHECK(m.prompt().prompt.grad().defined());
    }
    CHECK(visits[0] > visits[1]);
    CHECK(visits[1] > visits[2]);
    // Each skipped block saves the same backward work.
    CHECK(visits[0] - visits[1] == visits[1] - visits[2]);
}

TEST_CASE("KV-cache decoding with a prompt matches one full forward", "[prompt]") {
    const Tensor ids = random_ids({2, 6}, 8, 11);
    SECTION("SoftPrompt") {
        auto m = frozen_model<Gpt<prompt::SoftPrompt>>();
        m.init_prompt(config(3));
        check_decode_matches(m, ids);
    }
    SECTION("InjectedPrompt at layer 2") {
        auto m = frozen_model<Llama<prompt::InjectedPrompt>>(3);
        m.init_prompt(config(3, 2));
        check_decode_matches(m, ids);
    }
    SECTION("MixtureOfPrompts with an input prompt at layer 1") {
        auto m = frozen_model<Llama<prompt::MixtureOfPrompts>>(3);
        m.init_prompt(config(4, 1, 2, 2));
        // The gate is computed once, on the first call (from the first token when decoding one at
        // a time), so a full forward agrees only when the gate does not depend on the text:
        // W2 = 0 gives g = 1/E, still scaling the expert rows at every layer from L_int on.
        m.prompt().gate.w2.value().zero();
        check_decode_matches(m, ids);
    }
}

TEST_CASE("MixtureOfPrompts gate: probabilities sum to 1, top-k at evaluation keeps k", "[prompt]") {
    auto m = frozen_model<Llama<prompt::MixtureOfPrompts>>(3);
    m.init_prompt(config(8, 1, 4, 0));
    randomize(m.prompt().gate, 3, 1.0f);
    const Tensor ids = random_ids({3, 5}, 10, 11);
    Tensor dense;
    {
        Tape tape;
        const auto out = m.forward(tape, ids);
        REQUIRE(out.gate.shape() == Shape{3, 4});
        REQUIRE(out.gate_logits.shape() == Shape{3, 4});
        CHECK(out.gate.requires_grad());
        dense = out.gate.value().clone();
        for (std::int64_t b = 0; b < 3; ++b) {
            double s = 0.0, z = 0.0;
            for (std::int64_t e = 0; e < 4; ++e) {
                s += dense.at(b * 4 + e);
                z += std::exp(double(out.gate_logits.value().at(b * 4 + e)));
                CHECK(dense.at(b * 4 + e) > 0.0f);
            }
            CHECK(s == Approx(1.0).margin(1e-6));
            CHECK(dense.at(b * 4) == Approx(std::exp(double(out.gate_logits.value().at(b * 4))) / z).epsilon(1e-5));
        }
    }
    m.prompt().set_top_k(2);
    NoGrad no_grad;
    Tape tape;
    const Tensor& g = m.forward(tape, ids).gate.value();
    for (std::int64_t b = 0; b < 3; ++b) {
        int nonzero = 0;
        double s = 0.0, kept = 0.0;
        std::vector<float> row(dense.f32() + b * 4, dense.f32() + b * 4 + 4);
        std::sort(row.begin(), row.end(), std::greater<>());
        kept = row[0] + row[1];
        for (std::int64_t e = 0; e < 4; ++e) {
            const float v = g.at(b * 4 + e);
            s += v;
            if (v > 0.0f) {
                ++nonzero;
                CHECK(v == Approx(dense.at(b * 4 + e) / kept).epsilon(1e-5));
                CHECK(dense.at(b * 4 + e) >= row[1]);
            }
        }
        CHECK(nonzero == 2);
        CHECK(s == Approx(1.0).margin(1e-6));
    }
}

TEST_CASE("A soft prompt teaches a frozen model a pattern it cannot produce alone", "[prompt]") {
    // Task: every next token is 5. The frozen random model spreads its predictions; only the
    // prompt (attended by every text position) can move them.
    auto m = frozen_model<Llama<prompt::SoftPrompt>>(2, 5);
    auto plain = frozen_model<Llama<prompt::None>>(2, 5);
    PromptConfig c = config(4);
    c.init = PromptInit::vocab;
    m.init_prompt(c);
    const Tensor ids = random_ids({4, 8}, 12, 11);
    Tensor targets = Tensor::empty({4, 8}, DType::i32);
    for (auto& t : targets.span<std::int32_t>()) t = 5;
    float alone = 0.0f;
    {
        Tape tape;
        alone = plain.forward(tape, ids, {.targets = &targets}).loss.item();
    }
    std::vector<Parameter*> params;
    m.prompt().visit([&](Parameter& p) { params.push_back(&p); });
    mopt::train::AdamW opt(params, {.lr = 0.1f, .weight_decay = 0.0f});
    Tape tape;
    float first = 0.0f, last = 0.0f;
    for (int step = 0; step < 60; ++step) {
        tape.reset();
        Var loss = m.forward(tape, ids, {.targets = &targets}).loss;
        if (step == 0) first = loss.item();
        last = loss.item();
        tape.backward(loss);
        opt.step();
    }
    INFO("loss without a prompt " << alone << "; with the prompt " << first << " -> " << last);
    CHECK(alone > 2.0f);
    CHECK(last < 0.55f * first);
    CHECK(last < 0.55f * alone);
    // The model's weights did not move and got no gradient.
    m.visit_parameters([](Parameter& p) { CHECK_FALSE(p.trainable()); });
    CHECK(max_diff(model_parameter(m, "model.layers.0.self_attn.q_proj.weight").value(),
                   model_parameter(plain, "model.layers.0.self_attn.q_proj.weight").value()) == 0.0);
}

TEST_CASE("Prompt initialisation: uniform, vocabulary rows and a text", "[prompt]") {
    auto m = frozen_model<Llama<prompt::SoftPrompt>>();
    const Tensor& table = model_parameter(m, "model.embed_tokens.weight").value();
    PromptConfig c = config(5);
    m.init_prompt(c);
    for (float v : m.prompt().prompt.value().span()) CHECK((v >= -0.5f && v < 0.5f));
    c.init = PromptInit::text;
    c.init_ids = {4, 6};
    m.init_prompt(c);
    CHECK(max_diff(m.prompt().prompt.value(), embedding_rows(table, {4, 6, 4, 6, 4})) == 0.0);
    c.init = PromptInit::vocab;
    c.frequent_ids = {9, 3, 1};
    m.init_prompt(c);
    const Tensor& p = m.prompt().prompt.value();
    std::vector<std::int32_t> seen;
    for (std::int64_t r = 0; r < 5; ++r) {
        std::int32_t match = -1;
        for (std::int32_t id : {9, 3, 1})
            if (std::equal(p.f32() + r * 8, p.f32() + r * 8 + 8, table.f32() + id * 8)) match = id;
        CHECK(match >= 0);
        seen.push_back(match);
    }
    std::sort(seen.begin(), seen.begin() + 3);
    CHECK(std::vector<std::int32_t>(seen.begin(), seen.begin() + 3) == std::vector<std::int32_t>{1, 3, 9});
    c.init_ids = {};
    c.init = PromptInit::text;
    CHECK_THROWS_WITH(m.init_prompt(c), Catch::Contains("init_ids"));
    c.init_ids = {42};
    CHECK_THROWS_WITH(m.init_prompt(c), Catch::Contains("token id 42"));
}

TEST_CASE("Prompt config errors name the problem", "[prompt]") {
    auto soft = frozen_model<Llama<prompt::SoftPrompt>>();
    auto injected = frozen_model<Llama<prompt::InjectedPrompt>>();
    auto mop = frozen_model<Llama<prompt::MixtureOfPrompts>>();
    CHECK_THROWS_WITH(soft.init_prompt(config(4, 1)), Catch::Contains("SoftPrompt") && Catch::Contains("inject_layer"));
    CHECK_THROWS_WITH(injected.init_prompt(config(4, 2)), Catch::Contains("inject_layer L_int = 2"));
    CHECK_THROWS_WITH(mop.init_prompt(config(5, 0, 2)), Catch::Contains("not divisible by experts E = 2"));
    CHECK_THROWS_WITH(mop.init_prompt(config(0)), Catch::Contains("prompt length K must be >= 1"));
    CHECK_THROWS_WITH(injected.init_prompt(config(4, 0, 2)), Catch::Contains("MixtureOfPrompts"));
    PromptConfig c = config(4, 0, 2);
    c.top_k = 3;
    CHECK_THROWS_WITH(mop.init_prompt(c), Catch::Contains("top_k = 3"));
    mop.init_prompt(config(4, 0, 2));
    CHECK_THROWS_WITH(mop.prompt().set_input_prompt(Tensor::zeros({1, 8})), Catch::Contains("no input prompt"));
    mop.init_prompt(config(4, 0, 2, 2));
    CHECK_THROWS_WITH(mop.prompt().set_input_prompt(Tensor::zeros({3, 8})), Catch::Contains("input_prompt"));
    mop.prompt().set_input_prompt(Tensor::full({2, 8}, 0.25f));
    CHECK(mop.prompt().input_prompt.value().at(5) == 0.25f);
    // The context must hold the prompt and the text.
    soft.init_prompt(config(10));
    NoGrad no_grad;
    Tape tape;
    CHECK_THROWS_WITH(soft.forward(tape, random_ids({1, 20}, 1, 11)),
                      Catch::Contains("10 prompt + 20 text") && Catch::Contains("max_seq = 24"));
}

TEST_CASE("Gate analysis: mean gate weight per domain as CSV and heatmap", "[prompt]") {
    mopt::eval::GateByDomain gates({"news", "fiction, romance", "humor"}, 2);
    const std::vector<float> g1{0.9f, 0.1f, 0.2f, 0.8f, 0.7f, 0.3f};
    const std::vector<std::int64_t> d1{0, 1, 0};
    gates.add(Tensor::from({3, 2}, std::span<const float>(g1)), d1);
    const std::vector<float> g2{0.4f, 0.6f};
    const std::vector<std::int64_t> d2{1};
    gates.add(Tensor::from({1, 2}, std::span<const float>(g2)), d2);
    const auto m = gates.mean();
    CHECK(m[0][0] == Approx(0.8));
    CHECK(m[0][1] == Approx(0.2));
    CHECK(m[1][0] == Approx(0.3));
    CHECK(m[1][1] == Approx(0.7));
    CHECK(std::isnan(m[2][0]));
    CHECK(gates.examples(0) == 2);
    CHECK(gates.csv() ==
          "domain,examples,expert_0,expert_1\nnews,2,0.8,0.2\n\"fiction, romance\",2,0.3,0.7\nhumor,0,,\n");
    TempDir dir;
    gates.write_csv(dir / "gates.csv");
    gates.write_png(dir / "gates.png");
    std::ifstream png(dir / "gates.png", std::ios::binary);
    std::string sig(8, '\0');
    png.read(sig.data(), 8);
    CHECK(sig == "\x89PNG\r\n\x1a\n");
    CHECK(dir.entries() == 2);
    const auto fig = mopt::eval::render(gates.heatmap());
    CHECK(fig.image.width() == 800);
    CHECK_THROWS_WITH(gates.add(Tensor::from({1, 2}, std::span<const float>(g2)), std::vector<std::int64_t>{3}),
                      Catch::Contains("domain label 3"));
    CHECK_THROWS_WITH(gates.add(Tensor::zeros({1, 3}), d2), Catch::Contains("[batch, 2]"));

    // From a mixture's forward: every example's gate counts once.
    auto model = frozen_model<Llama<prompt::MixtureOfPrompts>>(3);
    model.init_prompt(config(4, 1, 2));
    mopt::eval::GateByDomain from_model({"a", "b"}, 2);
    NoGrad no_grad;
    Tape tape;
    const Tensor& g = model.forward(tape, random_ids({3, 4}, 2, 11)).gate.value();
    from_model.add(g, std::vector<std::int64_t>{1, 1, 0});
    CHECK(from_model.mean()[0][1] == Approx(g.at(2 * 2 + 1)));
    CHECK(from_model.mean()[1][0] == Approx((g.at(0) + g.at(2)) / 2));
}
