// The CPU side of tests/backend/cuda/llama.cu (see llama_reference.hpp).
#include "llama_reference.hpp"
#include "reference_weights.hpp"

#include <bit>
#include <cmath>
#include <limits>
#include <random>

// linear_role.hpp first: it names detail::concat inside mopt::nn, which is ambiguous once
// linear_observer.hpp has opened mopt::nn::detail (the order transformer.hpp includes them in).
#include <mopt/nn/linear_role.hpp>

#include <mopt/autodiff/tape.hpp>
#include <mopt/nn/transformer.hpp>
#include <mopt/prompt/soft_prompt.hpp>
#include <mopt/train/adamw.hpp>
#include <mopt/train/grad_clip.hpp>

namespace mopt::cuda_test {

namespace {

using Model = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::None, prompt::SoftPrompt>;

}  // namespace

LlamaReference llama_reference(const LlamaCase& c) {
    nn::ModelConfig config = config_of(c);
    config.tie_embeddings = c.tie_embeddings;
    Model model(config, c.seed);
    randomize(model, c.seed + 7, c.bf16_weights);
    model.init_prompt({.length = c.prompt_len, .init = prompt::PromptInit::uniform, .seed = c.seed + 3});
    model.set_trainable(false);
    autodiff::Parameter& prompt = model.prompt().prompt;
    if (c.bf16_weights)
        for (float& v : prompt.value().span()) v = round_bf16(v);

    LlamaReference r;
    r.weights = backend::cuda::llama_host_weights(model);
    r.prompt = prompt.value().to_vector();
    const auto [ids, targets] = random_batch(c.vocab, c.batch, c.seq, c.seed + 11);
    r.ids = int_values(ids);
    r.targets = int_values(targets);

    autodiff::Tape tape;
    {
        nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
        r.logits = out.logits.value().to_vector();
        r.loss = static_cast<float>(out.loss.item());
        tape.backward(out.loss);
        r.prompt_grad = prompt.grad().to_vector();
    }

    train::AdamW opt({&prompt}, {.lr = c.lr, .weight_decay = c.weight_decay});
    for (int s = 0; s < c.adamw_steps; ++s) {
        opt.zero_grad();
        tape.reset();
        nn::ForwardOutput out = model.forward(tape, ids, {.targets = &targets});
        r.step_losses.push_back(static_cast<float>(out.loss.item()));
        tape.backward(out.loss);
        // clip_grad_norm returns the norm before clipping; a bound no norm reaches measures it unclipped
        r.step_grad_norms.push_back(static_cast<float>(
            train::clip_grad_norm({&prompt}, c.clip > 0.0f ? c.clip : std::numeric_limits<double>::infinity())));
        opt.step();
    }
    r.tuned_prompt = prompt.value().to_vector();
    return r;
}

}  // namespace mopt::cuda_test
