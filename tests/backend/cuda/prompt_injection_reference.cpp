// The CPU side of tests/backend/cuda/prompt_injection.cu (see prompt_injection_reference.hpp).
#include "prompt_injection_reference.hpp"
#include "reference_weights.hpp"

#include <algorithm>
#include <functional>
#include <limits>
#include <type_traits>

// linear_role.hpp first: it names detail::concat inside mopt::nn, which is ambiguous once
// linear_observer.hpp has opened mopt::nn::detail (the order transformer.hpp includes them in).
#include <mopt/nn/linear_role.hpp>

#include <mopt/autodiff/tape.hpp>
#include <mopt/nn/switch_ffn.hpp>
#include <mopt/nn/transformer.hpp>
#include <mopt/prompt/injected_prompt.hpp>
#include <mopt/prompt/mixture_of_prompts.hpp>
#include <mopt/train/adamw.hpp>
#include <mopt/train/grad_clip.hpp>

namespace mopt::cuda_test {

namespace {

template <class FFN, class Prompt>
using Model = nn::Transformer<nn::Llama, FFN, compress::None, Prompt>;
using Switch = nn::SwitchFFN<nn::Top1, nn::EveryLayer>;

// DeviceLlama's trainable block: [prompt | gate.w1 | gate.w2] (the prompt alone for InjectedPrompt),
// the values (grad = false) or the gradients.
template <class Layer>
std::vector<float> block_of(Layer& layer, bool grad) {
    std::vector<float> b;
    auto add = [&](autodiff::Parameter& p) { append(b, grad ? p.grad() : p.value()); };
    add(layer.prompt);
    if constexpr (requires { layer.gate; }) {
        add(layer.gate.w1);
        add(layer.gate.w2);
    }
    return b;
}

template <class M>
PromptInjectionReference run(const PromptInjectionCase& c) {
    constexpr bool mixture = std::is_same_v<typename M::Prompt, prompt::MixtureOfPrompts>;
    check(mixture == c.mixture, "prompt_injection_reference: the case's prompt kind does not match the model type");
    nn::ModelConfig config = config_of(c);
    config.num_experts = c.ffn_experts;
    config.experts_per_token = 1;
    config.capacity_factor = 0.0f;
    config.aux_loss_coef = c.aux_loss_coef;
    config.z_loss_coef = 0.0f;
    M model(config, c.seed);
    randomize(model, c.seed + 7, c.bf16_weights);

    prompt::PromptConfig pc;
    pc.length = c.prompt_rows();
    pc.inject_layer = c.inject_layer;
    pc.init = prompt::PromptInit::uniform;
    pc.seed = c.seed + 3;
    if constexpr (mixture) {
        pc.experts = c.experts;
        pc.gate_dim = c.gate_dim;
        pc.input_prompt = c.input_prompt;
    }
    model.init_prompt(pc);  // the prompt (and P¹) uniform in [-0.5, 0.5), the gate as Gate initialises it
    model.set_trainable(false);
    auto& layer = model.prompt();
    auto adjust = [&](autodiff::Parameter& p, float scale) {
        for (float& v : p.value().span()) v = c.bf16_weights ? round_bf16(v * scale) : v * scale;
    };
    adjust(layer.prompt, 1.0f);
    if constexpr (mixture) {
        if (c.input_prompt > 0) adjust(layer.input_prompt, 1.0f);
        adjust(layer.gate.w1, c.gate_scale);
        adjust(layer.gate.w2, c.gate_scale);
    }
    // Every parameter the prompt layer visits; AdamW and clip_grad_norm skip the frozen P¹.
    std::vector<autodiff::Parameter*> params;
    layer.visit([&](autodiff::Parameter& p) { params.push_back(&p); });

    PromptInjectionReference r;
    r.weights = backend::cuda::llama_host_weights(model);
    r.block = block_of(layer, false);
    if constexpr (mixture)
        if (c.input_prompt > 0) r.input_prompt = layer.input_prompt.value().to_vector();
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
        if (out.gate.defined()) r.gate = out.gate.value().to_vector();
        tape.backward(objective(out));
        r.grad = block_of(layer, true);
    }

    if constexpr (mixture) {
        if (c.top_k > 0) {
            const auto E = static_cast<std::size_t>(c.experts), k = static_cast<std::size_t>(c.top_k);
            for (std::int64_t b = 0; b < c.batch; ++b) {
                std::vector<float> g(r.gate.begin() + static_cast<std::ptrdiff_t>(b * c.experts),
                                     r.gate.begin() + static_cast<std::ptrdiff_t>((b + 1) * c.experts));
                std::sort(g.begin(), g.end(), std::greater<>());
                if (k < E) r.top_k_margin = std::min(r.top_k_margin, static_cast<double>(g[k - 1] - g[k]));
            }
            autodiff::NoGrad no_grad;
            layer.set_top_k(c.top_k);
            tape.reset();
            nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
            r.top_k_logits = out.logits.value().to_vector();
            r.top_k_gate = out.gate.value().to_vector();
            r.top_k_loss = static_cast<float>(out.loss.item());
            layer.set_top_k(0);
        }
    }

    train::AdamW opt(params, {.lr = c.lr, .weight_decay = c.weight_decay});
    for (int s = 0; s < c.adamw_steps; ++s) {
        opt.zero_grad();
        tape.reset();
        nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
        r.step_losses.push_back(static_cast<float>(out.loss.item()));
        tape.backward(objective(out));
        // clip_grad_norm returns the norm before clipping; a bound no norm reaches measures it unclipped
        r.step_grad_norms.push_back(static_cast<float>(
            train::clip_grad_norm(params, c.clip > 0.0f ? c.clip : std::numeric_limits<double>::infinity())));
        opt.step();
    }
    r.tuned = block_of(layer, false);
    return r;
}

}  // namespace

PromptInjectionReference prompt_injection_reference(const PromptInjectionCase& c) {
    if (c.ffn_experts > 0)
        return c.mixture ? run<Model<Switch, prompt::MixtureOfPrompts>>(c) : run<Model<Switch, prompt::InjectedPrompt>>(c);
    return c.mixture ? run<Model<nn::Llama::FFN, prompt::MixtureOfPrompts>>(c)
                     : run<Model<nn::Llama::FFN, prompt::InjectedPrompt>>(c);
}

}  // namespace mopt::cuda_test
