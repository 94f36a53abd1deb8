// Tests of the whole Transformer: finite-difference gradients of the loss of tiny 2-layer models
// (dense Llama, Switch with its auxiliary losses, GPT, tied head), the loss against a naive
// cross-entropy of the logits, next_token_targets, KV-cache decoding against one full forward,
// frozen parameters, tied and untied heads, config validation and the slot concepts.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"

using mopt::nn::ForwardOptions;
using mopt::nn::ModelConfig;
using mopt::nn::Transformer;
using namespace mopt::test;

namespace nn = mopt::nn;

namespace {

using DenseLlama = Transformer<nn::Llama>;
using SwitchLlama = Transformer<nn::Llama, nn::SwitchFFN<nn::Top1>>;
using MixtralLike = Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryOtherLayer>>;
using Gpt = Transformer<nn::GPT>;

ModelConfig tiny_config() {
    ModelConfig c;
    c.vocab_size = 11;
    c.d_model = 8;
    c.n_layers = 2;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.d_ff = 12;
    c.max_seq = 16;
    c.rope_theta = 100.0f;
    return c;
}

ModelConfig tiny_moe_config(std::int64_t k = 1) {
    ModelConfig c = tiny_config();
    c.num_experts = 3;
    c.experts_per_token = k;
    c.aux_loss_coef = 0.1f;
    c.z_loss_coef = 0.01f;
    return c;
}

bool is_norm(const std::string& name) { return name.find("norm") != std::string::npos; }

// Replaces the small default init with values that make every path matter: matrices uniform in
// [-scale, scale), routers in [-1, 1) (clear routing margins), norm weights 1 ± 0.2, biases ± 0.2.
template <class M>
void randomize_model(M& model, std::uint64_t seed, float scale = 0.4f) {
    model.visit_parameters([&](Parameter& p) {
        const bool norm = is_norm(p.name()), bias = p.name().ends_with(".bias");
        const bool router = p.name().find("block_sparse_moe.gate.") != std::string::npos;
        const float s = norm ? 0.2f : router ? 1.0f : scale;
        Tensor r = mopt::test::random_tensor(p.shape(), seed++, -s, s);
        for (std::int64_t i = 0; i < r.numel(); ++i) p.value().at(i) = r.at(i) + (norm && !bias ? 1.0f : 0.0f);
    });
}

template <class M>
Parameter& find(M& model, const std::string& name) {
    Parameter* found = nullptr;
    model.visit_parameters([&](Parameter& p) {
        if (p.name() == name) found = &p;
    });
    if (found == nullptr) FAIL("no parameter " << name);
    return *found;
}

template <class M>
std::vector<std::string> names_of(M& model) {
    std::vector<std::string> names;
    model.visit_parameters([&](Parameter& p) { names.push_back(p.name()); });
    return names;
}

// Columns [begin, end) of ids. ids: i32 [B, T] -> i32 [B, end - begin]
Tensor slice_ids(const Tensor& ids, std::int64_t begin, std::int64_t end) {
    const std::int64_t B = ids.dim(0), T = ids.dim(1);
    Tensor out = Tensor::empty({B, end - begin}, DType::i32);
    for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t t = begin; t < end; ++t)
            out.data<std::int32_t>()[b * (end - begin) + t - begin] = ids.data<std::int32_t>()[b * T + t];
    return out;
}

// Central differences of a scalar loss of the model against the gradients backward() leaves in
// the parameters: `per_param` random coordinates of every parameter, plus coordinates of the
// embedding rows of the tokens in `ids` (other rows get no gradient and would prove nothing).
// probe_no_grad is off for models whose auxiliary losses exist only while training.
template <class M>
FdResult model_fd(M& model, const std::function<Var(Tape&)>& loss_fn, const Tensor& ids, float eps,
                  bool probe_no_grad, int per_param = 2) {
    model.visit_parameters([](Parameter& p) { p.zero_grad(); });
    {
        Tape tape;
        tape.backward(loss_fn(tape));
    }
    std::mt19937_64 rng(17);
    std::vector<mopt::test::FdTarget> targets;
    model.visit_parameters([&](Parameter& p) {
        mopt::test::FdTarget& t = targets.emplace_back(p.name(), p.value(), p.grad().clone());
        std::uniform_int_distribution<std::int64_t> pick(0, p.numel() - 1);
        for (int j = 0; j < per_param; ++j) t.coords.push_back(pick(rng));
        if (p.name() == "model.embed_tokens.weight") {
            const std::int64_t d = p.shape()[1];
            for (std::int64_t k = 0; k < std::min<std::int64_t>(ids.numel(), 4); ++k)
                t.coords.push_back(ids.data<std::int32_t>()[k] * d + (k * 3) % d);
        }
    });
    const mopt::test::FdOptions options{.eps = eps, .probe_no_grad = probe_no_grad, .atol = 2e-3, .rtol = 2e-2};
    return mopt::test::check_parameter_gradients(targets, [&] {
        Tape t;
        return static_cast<double>(loss_fn(t).item());
    }, options);
}

// Mean over the targets that are not -100 of log Σ_v exp(logit_v) − logit_target, in double.
double naive_cross_entropy(const Tensor& logits, const Tensor& targets) {
    const std::int64_t V = logits.shape().back(), rows = targets.numel();
    double total = 0.0;
    std::int64_t count = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        const std::int32_t t = targets.data<std::int32_t>()[r];
        if (t == -100) continue;
        double mx = -1e300, sum = 0.0;
        for (std::int64_t v = 0; v < V; ++v) mx = std::max(mx, double(logits.at(r * V + v)));
        for (std::int64_t v = 0; v < V; ++v) sum += std::exp(double(logits.at(r * V + v)) - mx);
        total += mx + std::log(sum) - logits.at(r * V + t);
        ++count;
    }
    return total / static_cast<double>(count);
}

// Decoding with a KV cache (a prefill of 3 tokens, then one token per step) gives the logits of
// one full forward. Returns max |difference| / max |logit|.
template <class M>
double cache_vs_full(M& model, const Tensor& ids) {
    NoGrad no_grad;
    const std::int64_t B = ids.dim(0), T = ids.dim(1), V = model.config().vocab_size;
    Tape tape;
    const Tensor full = model.forward(tape, ids).logits.value().clone();
    nn::KVCache cache(model.config(), B, T);
    double max_diff = 0.0, max_logit = 0.0;
    std::int64_t pos = 0;
    for (std::int64_t step : {3, 1, 1, 1, 1}) {
        if (pos + step > T) break;
        Tape t;
        const Tensor part = model.forward(t, slice_ids(ids, pos, pos + step), {.cache = &cache}).logits.value();
        REQUIRE(part.shape() == Shape{B, step, V});
        for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t i = 0; i < step; ++i)
                for (std::int64_t v = 0; v < V; ++v) {
                    const double want = full.at((b * T + pos + i) * V + v);
                    max_diff = std::max(max_diff, std::abs(double(part.at((b * step + i) * V + v)) - want));
                    max_logit = std::max(max_logit, std::abs(want));
                }
        pos += step;
        REQUIRE(cache.length() == pos);
    }
    REQUIRE(pos == T);
    return max_diff / max_logit;
}

// Whether f throws mopt::Error with a message containing every one of `words`.
bool throws_naming(const std::function<void()>& f, std::initializer_list<const char*> words) {
    try {
        f();
    } catch (const mopt::Error& e) {
        const std::string msg = e.what();
        UNSCOPED_INFO("message: " << msg);
        for (const char* w : words)
            if (msg.find(w) == std::string::npos) return false;
        return true;
    }
    UNSCOPED_INFO("nothing was thrown");
    return false;
}

}  // namespace

// The slots' concepts accept the library's policies and reject anything else with a readable
// static_assert in Transformer (see concepts.hpp).
namespace concept_checks {
struct LayerWithoutVisit {
    LayerWithoutVisit(std::string, std::int64_t, ModelConfig, std::mt19937_64&) {}
    Var operator()(Tape&, Var x, nn::FeedForwardContext&) { return x; }
};
struct FFNWithoutVisit {
    using Layer = LayerWithoutVisit;
    using Activation = nn::SwiGLU;
    static constexpr bool has_experts = false;
    static constexpr std::int64_t expert_interval = 1;
};
static_assert(!nn::FeedForward<int>);
static_assert(!nn::FeedForward<nn::SwiGLU>);
static_assert(!nn::FeedForward<FFNWithoutVisit>);
static_assert(nn::FeedForward<nn::DenseFFN<>>);
static_assert(nn::FeedForward<nn::DenseFFN<nn::GELU>>);
static_assert(nn::FeedForward<nn::SwitchFFN<nn::TopK, nn::EveryOtherLayer, nn::ReLU>>);
static_assert(nn::NormPolicy<nn::RMSNorm> && nn::NormPolicy<nn::LayerNorm>);
static_assert(!nn::NormPolicy<int> && !nn::NormPolicy<nn::Attention<>>);
static_assert(nn::AttentionPolicy<nn::Attention<nn::Rotary>> && nn::AttentionPolicy<nn::Attention<nn::LearnedPositions>>);
static_assert(!nn::AttentionPolicy<nn::RMSNorm> && !nn::AttentionPolicy<nn::Rotary>);
static_assert(nn::ModelFamily<nn::Llama> && nn::ModelFamily<nn::GPT>);
static_assert(nn::ModelFamily<nn::Family<nn::LayerNorm, nn::Attention<nn::Rotary>, nn::DenseFFN<nn::ReLU>>>);
static_assert(!nn::ModelFamily<int> && !nn::ModelFamily<nn::RMSNorm>);
static_assert(!nn::ModelFamily<nn::Family<nn::Attention<>, nn::RMSNorm, nn::DenseFFN<>>>);  // slots swapped
static_assert(nn::CompressionPolicy<mopt::compress::None> && !nn::CompressionPolicy<int>);
static_assert(nn::PromptPolicy<mopt::prompt::None> && !nn::PromptPolicy<mopt::compress::None>);
static_assert(nn::Backend<mopt::backend::Cpu> && !nn::Backend<mopt::prompt::None>);
}  // namespace concept_checks

TEST_CASE("next_token_targets shifts ids left and ends each row with -100", "[nn][transformer]") {
    const std::vector<std::int32_t> v{5, 6, 7, 8, 1, 2, 3, 4};
    const Tensor ids = Tensor::from({2, 4}, std::span<const std::int32_t>(v));
    const Tensor t = nn::next_token_targets(ids);
    REQUIRE(t.shape() == Shape{2, 4});
    REQUIRE(t.dtype() == DType::i32);
    const std::vector<std::int32_t> want{6, 7, 8, -100, 2, 3, 4, -100};
    for (std::int64_t i = 0; i < 8; ++i) CHECK(t.data<std::int32_t>()[i] == want[static_cast<std::size_t>(i)]);
    CHECK(throws_naming([] { (void)nn::next_token_targets(Tensor::zeros({2, 4})); }, {"next_token_targets", "i32"}));
    CHECK(throws_naming([] { (void)nn::next_token_targets(Tensor::zeros({8}, DType::i32)); }, {"next_token_targets"}));
}

TEST_CASE("Transformer loss is the mean cross-entropy of its logits", "[nn][transformer]") {
    DenseLlama model(tiny_config(), 1);
    randomize_model(model, 100);
    const Tensor ids = random_ids({2, 6}, 3, 11);
    Tensor targets = nn::next_token_targets(ids);
    targets.data<std::int32_t>()[2] = -100;  // an ignored target inside a row too
    Tape tape;
    const auto out = model.forward(tape, ids, {.targets = &targets});
    REQUIRE(out.logits.shape() == Shape{2, 6, 11});
    REQUIRE(out.loss.shape() == Shape{});
    CHECK(out.loss.item() == Approx(naive_cross_entropy(out.logits.value(), targets)).epsilon(1e-6));
    CHECK(out.experts.empty());
    CHECK(!out.aux_loss.defined());
}

TEST_CASE("Transformer gradients match finite differences (2-layer dense Llama with GQA)",
          "[nn][transformer][grad]") {
    DenseLlama model(tiny_config(), 2);
    randomize_model(model, 200);
    const Tensor ids = random_ids({2, 5}, 4, 11);
    const Tensor targets = nn::next_token_targets(ids);
    const FdResult r = model_fd(
        model, [&](Tape& t) { return model.forward(t, ids, {.targets = &targets}).loss; }, ids, 1e-2f, true);
    INFO(describe(r));
    CHECK(r.ok);
    CHECK(r.checked == 2 * 21 + 4);  // embeddings, 2 × (2 norms + 4 attention + 3 mlp), final norm, head
    CHECK(r.max_checked_grad > 1e-2);
}

TEST_CASE("Transformer gradients match finite differences (2-layer Switch, loss + auxiliary losses)",
          "[nn][transformer][grad][switch_ffn]") {
    SwitchLlama model(tiny_moe_config(), 3);
    // A draw whose routing margins exceed what any ±eps perturbation moves (guarded below) and in
    // which every expert of both layers gets tokens.
    randomize_model(model, 306);
    const Tensor ids = random_ids({2, 5}, 5, 11);
    const Tensor targets = nn::next_token_targets(ids);
    // The routing must not change under the perturbations: compare the experts' shares each time.
    std::vector<std::vector<double>> base;
    {
        Tape t;
        for (const auto& s : model.forward(t, ids).experts) base.push_back(s.fraction);
    }
    REQUIRE(base.size() == 2);
    for (const auto& f : base)
        for (double share : f) REQUIRE(share > 0.0);
    bool routing_stable = true;
    auto loss = [&](Tape& t) {
        auto out = model.forward(t, ids, {.targets = &targets});
        for (std::size_t l = 0; l < out.experts.size(); ++l) routing_stable &= out.experts[l].fraction == base[l];
        REQUIRE(out.aux_loss.defined());
        return mopt::autodiff::add(out.loss, out.aux_loss);
    };
    const FdResult r = model_fd(model, loss, ids, 2e-3f, false);
    INFO(describe(r));
    CHECK(routing_stable);
    CHECK(r.ok);
    CHECK(r.checked == 2 * (1 + 2 * (2 + 4 + 1 + 3 * 3) + 1 + 1) + 4);
    // Each router gets a gradient (through p_i and the auxiliary losses).
    for (const char* name : {"model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"}) {
        double g = 0.0;
        const Tensor& grad = find(model, name).grad();
        for (std::int64_t i = 0; i < grad.numel(); ++i) g = std::max(g, std::abs(double(grad.at(i))));
        INFO(name);
        CHECK(g > 1e-3);
    }
}

TEST_CASE("Transformer reports expert statistics per expert layer", "[nn][transformer][switch_ffn]") {
    ModelConfig c = tiny_moe_config(2);
    c.n_layers = 4;
    MixtralLike model(c, 4);
    const Tensor ids = random_ids({2, 5}, 6, 11);
    Tape tape;
    const auto out = model.forward(tape, ids);
    REQUIRE(out.experts.size() == 2);  // EveryOtherLayer: layers 1 and 3
    CHECK(out.experts[0].layer == 1);
    CHECK(out.experts[1].layer == 3);
    for (const auto& s : out.experts) {
        CHECK(s.tokens == 10);
        double total = 0.0;
        for (double f : s.fraction) total += f;
        CHECK(total == Approx(1.0).margin(1e-12));
    }
    REQUIRE(out.aux_loss.defined());
    CHECK(out.aux_loss.requires_grad());
    NoGrad no_grad;  // evaluation: statistics, but no auxiliary loss to train
    Tape eval;
    const auto e = model.forward(eval, ids);
    CHECK(e.experts.size() == 2);
    CHECK(!e.aux_loss.defined());
}

TEST_CASE("GPT family (LayerNorm, learned positions, GELU) runs and its gradients check", "[nn][transformer][gpt]") {
    ModelConfig c = tiny_config();
    c.n_kv_heads = 0;
    Gpt model(c, 5);
    const auto st = Gpt::structure();
    CHECK(st.describe() == "GPT (LayerNorm, learned positions, DenseFFN<GELU>)");
    const auto names = names_of(model);
    CHECK(std::count(names.begin(), names.end(), "model.embed_positions.weight") == 1);
    CHECK(std::count(names.begin(), names.end(), "model.norm.bias") == 1);
    CHECK(std::count(names.begin(), names.end(), "model.layers.1.mlp.gate_proj.weight") == 0);
    CHECK(find(model, "model.embed_positions.weight").shape() == Shape{16, 8});
    randomize_model(model, 500);
    const Tensor ids = random_ids({2, 5}, 7, 11);
    const Tensor targets = nn::next_token_targets(ids);
    {
        Tape tape;
        const auto out = model.forward(tape, ids, {.targets = &targets});
        CHECK(std::isfinite(out.loss.item()));
        CHECK(out.loss.item() == Approx(naive_cross_entropy(out.logits.value(), targets)).epsilon(1e-6));
    }
    const FdResult r = model_fd(
        model, [&](Tape& t) { return model.forward(t, ids, {.targets = &targets}).loss; }, ids, 1e-2f, true);
    INFO(describe(r));
    CHECK(r.ok);
    // Position rows 0..4 are used: check that their gradient is what the positions table gets.
    const Tensor& gp = find(model, "model.embed_positions.weight").grad();
    double used = 0.0, unused = 0.0;
    for (std::int64_t i = 0; i < gp.numel(); ++i) (i < 5 * 8 ? used : unused) += std::abs(double(gp.at(i)));
    CHECK(used > 1e-3);
    CHECK(unused == 0.0);
    // Positions past max_seq are refused, naming the limit.
    Tape tape;
    CHECK(throws_naming([&] { (void)model.forward(tape, random_ids({1, 17}, 8, 11)); }, {"max_seq"}));
}

TEST_CASE("KV-cache decoding gives the logits of one full forward", "[nn][transformer][kv_cache]") {
    const Tensor ids = random_ids({2, 7}, 9, 11);
    SECTION("dense Llama (rotary, GQA)") {
        DenseLlama model(tiny_config(), 6);
        randomize_model(model, 600);
        const double rel = cache_vs_full(model, ids);
        INFO("relative difference " << rel);
        CHECK(rel <= 1e-5);
    }
    SECTION("GPT (learned positions)") {
        ModelConfig c = tiny_config();
        c.n_kv_heads = 0;
        Gpt model(c, 7);
        randomize_model(model, 700);
        const double rel = cache_vs_full(model, ids);
        INFO("relative difference " << rel);
        CHECK(rel <= 1e-5);
    }
    SECTION("Switch (Top1)") {
        SwitchLlama model(tiny_moe_config(), 8);
        randomize_model(model, 800);
        const double rel = cache_vs_full(model, ids);
        INFO("relative difference " << rel);
        CHECK(rel <= 1e-5);
    }
    SECTION("misuse is an error") {
        DenseLlama model(tiny_config(), 6);
        nn::KVCache cache(model.config(), 2, 4);
        Tape tape;
        // With gradients on, the cache refuses (its tensors are plain copies).
        CHECK(throws_naming([&] { (void)model.forward(tape, ids, {.cache = &cache}); }, {"NoGrad"}));
        NoGrad no_grad;
        cache.clear();
        // 7 positions do not fit a cache of 4.
        CHECK(throws_naming([&] { (void)model.forward(tape, ids, {.cache = &cache}); }, {"capacity"}));
        cache.clear();
        CHECK(throws_naming([&] { (void)model.forward(tape, slice_ids(ids, 0, 1).reshape({1, 2}), {.cache = &cache}); },
                            {"batch"}));
        CHECK(throws_naming([&] { nn::KVCache too_long(model.config(), 1, 17); }, {"max_seq"}));
        // A cache made for another model is refused, not indexed out of bounds.
        ModelConfig shallow = tiny_config();
        shallow.n_layers = 1;
        nn::KVCache one_layer(shallow, 2, 8);
        CHECK(throws_naming([&] { (void)model.forward(tape, ids, {.cache = &one_layer}); }, {"KVCache", "layer"}));
        ModelConfig mha = tiny_config();
        mha.n_kv_heads = 2;
        nn::KVCache other_heads(mha, 2, 8);
        CHECK(throws_naming([&] { (void)model.forward(tape, ids, {.cache = &other_heads}); }, {"KVCache", "kv heads"}));
    }
}

TEST_CASE("set_trainable(false) leaves no parameter gradient", "[nn][transformer]") {
    DenseLlama model(tiny_config(), 9);
    const Tensor ids = random_ids({1, 4}, 10, 11);
    const Tensor targets = nn::next_token_targets(ids);
    model.set_trainable(false);
    model.visit_parameters([](Parameter& p) {
        CHECK(!p.trainable());
        CHECK(!p.grad().defined());
    });
    {
        Tape tape;
        const auto out = model.forward(tape, ids, {.targets = &targets});
        CHECK(!out.logits.requires_grad());
        CHECK(!out.loss.requires_grad());
        CHECK(throws_naming([&] { tape.backward(out.loss); }, {"trainable"}));
    }
    // Only what is unfrozen gets a gradient: here the token embedding.
    Parameter& embed = find(model, "model.embed_tokens.weight");
    embed.set_trainable(true);
    Tape tape;
    tape.backward(model.forward(tape, ids, {.targets = &targets}).loss);
    double g = 0.0;
    for (std::int64_t i = 0; i < embed.numel(); ++i) g = std::max(g, std::abs(double(embed.grad().at(i))));
    CHECK(g > 0.0);
    model.visit_parameters([&](Parameter& p) {
        if (&p != &embed) CHECK(!p.grad().defined());
    });
}

TEST_CASE("Tied and untied output heads", "[nn][transformer]") {
    ModelConfig ct = tiny_config();
    ct.tie_embeddings = true;
    ModelConfig cu = tiny_config();
    DenseLlama tied(ct, 11), untied(cu, 11);  // same seed: every shared parameter is equal
    const auto tn = names_of(tied), un = names_of(untied);
    CHECK(std::count(tn.begin(), tn.end(), "lm_head.weight") == 0);
    CHECK(un.back() == "lm_head.weight");
    CHECK(untied.num_parameters() - tied.num_parameters() == 11 * 8);
    CHECK(untied.parameter_bytes() - tied.parameter_bytes() == 11 * 8 * 4);

    randomize_model(tied, 900);
    randomize_model(untied, 900);
    Parameter& head = find(untied, "lm_head.weight");
    Parameter& embed_u = find(untied, "model.embed_tokens.weight");
    std::copy_n(embed_u.value().f32(), embed_u.numel(), head.value().f32());
    const Tensor ids = random_ids({2, 5}, 12, 11);
    const Tensor targets = nn::next_token_targets(ids);
    tied.visit_parameters([](Parameter& p) { p.zero_grad(); });
    untied.visit_parameters([](Parameter& p) { p.zero_grad(); });
    Tape t1, t2;
    const auto a = tied.forward(t1, ids, {.targets = &targets});
    const auto b = untied.forward(t2, ids, {.targets = &targets});
    for (std::int64_t i = 0; i < a.logits.value().numel(); ++i) REQUIRE(a.logits.value().at(i) == b.logits.value().at(i));
    t1.backward(a.loss);
    t2.backward(b.loss);
    // The tied table gets the embedding's gradient plus the head's.
    const Tensor& g_tied = find(tied, "model.embed_tokens.weight").grad();
    for (std::int64_t i = 0; i < g_tied.numel(); ++i)
        REQUIRE(g_tied.at(i) == Approx(embed_u.grad().at(i) + head.grad().at(i)).margin(1e-6));
    // An untied head is its own matrix: changing it changes only the untied logits.
    head.value().at(0) += 1.0f;
    Tape t3;
    CHECK(untied.forward(t3, ids).logits.value().at(0) != b.logits.value().at(0));

    // The tied model's gradient also checks against finite differences.
    const FdResult r = model_fd(
        tied, [&](Tape& t) { return tied.forward(t, ids, {.targets = &targets}).loss; }, ids, 1e-2f, true);
    INFO(describe(r));
    CHECK(r.ok);
}

TEST_CASE("Invalid configs are refused with a message naming the field", "[nn][transformer][config]") {
    auto refused = [](auto make, std::initializer_list<const char*> words) { return throws_naming(make, words); };
    auto with = [](auto edit) {
        ModelConfig c = tiny_config();
        edit(c);
        return c;
    };
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.n_heads = 3; })); }, {"d_model", "n_heads"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.vocab_size = 0; })); }, {"vocab_size"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.d_ff = -1; })); }, {"d_ff"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.n_layers = 0; })); }, {"n_layers"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.n_kv_heads = 3; })); }, {"n_kv_heads"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.n_kv_heads = -2; })); }, {"n_kv_heads"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.n_heads = 8; })); }, {"head_dim"}));  // 8 / 8 = 1
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.rope_theta = 0.0f; })); }, {"rope_theta"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.norm_eps = 0.0f; })); }, {"norm_eps"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.bos_id = 11; })); }, {"bos_token_id"}));
    CHECK(refused([&] { DenseLlama m(with([](ModelConfig& c) { c.num_experts = 4; })); }, {"num_experts", "DenseFFN"}));
    CHECK(refused([&] { SwitchLlama m(tiny_config()); }, {"num_experts"}));
    CHECK(refused([&] { SwitchLlama m(tiny_moe_config(2)); }, {"experts_per_token", "Top1"}));
    CHECK(refused([&] { MixtralLike m(tiny_moe_config(4)); }, {"experts_per_token"}));
    CHECK(refused(
        [&] {
            ModelConfig c = tiny_moe_config();
            c.capacity_factor = -1.0f;
            SwitchLlama m(c);
        },
        {"capacity_factor"}));
    CHECK(refused(
        [&] {
            ModelConfig c = tiny_moe_config();
            c.aux_loss_coef = -0.1f;
            SwitchLlama m(c);
        },
        {"aux_loss_coef"}));
    // A valid config passes, and the forward names a wrong input.
    DenseLlama ok(tiny_config());
    Tape tape;
    CHECK(refused([&] { (void)ok.forward(tape, Tensor::zeros({1, 3})); }, {"ids", "i32"}));
    CHECK(refused([&] { (void)ok.forward(tape, Tensor::zeros({3}, DType::i32)); }, {"ids"}));
    const std::vector<std::int32_t> bad{1, 11, 2};  // 11 is outside the vocabulary of 11
    CHECK(refused([&] { (void)ok.forward(tape, Tensor::from({1, 3}, std::span<const std::int32_t>(bad))); },
                  {"embedding", "11"}));
}
