// Tests of SwitchFFN: Top1 (Switch Transformer) and TopK (Mixtral) routing against a naive
// per-token loop, finite-difference gradients through the gate values p_i into the router,
// capacity dropping in token order, expert statistics, the load-balancing loss of Fedus et al.
// and the router z-loss of Zoph et al., and the placement of experts by EveryOtherLayer.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"

using mopt::nn::EveryOtherLayer;
using mopt::nn::ExpertStats;
using mopt::nn::FeedForwardContext;
using mopt::nn::ModelConfig;
using mopt::nn::SwitchFFN;
using mopt::nn::Top1;
using mopt::nn::TopK;
using namespace mopt::test;

namespace {

std::vector<std::string> names_of(auto& layer) {
    std::vector<std::string> names;
    layer.visit([&](Parameter& p) { names.push_back(p.name()); });
    return names;
}

// y = x Wᵀ for one row. x: [in], W: [out, in] -> [out]
std::vector<double> row_linear(const std::vector<double>& x, const Tensor& w) {
    const std::int64_t out = w.dim(0), in = w.dim(1);
    std::vector<double> y(static_cast<std::size_t>(out), 0.0);
    for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t i = 0; i < in; ++i) y[o] += x[i] * static_cast<double>(w.at(o * in + i));
    return y;
}

// A SwiGLU expert from its definition: w2(silu(w1 x) ⊙ w3 x). x: [d] -> [d]
std::vector<double> naive_expert(const std::vector<double>& x, mopt::nn::Mlp<mopt::nn::SwiGLU>& e) {
    auto g = row_linear(x, e.gate.weight.value());
    const auto u = row_linear(x, e.up.weight.value());
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    return row_linear(g, e.down.weight.value());
}

// Router quantities of every token, from the definitions.
struct Routing {
    std::vector<std::vector<double>> logits, probs;  // [N][E]
    std::vector<std::vector<int>> order;            // experts by descending logit, ties to the lower index
};

template <class L>
Routing naive_routing(const Tensor& x, L& layer) {
    Routing r;
    const std::int64_t d = x.shape().back(), N = x.numel() / d;
    for (std::int64_t t = 0; t < N; ++t) {
        std::vector<double> row(x.f32() + t * d, x.f32() + (t + 1) * d);
        auto l = row_linear(row, layer.router.weight.value());
        const double mx = *std::max_element(l.begin(), l.end());
        std::vector<double> p(l.size());
        double total = 0.0;
        for (std::size_t e = 0; e < l.size(); ++e) total += p[e] = std::exp(l[e] - mx);
        for (double& v : p) v /= total;
        std::vector<int> o(l.size());
        std::iota(o.begin(), o.end(), 0);
        std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return l[a] > l[b]; });
        r.logits.push_back(l);
        r.probs.push_back(p);
        r.order.push_back(o);
    }
    return r;
}

// The smallest gap between the k-th and (k+1)-th largest logit over all tokens: finite
// differences are valid only while no perturbation can change which experts are chosen.
double routing_margin(const Routing& r, int k) {
    double m = 1e300;
    for (const auto& l : r.logits) {
        std::vector<double> s = l;
        std::sort(s.rbegin(), s.rend());
        m = std::min(m, s[static_cast<std::size_t>(k - 1)] - s[static_cast<std::size_t>(k)]);
    }
    return m;
}

// The layer output from the definitions: per token Σ_j w_j · E_{i_j}(x) over its k chosen experts
// (Top1: w = p_i; TopK: the top-k probabilities renormalised to sum to 1), with assignments over
// an expert's capacity dropped in token order. Returns the output [N·d] and the dropped count.
template <class L>
std::pair<std::vector<double>, std::int64_t> naive_switch(const Tensor& x, L& layer, const Routing& r, int k,
                                                          double capacity_factor, bool renormalize) {
    const std::int64_t d = x.shape().back(), N = x.numel() / d;
    const auto E = static_cast<std::int64_t>(layer.experts.size());
    const std::int64_t capacity = capacity_factor > 0.0
                                      ? std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(
                                                                      capacity_factor * double(N * k) / double(E))))
                                      : N * k;
    std::vector<std::int64_t> load(static_cast<std::size_t>(E), 0);
    std::vector<double> out(static_cast<std::size_t>(N * d), 0.0);
    std::int64_t dropped = 0;
    for (std::int64_t t = 0; t < N; ++t) {
        double norm = 0.0;
        for (int j = 0; j < k; ++j) norm += r.probs[t][r.order[t][j]];
        for (int j = 0; j < k; ++j) {
            const int e = r.order[t][j];
            if (load[e]++ >= capacity) {
                ++dropped;
                continue;
            }
            const double w = renormalize ? r.probs[t][e] / norm : r.probs[t][e];
            std::vector<double> row(x.f32() + t * d, x.f32() + (t + 1) * d);
            const auto y = naive_expert(row, layer.experts[static_cast<std::size_t>(e)]);
            for (std::int64_t c = 0; c < d; ++c) out[t * d + c] += w * y[c];
        }
    }
    return {out, dropped};
}

void require_close(const Tensor& got, const std::vector<double>& want, double tol) {
    REQUIRE(got.numel() == static_cast<std::int64_t>(want.size()));
    double scale = 1.0;
    for (double w : want) scale = std::max(scale, std::abs(w));
    for (std::int64_t i = 0; i < got.numel(); ++i) {
        INFO("element " << i << " of " << got.shape());
        REQUIRE(std::abs(static_cast<double>(got.at(i)) - want[static_cast<std::size_t>(i)]) <= tol * scale);
    }
}

ModelConfig moe_config(std::int64_t k) {
    ModelConfig c;
    c.vocab_size = 16;
    c.d_model = 8;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 6;
    c.num_experts = 4;
    c.experts_per_token = k;
    c.aux_loss_coef = 0.0f;
    return c;
}

// Busy experts of a routing: how many experts at least one token chose among its top k.
int busy_experts(const Routing& r, int k) {
    std::vector<bool> busy(r.logits[0].size(), false);
    for (const auto& o : r.order)
        for (int j = 0; j < k; ++j) busy[static_cast<std::size_t>(o[j])] = true;
    return static_cast<int>(std::count(busy.begin(), busy.end(), true));
}

}  // namespace

TEST_CASE("SwitchFFN<Top1>: each token gets p_i(x) · E_i(x), i = argmax softmax(router(x))",
          "[nn][switch_ffn][routing]") {
    const ModelConfig c = moe_config(1);
    std::mt19937_64 rng(1);
    SwitchFFN<Top1>::Layer layer("model.layers.0", 0, c, rng);
    REQUIRE(layer.moe);
    REQUIRE(layer.experts.size() == 4);
    randomize(layer, 10);
    randomize(layer.router, 99, 1.0f);
    Tensor x = random_tensor({2, 5, 8}, 3);
    const Routing r = naive_routing(x, layer);
    REQUIRE(busy_experts(r, 1) >= 3);  // the data exercises several experts
    std::vector<ExpertStats> stats;
    FeedForwardContext ctx{.stats = &stats};
    Tape tape;
    Var y = layer(tape, tape.constant(x), ctx);
    REQUIRE(y.shape() == x.shape());
    const auto [want, dropped] = naive_switch(x, layer, r, 1, 0.0, false);
    require_close(y.value(), want, 2e-6);
    REQUIRE(stats.size() == 1);
    CHECK(stats[0].dropped == 0);
    CHECK(stats[0].tokens == 10);
    CHECK(!ctx.aux_loss.defined());  // α = 0 and no z-loss: nothing to add
}

TEST_CASE("SwitchFFN<TopK> with k = 2: the top-2 experts weighted by renormalised probabilities (Mixtral)",
          "[nn][switch_ffn][routing]") {
    const ModelConfig c = moe_config(2);
    std::mt19937_64 rng(2);
    SwitchFFN<TopK>::Layer layer("model.layers.0", 0, c, rng);
    randomize(layer, 20);
    randomize(layer.router, 98, 1.0f);
    Tensor x = random_tensor({2, 5, 8}, 4);
    const Routing r = naive_routing(x, layer);
    REQUIRE(busy_experts(r, 2) == 4);
    Tape tape;
    FeedForwardContext ctx;
    Var y = layer(tape, tape.constant(x), ctx);
    require_close(y.value(), naive_switch(x, layer, r, 2, 0.0, true).first, 2e-6);
    // Top-1 weights would give another output: the second expert is really mixed in.
    const auto top1 = naive_switch(x, layer, r, 1, 0.0, false).first;
    double diff = 0.0;
    for (std::size_t i = 0; i < top1.size(); ++i)
        diff = std::max(diff, std::abs(top1[i] - double(y.value().at(static_cast<std::int64_t>(i)))));
    CHECK(diff > 1e-2);
}

TEST_CASE("SwitchFFN gradients flow through the gate values into the router", "[nn][switch_ffn][grad]") {
    // eps small against the routing margin: no perturbation may change which experts are chosen.
    const float eps = 2e-3f;
    SECTION("Top1") {
        const ModelConfig c = moe_config(1);
        std::mt19937_64 rng(3);
        SwitchFFN<Top1>::Layer layer("l", 0, c, rng);
        randomize(layer, 30);
        randomize(layer.router, 97, 1.0f);
        Tensor x = random_tensor({1, 6, 8}, 5);
        const Routing r = naive_routing(x, layer);
        REQUIRE(routing_margin(r, 1) > 10 * eps);
        REQUIRE(busy_experts(r, 1) >= 2);
        FeedForwardContext ctx;
        const FdResult res =
            check_layer_gradients([&](Tape& t, const Var& xv) { return layer(t, xv, ctx); }, x, parameters_of(layer),
                                  {.eps = eps, .per_tensor = 16});
        INFO(describe(res));
        CHECK(res.ok);
        // Target 1 is the router: it learns only through p_i, and it must.
        CHECK(parameters_of(layer)[0]->name() == "l.block_sparse_moe.gate.weight");
        CHECK(res.max_grad[1] > 1e-2);
        CHECK(res.max_grad[0] > 1e-2);
    }
    SECTION("TopK, k = 2") {
        const ModelConfig c = moe_config(2);
        std::mt19937_64 rng(4);
        SwitchFFN<TopK>::Layer layer("l", 0, c, rng);
        randomize(layer, 40);
        randomize(layer.router, 96, 1.0f);
        Tensor x = random_tensor({1, 6, 8}, 28);
        const Routing r = naive_routing(x, layer);
        REQUIRE(routing_margin(r, 2) > 10 * eps);
        FeedForwardContext ctx;
        const FdResult res =
            check_layer_gradients([&](Tape& t, const Var& xv) { return layer(t, xv, ctx); }, x, parameters_of(layer),
                                  {.eps = eps, .per_tensor = 16});
        INFO(describe(res));
        CHECK(res.ok);
        CHECK(res.max_grad[1] > 1e-2);
    }
}

TEST_CASE("SwitchFFN capacity: assignments beyond an expert's capacity are dropped in token order",
          "[nn][switch_ffn][capacity]") {
    for (int k : {1, 2}) {
        INFO("k = " << k);
        ModelConfig c = moe_config(k);
        c.capacity_factor = 0.5f;  // capacity ceil(0.5 · 10k / 4): 2 (k = 1) or 3 (k = 2)
        std::mt19937_64 rng(5);
        SwitchFFN<TopK>::Layer topk("l", 0, c, rng);
        std::mt19937_64 rng1(5);
        SwitchFFN<Top1>::Layer top1("l", 0, c, rng1);
        auto run = [&](auto& layer, bool renormalize) {
            randomize(layer, 50);
            randomize(layer.router, 95, 1.0f);
            Tensor x = random_tensor({2, 5, 8}, 7);
            const Routing r = naive_routing(x, layer);
            const auto [want, dropped] = naive_switch(x, layer, r, k, c.capacity_factor, renormalize);
            REQUIRE(dropped > 0);  // the case really drops
            std::vector<ExpertStats> stats;
            FeedForwardContext ctx{.stats = &stats};
            Tape tape;
            Var y = layer(tape, tape.constant(x), ctx);
            require_close(y.value(), want, 2e-6);
            REQUIRE(stats.size() == 1);
            CHECK(stats[0].dropped == dropped);
            // A token whose every assignment was dropped has an output of exactly zero, so the
            // block's residual passes it unchanged.
            int zero_rows = 0;
            for (std::int64_t t = 0; t < 10; ++t) {
                bool all_zero_ref = true;
                for (std::int64_t j = 0; j < 8; ++j) all_zero_ref = all_zero_ref && want[t * 8 + j] == 0.0;
                if (!all_zero_ref) continue;
                ++zero_rows;
                for (std::int64_t j = 0; j < 8; ++j) REQUIRE(y.value().at(t * 8 + j) == 0.0f);
            }
            if (k == 1) CHECK(zero_rows == dropped);
            // Fractions count assignments before dropping.
            double total = 0.0;
            for (double f : stats[0].fraction) total += f;
            CHECK(total == Approx(1.0).margin(1e-12));
        };
        if (k == 1) run(top1, false);
        run(topk, true);  // k = 1: the weight is the renormalised 1, not p_i
    }
}

TEST_CASE("SwitchFFN expert statistics, load-balancing loss and z-loss match naive computations",
          "[nn][switch_ffn][aux]") {
    for (int k : {1, 2}) {
        INFO("k = " << k);
        ModelConfig c = moe_config(k);
        c.aux_loss_coef = 0.3f;
        std::mt19937_64 rng(6);
        SwitchFFN<TopK>::Layer layer("l", 0, c, rng);
        layer.layer = 3;
        randomize(layer, 60);
        randomize(layer.router, 94, 1.0f);
        Tensor x = random_tensor({2, 5, 8}, 8);
        const Routing r = naive_routing(x, layer);
        const std::int64_t N = 10, E = 4;

        // Naive: f_i = tokens sent to i / N (Σ f = k), P_i = mean router probability,
        // entropy = mean over tokens of −Σ p log p.
        std::vector<double> count(E, 0.0), P(E, 0.0);
        double entropy = 0.0;
        for (std::int64_t t = 0; t < N; ++t) {
            for (int j = 0; j < k; ++j) count[r.order[t][j]] += 1.0;
            for (std::int64_t e = 0; e < E; ++e) {
                P[e] += r.probs[t][e] / N;
                entropy -= r.probs[t][e] * std::log(r.probs[t][e]) / N;
            }
        }
        double balance = 0.0;
        for (std::int64_t e = 0; e < E; ++e) balance += (count[e] / N) * P[e];
        balance *= static_cast<double>(E);  // Fedus et al. eq. 4 without α

        std::vector<ExpertStats> stats;
        FeedForwardContext ctx{.stats = &stats};
        Tape tape;
        layer(tape, tape.constant(x), ctx);
        REQUIRE(stats.size() == 1);
        const ExpertStats& s = stats[0];
        CHECK(s.layer == 3);
        CHECK(s.tokens == N);
        REQUIRE(s.fraction.size() == 4);
        double total = 0.0;
        for (std::int64_t e = 0; e < E; ++e) {
            CHECK(s.fraction[e] == Approx(count[e] / double(N * k)).margin(1e-12));
            total += s.fraction[e];
        }
        CHECK(total == Approx(1.0).margin(1e-12));
        CHECK(s.router_entropy == Approx(entropy).epsilon(1e-5));
        CHECK(s.aux_loss == Approx(balance).epsilon(1e-5));
        REQUIRE(ctx.aux_loss.defined());
        CHECK(ctx.aux_loss.item() == Approx(0.3 * balance).epsilon(1e-5));

        // z-loss alone (α = 0): c_z · mean_x logsumexp(router logits)² (Zoph et al., ST-MoE eq. 5).
        double z = 0.0;
        for (const auto& l : r.logits) {
            double mx = *std::max_element(l.begin(), l.end()), sum = 0.0;
            for (double v : l) sum += std::exp(v - mx);
            z += std::pow(mx + std::log(sum), 2) / N;
        }
        layer.aux_loss_coef = 0.0f;
        layer.z_loss_coef = 0.05f;
        FeedForwardContext zctx;
        Tape ztape;
        layer(ztape, ztape.constant(x), zctx);
        REQUIRE(zctx.aux_loss.defined());
        CHECK(zctx.aux_loss.item() == Approx(0.05 * z).epsilon(1e-5));
        // Both terms add up, and into a loss the context already holds.
        layer.aux_loss_coef = 0.3f;
        FeedForwardContext bctx;
        Tape btape;
        bctx.aux_loss = btape.constant(Tensor::full({}, 1.0f));
        layer(btape, btape.constant(x), bctx);
        CHECK(bctx.aux_loss.item() == Approx(1.0 + 0.3 * balance + 0.05 * z).epsilon(1e-5));
    }
}

TEST_CASE("SwitchFFN load-balancing and z-loss gradients w.r.t. the router match finite differences",
          "[nn][switch_ffn][aux][grad]") {
    const float eps = 2e-3f;
    for (const bool z_loss : {false, true}) {
        INFO((z_loss ? "z-loss" : "load balance"));
        ModelConfig c = moe_config(1);
        c.aux_loss_coef = z_loss ? 0.0f : 1.0f;
        c.z_loss_coef = z_loss ? 0.5f : 0.0f;
        std::mt19937_64 rng(7);
        SwitchFFN<Top1>::Layer layer("l", 0, c, rng);
        randomize(layer, 70);
        randomize(layer.router, 93, 1.0f);
        Tensor x = random_tensor({1, 6, 8}, 9);
        REQUIRE(routing_margin(naive_routing(x, layer), 1) > 10 * eps);
        const FdResult res = check_layer_gradients(
            [&](Tape& t, const Var& xv) {
                FeedForwardContext ctx;
                layer(t, xv, ctx);
                return ctx.aux_loss;
            },
            x, {&layer.router.weight}, {.eps = eps, .per_tensor = 32, .probe_no_grad = false});
        INFO(describe(res));
        CHECK(res.ok);
        CHECK(res.max_grad[1] > 1e-2);  // the router gets a real gradient from the loss alone
    }
}

TEST_CASE("EveryOtherLayer: a dense Mlp in layer 0 and experts in layer 1", "[nn][switch_ffn][placement]") {
    using FFN = SwitchFFN<Top1, EveryOtherLayer>;
    STATIC_REQUIRE(FFN::expert_interval == 2);
    ModelConfig c = moe_config(1);  // expert_interval is left at 1: the type decides the placement
    std::mt19937_64 rng(8);
    FFN::Layer l0("model.layers.0", 0, c, rng);
    FFN::Layer l1("model.layers.1", 1, c, rng);
    CHECK(!l0.moe);
    CHECK(l1.moe);
    CHECK(names_of(l0) == std::vector<std::string>{"model.layers.0.mlp.gate_proj.weight",
                                                   "model.layers.0.mlp.up_proj.weight",
                                                   "model.layers.0.mlp.down_proj.weight"});
    const auto n1 = names_of(l1);
    REQUIRE(n1.size() == 1 + 4 * 3);
    CHECK(n1[0] == "model.layers.1.block_sparse_moe.gate.weight");
    CHECK(n1[1] == "model.layers.1.block_sparse_moe.experts.0.w1.weight");
    CHECK(n1[2] == "model.layers.1.block_sparse_moe.experts.0.w3.weight");
    CHECK(n1[3] == "model.layers.1.block_sparse_moe.experts.0.w2.weight");
    CHECK(n1[12] == "model.layers.1.block_sparse_moe.experts.3.w2.weight");

    // The dense layer adds no statistics; the expert layer adds one entry.
    Tensor x = random_tensor({1, 3, 8}, 11);
    std::vector<ExpertStats> stats;
    FeedForwardContext ctx{.stats = &stats};
    Tape tape;
    l0(tape, tape.constant(x), ctx);
    CHECK(stats.empty());
    l1(tape, tape.constant(x), ctx);
    CHECK(stats.size() == 1);

    // The same placement inside a Transformer (4 layers: experts in 1 and 3).
    ModelConfig mc = moe_config(1);
    mc.n_layers = 4;
    mopt::nn::Transformer<mopt::nn::Llama, FFN> model(mc);
    std::vector<std::string> moe_gates, dense;
    model.visit_parameters([&](Parameter& p) {
        if (p.name().find("block_sparse_moe.gate.") != std::string::npos) moe_gates.push_back(p.name());
        if (p.name().find("mlp.down_proj") != std::string::npos) dense.push_back(p.name());
    });
    CHECK(moe_gates == std::vector<std::string>{"model.layers.1.block_sparse_moe.gate.weight",
                                                "model.layers.3.block_sparse_moe.gate.weight"});
    CHECK(dense == std::vector<std::string>{"model.layers.0.mlp.down_proj.weight",
                                            "model.layers.2.mlp.down_proj.weight"});
    CHECK(model.structure().describe() == "Llama (RMSNorm, rotary, SwitchFFN<SwiGLU, Top1, EveryOtherLayer>)");
}
