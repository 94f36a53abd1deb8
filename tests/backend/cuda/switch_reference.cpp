// The CPU side of tests/backend/cuda/switch.cu (see switch_reference.hpp).
#include "switch_reference.hpp"
#include "reference_weights.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <random>
#include <span>
#include <string>

// linear_role.hpp first: it names detail::concat inside mopt::nn, which is ambiguous once
// linear_observer.hpp has opened mopt::nn::detail (the order transformer.hpp includes them in).
#include <mopt/nn/linear_role.hpp>

#include <mopt/autodiff/tape.hpp>
#include <mopt/nn/switch_ffn.hpp>
#include <mopt/nn/transformer.hpp>
#include <mopt/prompt/soft_prompt.hpp>
#include <mopt/train/adamw.hpp>

namespace mopt::cuda_test {

namespace {

std::vector<float> values(const Tensor& t) { return t.to_vector(); }

// Normal(0, 1/in) projections (O(1) activations), as llama_reference.cpp; bf16: rounded.
void randomize_projection(Tensor& w, std::mt19937_64& rng, bool bf16) {
    std::normal_distribution<float> dist(0.0f, 1.0f / std::sqrt(static_cast<float>(w.dim(1))));
    for (float& v : w.span()) v = bf16 ? round_bf16(dist(rng)) : dist(rng);
}

using SwitchLayer = nn::SwitchFFN<nn::Top1, nn::EveryLayer, nn::SwiGLU>::Layer;

}  // namespace

SwitchReference switch_reference(const SwitchCase& c) {
    nn::ModelConfig config;
    config.vocab_size = 16;
    config.d_model = c.d_model;
    config.n_layers = 1;
    config.n_heads = 1;
    config.d_ff = c.d_ff;
    config.num_experts = c.experts;
    config.experts_per_token = 1;
    config.capacity_factor = c.capacity_factor;
    config.aux_loss_coef = c.aux_loss_coef;
    config.z_loss_coef = c.z_loss_coef;
    std::mt19937_64 rng(c.seed);
    SwitchLayer layer("model.layers.0", 0, config, rng);
    const std::int64_t N = c.rows, d = c.d_model, E = c.experts;

    randomize_projection(layer.router.weight.value(), rng, c.bf16);
    for (auto& e : layer.experts) {
        randomize_projection(e.gate.weight.value(), rng, c.bf16);
        randomize_projection(e.up.weight.value(), rng, c.bf16);
        randomize_projection(e.down.weight.value(), rng, c.bf16);
    }
    float* router = layer.router.weight.value().f32();
    if (c.idle_expert)  // every x[r, 0] is +3: the last expert's logit gets −9, the others none of it
        for (std::int64_t e = 0; e < E; ++e) router[e * d] = e == E - 1 ? -3.0f : 0.0f;
    layer.visit([](autodiff::Parameter& p) { p.set_trainable(false); });

    SwitchReference r;
    std::normal_distribution<float> unit(0.0f, 1.0f);
    r.x.resize(static_cast<std::size_t>(N * d));
    r.dy.resize(r.x.size());
    for (std::int64_t i = 0; i < N * d; ++i) {
        const float v = c.idle_expert && i % d == 0 ? 3.0f : unit(rng);
        r.x[static_cast<std::size_t>(i)] = c.bf16 ? round_bf16(v) : v;
    }
    for (float& v : r.dy) v = c.bf16 ? round_bf16(unit(rng)) : unit(rng);

    r.router = values(layer.router.weight.value());
    for (auto& e : layer.experts) {
        append(r.gate, e.gate.weight.value());
        append(r.up, e.up.weight.value());
        append(r.down, e.down.weight.value());
    }

    autodiff::Tape tape;
    std::vector<nn::ExpertStats> stats;
    nn::FeedForwardContext ctx{.stats = &stats};
    const autodiff::Var x = tape.input(Tensor::from({N, d}, std::span<const float>(r.x)));
    const autodiff::Var out = layer(tape, x, ctx);
    autodiff::Var objective =
        autodiff::sum(autodiff::mul(out, tape.constant(Tensor::from({N, d}, std::span<const float>(r.dy)))));
    if (ctx.aux_loss.defined()) {
        r.aux_loss = ctx.aux_loss.item();
        if (c.aux_weight != 0.0f) objective = autodiff::add(objective, autodiff::scale(ctx.aux_loss, c.aux_weight));
    }
    tape.backward(objective);
    r.out = values(out.value());
    r.dx = values(x.grad());

    check(stats.size() == 1, "switch_reference: expected one ExpertStats, got ", stats.size());
    const nn::ExpertStats& s = stats[0];
    for (double f : s.fraction) r.assigned.push_back(std::llround(f * static_cast<double>(N)));
    r.dropped = s.dropped;
    r.balance = s.aux_loss;
    r.router_entropy = s.router_entropy;

    // Router probabilities in double: the smallest top-1 / top-2 gap over the rows.
    r.min_margin = 1.0;
    for (std::int64_t i = 0; i < N; ++i) {
        std::vector<double> l(static_cast<std::size_t>(E));
        for (std::int64_t e = 0; e < E; ++e)
            for (std::int64_t j = 0; j < d; ++j)
                l[static_cast<std::size_t>(e)] += static_cast<double>(r.x[static_cast<std::size_t>(i * d + j)]) *
                                                  router[e * d + j];
        const double m = *std::max_element(l.begin(), l.end());
        double sum = 0.0;
        for (double& v : l) sum += (v = std::exp(v - m));
        std::sort(l.begin(), l.end(), std::greater<>());
        r.min_margin = std::min(r.min_margin, E > 1 ? (l[0] - l[1]) / sum : 1.0);
    }
    return r;
}

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// SwitchLlamaCase::designed_routing: dims 0..E−1 of the residual stream hold β at (label mod
// (E − 1)) and 0 elsewhere, from the embeddings and the prompt; o_proj and every down projection
// write nothing there, so the stream keeps them through every layer; the router reads them with
// weight γ = 1 (and the other dims with weights of spread 0.03), so the chosen logit leads by
// about β/rms(x) while bf16 rounding moves logits by ~1%.
template <class Model>
void design_routing(Model& model, std::int64_t experts) {
    constexpr float beta = 3.0f, noise = 0.03f;
    const std::int64_t routed = experts - 1;
    model.visit_parameters([&](autodiff::Parameter& p) {
        Tensor& w = p.value();
        const std::string& n = p.name();
        if (n == "model.embed_tokens.weight") {
            for (std::int64_t t = 0; t < w.dim(0); ++t)
                for (std::int64_t j = 0; j < experts; ++j) w.f32()[t * w.dim(1) + j] = j == t % routed ? beta : 0.0f;
        } else if (ends_with(n, "o_proj.weight") || ends_with(n, "down_proj.weight") || ends_with(n, "w2.weight")) {
            std::fill_n(w.f32(), experts * w.dim(1), 0.0f);  // output rows 0..E−1
        } else if (ends_with(n, "block_sparse_moe.gate.weight")) {
            const std::int64_t d = w.dim(1);
            const float rescale = noise * std::sqrt(static_cast<float>(d));  // Normal(0, 1/d) -> Normal(0, noise²)
            for (std::int64_t e = 0; e < experts; ++e)
                for (std::int64_t j = 0; j < d; ++j) {
                    float& v = w.f32()[e * d + j];
                    v = j < experts ? (j == e ? 1.0f : 0.0f) : round_bf16(v * rescale);
                }
        }
    });
}

template <class Model>
SwitchLlamaReference run(const SwitchLlamaCase& c) {
    nn::ModelConfig config = config_of(c);
    config.num_experts = c.experts;
    config.experts_per_token = 1;
    config.capacity_factor = c.capacity_factor;
    config.aux_loss_coef = c.aux_loss_coef;
    config.z_loss_coef = c.z_loss_coef;
    Model model(config, c.seed);
    randomize(model, c.seed + 7, c.bf16_weights);
    if (c.designed_routing) design_routing(model, c.experts);
    prompt::PromptConfig pc;
    pc.length = c.prompt_len;
    pc.init = prompt::PromptInit::uniform;
    pc.seed = c.seed + 3;
    model.init_prompt(pc);
    model.set_trainable(false);
    autodiff::Parameter& prompt = model.prompt().prompt;
    const std::int64_t d = c.d_model, K = c.prompt_len;
    for (std::int64_t k = 0; k < K; ++k)
        for (std::int64_t j = 0; j < d; ++j) {
            float& v = prompt.value().f32()[k * d + j];
            if (c.designed_routing && j < c.experts) v = j == k % (c.experts - 1) ? 3.0f : 0.0f;
            if (c.bf16_weights) v = round_bf16(v);
        }

    SwitchLlamaReference r;
    r.weights = backend::cuda::llama_host_weights(model);
    r.prompt = prompt.value().to_vector();
    const auto [ids, targets] = random_batch(c.vocab, c.batch, c.seq, c.seed + 11);
    r.ids = int_values(ids);
    r.targets = int_values(targets);

    // The objective of train::prompt_step: loss + aux_weight · aux_loss.
    auto objective = [&](const nn::ForwardOutput& out) { return prompt_objective(out, c.aux_weight); };
    autodiff::Tape tape;
    {
        nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
        r.logits = out.logits.value().to_vector();
        r.loss = static_cast<float>(out.loss.item());
        r.aux_loss = out.aux_loss.defined() ? out.aux_loss.item() : 0.0;
        const std::int64_t rows = c.batch * (c.prompt_len + c.seq);
        for (const nn::ExpertStats& s : out.experts) {
            std::vector<std::int64_t> a;
            for (double f : s.fraction) a.push_back(std::llround(f * static_cast<double>(rows)));
            r.assigned.push_back(std::move(a));
            r.dropped.push_back(s.dropped);
        }
        if (c.designed_routing) {  // the routing must be the designed one in every layer
            std::vector<std::int64_t> want(static_cast<std::size_t>(c.experts), 0);
            for (std::int64_t b = 0; b < c.batch; ++b) {
                for (std::int64_t k = 0; k < K; ++k) ++want[static_cast<std::size_t>(k % (c.experts - 1))];
                for (std::int64_t t = 0; t < c.seq; ++t)
                    ++want[static_cast<std::size_t>(r.ids[static_cast<std::size_t>(b * c.seq + t)] % (c.experts - 1))];
            }
            for (std::size_t l = 0; l < r.assigned.size(); ++l)
                check(r.assigned[l] == want, "switch_llama_reference: expert layer ", l,
                      " does not route by the designed labels");
        }
        tape.backward(objective(out));
        r.prompt_grad = prompt.grad().to_vector();
    }

    train::AdamW opt({&prompt}, {.lr = c.lr, .weight_decay = c.weight_decay});
    for (int s = 0; s < c.adamw_steps; ++s) {
        opt.zero_grad();
        tape.reset();
        nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
        r.step_losses.push_back(static_cast<float>(out.loss.item()));
        tape.backward(objective(out));
        opt.step();
    }
    r.tuned_prompt = prompt.value().to_vector();
    return r;
}

}  // namespace

SwitchLlamaReference switch_llama_reference(const SwitchLlamaCase& c) {
    if (c.every_other_layer)
        return run<nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer>, compress::None,
                                   prompt::SoftPrompt>>(c);
    return run<nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>, compress::None, prompt::SoftPrompt>>(
        c);
}

}  // namespace mopt::cuda_test
