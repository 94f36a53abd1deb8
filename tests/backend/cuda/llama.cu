// DeviceLlama and PromptTuner against mopt's CPU Transformer<Llama> with a SoftPrompt (through the
// g++-compiled llama_reference.cpp) on a tiny GQA model: d = 128, 2 layers, 4 heads over 2 kv
// heads (head_dim 32, the smallest the attention kernels take), FFN 256, vocab 97, B = 2, T = 19,
// K = 5. Logits, loss and d loss / d prompt match the tape's to 1e-4 in f32 (normwise relative);
// AdamW steps on the prompt match train::AdamW; a CUDA-graph replay matches the eager steps; steps
// after the first allocate nothing.
//
// bf16: every stored activation and gradient is rounded to bf16 (8 significant bits), about 35
// roundings between the embeddings and d prompt. A host emulation of exactly this pipeline (mopt's
// CPU ops, each output rounded to bf16 as the GPU stores it, attention internals in f32) differs from
// the f32 tape by 1.1-1.2% (logits) and 0.8-1.5% (prompt gradient) normwise on these models, and
// 1-5e-4 on the loss; each single rounding contributes 0.1-0.7%. So the bf16 cases allow 3e-2 on the
// tensors and 2e-3 on the loss: that bf16 storage cannot meet 1e-2 end to end here, while an
// indexing or formula error shows up as O(1).
#include <cuda_bf16.h>

#include <cmath>
#include <span>
#include <vector>

#include <mopt/backend/cuda/llama.cuh>
#include <mopt/backend/cuda/prompt_tuner.cuh>

#include "cuda_test.cuh"
#include "llama_reference.hpp"

namespace {

namespace cuda = mopt::backend::cuda;
using mopt::cuda_test::LlamaCase;
using mopt::cuda_test::LlamaReference;
using mopt::cuda_test::device_prompt;
using mopt::cuda_test::download;

using mopt::cuda_test::scalar_error;

cuda::LlamaRunShape shape_of(const LlamaCase& c) {
    return {.batch = c.batch, .seq = c.seq, .prompt_len = c.prompt_len};
}

// The forward in logits and loss mode and the prompt gradient of a train forward, against the CPU.
template <class T>
void check_against_cpu(const LlamaCase& c, double tol, double loss_tol) {
    const LlamaReference ref = mopt::cuda_test::llama_reference(c);
    cuda::DeviceLlama<T> model(ref.weights);
    model.reserve(shape_of(c));
    cuda::DeviceArray<float> prompt = device_prompt(ref.prompt);

    model.forward_logits(ref.ids, prompt.data());
    CUDA_CHECK_CLOSE(model.logits_host(), ref.logits, tol, "logits");
    const float eval_loss = model.forward(ref.ids, ref.targets, prompt.data(), cuda::ForwardMode::loss);
    CUDA_CHECK(scalar_error(eval_loss, ref.loss) <= loss_tol, "evaluation loss ", eval_loss, " vs CPU ", ref.loss);

    const float train_loss = model.forward(ref.ids, ref.targets, prompt.data(), cuda::ForwardMode::train);
    CUDA_CHECK(scalar_error(train_loss, ref.loss) <= loss_tol, "train loss ", train_loss, " vs CPU ", ref.loss);
    cuda::DeviceArray<float> grad(ref.prompt.size());
    model.backward_to_prompt(grad.data());
    CUDA_CHECK_CLOSE(download(grad), ref.prompt_grad, tol, "d loss / d prompt");

    bool threw = false;  // the backward consumed the saved activations
    try {
        model.backward_to_prompt(grad.data());
    } catch (const mopt::Error&) {
        threw = true;
    }
    CUDA_CHECK(threw, "a second backward after one train forward must be refused");
}

}  // namespace

MOPT_CUDA_TEST(llama_f32_matches_cpu_untied) { check_against_cpu<float>(LlamaCase{}, 1e-4, 1e-4); }

MOPT_CUDA_TEST(llama_f32_matches_cpu_tied) {
    check_against_cpu<float>(LlamaCase{.tie_embeddings = true}, 1e-4, 1e-4);
}

MOPT_CUDA_TEST(llama_bf16_matches_cpu) {
    check_against_cpu<__nv_bfloat16>(LlamaCase{.bf16_weights = true}, 3e-2, 2e-3);
    check_against_cpu<__nv_bfloat16>(LlamaCase{.tie_embeddings = true, .bf16_weights = true, .seed = 5}, 3e-2, 2e-3);
}

// Three steps of forward + backward + AdamW on the same batch: the per-step losses and the final
// prompt equal train::AdamW's on the CPU; from the second step on, no cudaMalloc.
MOPT_CUDA_TEST(prompt_tuner_f32_adamw_matches_cpu) {
    const LlamaCase c{.adamw_steps = 3, .lr = 1e-2f, .weight_decay = 0.01f};
    const LlamaReference ref = mopt::cuda_test::llama_reference(c);
    cuda::DeviceLlama<float> model(ref.weights);
    cuda::PromptTuner<float> tuner(model, shape_of(c), ref.prompt, {.lr = c.lr, .weight_decay = c.weight_decay});
    std::size_t mallocs_after_first = 0;
    for (int s = 0; s < c.adamw_steps; ++s) {
        tuner.step(ref.ids, ref.targets);
        const float loss = tuner.loss();
        CUDA_CHECK(scalar_error(loss, ref.step_losses[s]) <= 1e-4, "step ", s + 1, " loss ", loss, " vs CPU ",
                   ref.step_losses[s]);
        if (s == 0) mallocs_after_first = cuda::Allocator::instance().stats().cuda_malloc_calls;
    }
    CUDA_CHECK_CLOSE(tuner.prompt(), ref.tuned_prompt, 1e-4, "prompt after 3 AdamW steps");
    CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs_after_first,
               "steps after the first called cudaMalloc ",
               cuda::Allocator::instance().stats().cuda_malloc_calls - mallocs_after_first, " times");
}

// Clipping by global norm: each step's ‖g‖ before clipping and the prompt after three clipped
// steps equal train::clip_grad_norm + train::AdamW's; the bound is below every step's norm, so
// every step clips, and the gradient the step used has norm `clip`.
MOPT_CUDA_TEST(prompt_tuner_f32_clipping_matches_cpu) {
    const LlamaCase c{.adamw_steps = 3, .lr = 1e-2f, .weight_decay = 0.01f, .clip = 1e-3f};
    const LlamaReference ref = mopt::cuda_test::llama_reference(c);
    for (float norm : ref.step_grad_norms)
        CUDA_CHECK(norm > 2 * c.clip, "the CPU gradient norm ", norm, " does not exceed the clip ", c.clip,
                   " enough for the test to clip");
    cuda::DeviceLlama<float> model(ref.weights);
    cuda::PromptTuner<float> tuner(model, shape_of(c), ref.prompt, {.lr = c.lr, .weight_decay = c.weight_decay},
                                   c.clip);
    for (int s = 0; s < c.adamw_steps; ++s) {
        tuner.step(ref.ids, ref.targets);
        CUDA_CHECK(scalar_error(tuner.loss(), ref.step_losses[s]) <= 1e-4, "step ", s + 1, " loss");
        CUDA_CHECK(scalar_error(tuner.grad_norm(), ref.step_grad_norms[s]) <= 1e-4, "step ", s + 1, " gradient norm ",
                   tuner.grad_norm(), " vs CPU ", ref.step_grad_norms[s]);
    }
    CUDA_CHECK_CLOSE(tuner.prompt(), ref.tuned_prompt, 1e-4, "prompt after 3 clipped AdamW steps");
    // the gradient the last step used was scaled down to the bound
    double sq = 0.0;
    for (float g : tuner.gradient()) sq += static_cast<double>(g) * g;
    CUDA_CHECK(scalar_error(std::sqrt(sq), c.clip) <= 1e-4, "clipped gradient norm ", std::sqrt(sq), " vs ", c.clip);
}

// bf16: one step's AdamW update equals train/adamw.hpp's formula on the gradient the GPU computed;
// then a tuner replaying a CUDA graph follows the eager tuner step for step, without cudaMalloc.
MOPT_CUDA_TEST(prompt_tuner_bf16_graph_replays_eager_steps) {
    const LlamaCase c{.bf16_weights = true};
    const LlamaReference ref = mopt::cuda_test::llama_reference(c);
    cuda::DeviceLlama<__nv_bfloat16> model(ref.weights);
    const cuda::AdamWOptions opt{.lr = 5e-3f, .weight_decay = 0.1f};

    cuda::PromptTuner<__nv_bfloat16> eager(model, shape_of(c), ref.prompt, opt);
    eager.step(ref.ids, ref.targets);
    {
        const std::vector<float> g = eager.gradient(), got = eager.prompt();
        std::vector<float> want(ref.prompt);
        const float bc1 = 1.0f - std::pow(opt.beta1, 1.0f), bc2 = 1.0f - std::pow(opt.beta2, 1.0f);
        for (std::size_t i = 0; i < want.size(); ++i) {
            const float m = (1.0f - opt.beta1) * g[i], v = (1.0f - opt.beta2) * g[i] * g[i];
            want[i] -= opt.lr * ((m / bc1) / (std::sqrt(v / bc2) + opt.eps) + opt.weight_decay * want[i]);
        }
        CUDA_CHECK_CLOSE(got, want, 1e-6, "AdamW step 1 against the CPU formula on the GPU gradient");
    }
    std::vector<std::vector<float>> eager_prompts;
    std::vector<float> eager_losses;
    eager_losses.push_back(eager.loss());
    eager_prompts.push_back(eager.prompt());
    for (int s = 1; s < 5; ++s) {
        eager.step(ref.ids, ref.targets);
        eager_losses.push_back(eager.loss());
        eager_prompts.push_back(eager.prompt());
    }

    cuda::PromptTuner<__nv_bfloat16> graphed(model, shape_of(c), ref.prompt, opt);
    graphed.use_graph();
    std::size_t mallocs = 0;
    for (int s = 0; s < 5; ++s) {
        graphed.step(ref.ids, ref.targets);
        CUDA_CHECK(graphed.graph_captured() == (s >= 1), "step ", s + 1, ": graph captured = ",
                   graphed.graph_captured());
        if (s == 1) mallocs = cuda::Allocator::instance().stats().cuda_malloc_calls;
        const float loss = graphed.loss();
        CUDA_CHECK(scalar_error(loss, eager_losses[s]) <= 1e-6, "step ", s + 1, " loss ", loss, " vs eager ",
                   eager_losses[s]);
        CUDA_CHECK_CLOSE(graphed.prompt(), eager_prompts[s], 1e-6, "prompt of the graph replay");
    }
    CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs,
               "graph replays called cudaMalloc");
    CUDA_CHECK(eager_losses.back() < eager_losses.front(), "the loss did not fall over 5 steps: ",
               eager_losses.front(), " -> ", eager_losses.back());
}
