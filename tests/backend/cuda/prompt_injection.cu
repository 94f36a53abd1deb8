// DeviceLlama and PromptTuner with prompts injected at layer L_int > 0 and with a Mixture of Prompts
// (Dun et al. 2023; prompt/mixture_of_prompts.hpp), against mopt's CPU Transformer with a
// prompt::InjectedPrompt or prompt::MixtureOfPrompts (through the g++-compiled
// prompt_injection_reference.cpp). llama.cu's model sizes with a third layer (d = 128, 4 heads over
// 2 kv heads of head_dim 32, FFN 256, vocab 97, B = 2, T = 19), so there are layers below and
// above the injection point; MoP: E = 3 experts of 2 prompts each (K = 6), gate width d_g = 16.
//
// The trainable values are one f32 block, [prompt K·d | gate.w1 d_g·d | gate.w2 E·d_g]
// (LlamaRunShape::trainable_values). The gradient and the tuned block are compared part by part
// (the gate's parts are small next to the prompt's, so a normwise error over the whole block would
// hide them), each normwise relative (cuda_test.cuh): f32 ≤ 1e-4. bf16 as llama.cu: 3e-2 on the
// tensors and 2e-3 on the loss (about 35 bf16 roundings end to end). The gate weights' gradient
// is the exception: dg[b, e] = Σ ⟨dy, x⟩ over expert e's rows and layers is a dot product with heavy
// cancellation (the gate's gradients are 15-1000 times smaller than the prompt's while dy and x are
// not), so the ~1-3% error bf16 storage leaves in dy grows by that ratio; then the softmax backward
// (1.1-2.8x smaller than its input on the CPU). Measured on an H200: 0.19 normwise on d gate.w1 in
// the bf16 case below, while the f32 cases match to 1e-4. bf16 allows 0.35 on the gate's parts:
// an indexing or formula error (a missing layer, a wrong expert) is caught by the f32 cases.
//
// AdamW's first update of an element is lr·sign(g) whatever |g|: an element of the first gradient
// near 0 takes opposite steps on the two sides when rounding flips its sign. The tuner cases use a
// seed whose first gradient has no nonzero element below 1e-4 of its part's largest (checked).
//
// Cases: InjectedPrompt at L_int = 1 and 2; MoP at L_int = 1 without an input prompt, at L_int = 0
// and 2 with a frozen input prompt P¹ (p₁ = 3); top-2 gating at evaluation (and the dense gate in
// train mode); PromptTuner's AdamW over the whole block with and without a binding clip, and its
// CUDA-graph replay; a Switch model (4 experts, top-1) with MoP, with and without the aux loss in
// the objective; shapes and inputs that must be refused.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <mopt/backend/cuda/llama.cuh>
#include <mopt/backend/cuda/prompt_tuner.cuh>

#include "cuda_test.cuh"
#include "prompt_injection_reference.hpp"

namespace {

namespace cuda = mopt::backend::cuda;
using bf16 = __nv_bfloat16;
using mopt::cuda_test::device_prompt;
using mopt::cuda_test::download;
using mopt::cuda_test::error_of;
using mopt::cuda_test::PromptInjectionCase;
using mopt::cuda_test::PromptInjectionReference;
using mopt::cuda_test::scalar_error;

cuda::LlamaRunShape shape_of(const PromptInjectionCase& c) {
    return {.batch = c.batch,
            .seq = c.seq,
            .prompt_len = c.prompt_rows(),
            .inject_layer = c.inject_layer,
            .experts = c.mixture ? c.experts : 0,
            .gate_dim = c.mixture ? c.gate_dim : 0,
            .input_prompt = c.mixture ? c.input_prompt : 0};
}

// The parts of a block: the prompt, then (MoP) gate.w1 and gate.w2.
struct Part {
    const char* name;
    std::size_t offset, size;
};
std::vector<Part> parts_of(const PromptInjectionCase& c) {
    const auto K = static_cast<std::size_t>(c.prompt_rows()), d = static_cast<std::size_t>(c.d_model);
    std::vector<Part> parts{{"prompt", 0, K * d}};
    if (c.mixture) {
        const auto g = static_cast<std::size_t>(c.gate_dim), E = static_cast<std::size_t>(c.experts);
        parts.push_back({"gate.w1", K * d, g * d});
        parts.push_back({"gate.w2", K * d + g * d, E * g});
    }
    return parts;
}

// The smallest nonzero |v| over the largest |v| of each part of a block (exact zeros, the gate
// units ReLU turns off for every sequence, are zero on both sides).
double min_nonzero_ratio(const PromptInjectionCase& c, const std::vector<float>& block) {
    double ratio = 1.0;
    for (const Part& p : parts_of(c)) {
        double largest = 0.0, smallest = INFINITY;
        for (std::size_t i = p.offset; i < p.offset + p.size; ++i) {
            const double a = std::abs(block[i]);
            largest = std::max(largest, a);
            if (a > 0.0) smallest = std::min(smallest, a);
        }
        if (largest > 0.0) ratio = std::min(ratio, smallest / largest);
    }
    return ratio;
}

// Every part of a block against the CPU's; gate_tol applies to the gate's parts.
void check_block(const PromptInjectionCase& c, const std::vector<float>& got, const std::vector<float>& want,
                 double tol, double gate_tol, const std::string& what) {
    CUDA_CHECK(got.size() == want.size(), what, ": ", got.size(), " values, the CPU's block has ", want.size());
    for (const Part& p : parts_of(c)) {
        const std::span<const float> g = std::span<const float>(got).subspan(p.offset, p.size);
        const std::span<const float> w = std::span<const float>(want).subspan(p.offset, p.size);
        CUDA_CHECK_CLOSE(g, w, p.offset == 0 ? tol : gate_tol, what + " (" + p.name + ")");
    }
}

// A model of the reference's weights, reserved for the case's shape, its input prompt uploaded.
template <class T>
struct Setup {
    cuda::DeviceLlama<T> model;
    Setup(const PromptInjectionCase& c, const PromptInjectionReference& ref)
        : model(ref.weights, {.aux_loss_weight = c.aux_weight}) {
        const cuda::LlamaRunShape shape = shape_of(c);
        CUDA_CHECK(static_cast<std::size_t>(shape.trainable_values(c.d_model)) == ref.block.size(),
                   "LlamaRunShape::trainable_values = ", shape.trainable_values(c.d_model), ", the CPU's block holds ",
                   ref.block.size());
        CUDA_CHECK(shape.positions() == c.prompt_rows() + (c.mixture ? c.input_prompt : 0) + c.seq, "positions() = ",
                   shape.positions());
        model.reserve(shape);
        if (!ref.input_prompt.empty()) model.set_input_prompt(ref.input_prompt);
    }
};

// Logits, loss and gate of an evaluation forward, the same of a train forward and the gradient
// block of its backward, against the CPU.
template <class T>
void check_against_cpu(const PromptInjectionCase& c, double tol, double loss_tol, double gate_tol) {
    const PromptInjectionReference ref = mopt::cuda_test::prompt_injection_reference(c);
    Setup<T> s(c, ref);
    cuda::DeviceLlama<T>& model = s.model;
    cuda::DeviceArray<float> block = device_prompt(ref.block);

    model.forward_logits(ref.ids, block.data());
    CUDA_CHECK_CLOSE(model.logits_host(), ref.logits, tol, "logits");
    if (c.mixture) CUDA_CHECK_CLOSE(model.gate_host(), ref.gate, tol, "gate probabilities (logits forward)");
    const float eval_loss = model.forward(ref.ids, ref.targets, block.data(), cuda::ForwardMode::loss);
    CUDA_CHECK(scalar_error(eval_loss, ref.loss) <= loss_tol, "evaluation loss ", eval_loss, " vs CPU ", ref.loss);
    if (c.aux_loss_coef > 0.0f) {
        const double aux = model.aux_loss();
        CUDA_CHECK(std::abs(aux - ref.aux_loss) <= tol * std::max(ref.aux_loss, 1e-3), "aux loss ", aux, " vs CPU ",
                   ref.aux_loss);
    }

    const float train_loss = model.forward(ref.ids, ref.targets, block.data(), cuda::ForwardMode::train);
    CUDA_CHECK(scalar_error(train_loss, ref.loss) <= loss_tol, "train loss ", train_loss, " vs CPU ", ref.loss);
    if (c.mixture) CUDA_CHECK_CLOSE(model.gate_host(), ref.gate, tol, "gate probabilities (train forward)");
    cuda::DeviceArray<float> grad(ref.block.size());
    model.backward_to_prompt(grad.data());
    check_block(c, download(grad), ref.grad, tol, gate_tol, "d objective / d block");
}

const PromptInjectionCase injected{.mixture = false, .inject_layer = 1, .prompt_len = 5};
const PromptInjectionCase mixture{};  // E = 3 × 2 prompts at L_int = 1, d_g = 16, no input prompt
const PromptInjectionCase mixture_input_prompt{.inject_layer = 0, .input_prompt = 3};

}  // namespace

// 1. InjectedPrompt: layers below L_int see the text alone at positions K..S−1.
MOPT_CUDA_TEST(prompt_injection_f32_injected_prompt_matches_cpu) {
    check_against_cpu<float>(injected, 1e-4, 1e-4, 1e-4);
    PromptInjectionCase last = injected;  // at the last layer: one layer above the injection point
    last.inject_layer = 2;
    last.seed = 2;
    check_against_cpu<float>(last, 1e-4, 1e-4, 1e-4);
}

// 2. MixtureOfPrompts at L_int = 1: gate from the mean of the text rows entering layer 1, expert
// rows scaled by the gate at layers 1 and 2; the gradient reaches the prompt and both gate weights.
MOPT_CUDA_TEST(prompt_injection_f32_mixture_matches_cpu) { check_against_cpu<float>(mixture, 1e-4, 1e-4, 1e-4); }

// 3. MixtureOfPrompts with a frozen input prompt P¹ (set_input_prompt): at L_int = 0 the sequence is
// [P; P¹; text] from layer 0 on; at L_int = 2 layers 0 and 1 see [P¹; text] at positions K..S−1 and
// the gate averages the P¹ and text rows.
MOPT_CUDA_TEST(prompt_injection_f32_mixture_input_prompt_matches_cpu) {
    check_against_cpu<float>(mixture_input_prompt, 1e-4, 1e-4, 1e-4);
    PromptInjectionCase above = mixture_input_prompt;
    above.inject_layer = 2;
    above.seed = 3;
    check_against_cpu<float>(above, 1e-4, 1e-4, 1e-4);
}

MOPT_CUDA_TEST(prompt_injection_bf16_mixture_matches_cpu) {
    PromptInjectionCase c = mixture;
    c.input_prompt = 3;
    c.bf16_weights = true;
    check_against_cpu<bf16>(c, 3e-2, 2e-3, 0.35);
}

// 4. Top-2 gating at evaluation (the CPU's set_top_k(2) under NoGrad): the gate keeps its two
// largest values renormalised, in logits and loss mode; a train forward keeps the dense gate and its
// gradient; top-k 0 is dense again.
MOPT_CUDA_TEST(prompt_injection_f32_mixture_top_k_evaluation_matches_cpu) {
    for (const PromptInjectionCase& c : {mixture, mixture_input_prompt}) {
        const PromptInjectionReference ref = mopt::cuda_test::prompt_injection_reference(c);
        CUDA_CHECK(ref.top_k_margin > 1e-4, "test setup: the CPU's 2nd and 3rd gate values differ by only ",
                   ref.top_k_margin, ", too little for the top-2 choice to be robust to rounding");
        std::int64_t zeros = 0;
        for (float g : ref.top_k_gate) zeros += g == 0.0f;
        CUDA_CHECK(zeros == c.batch * (c.experts - c.top_k), "test setup: the CPU's top-2 gate has ", zeros,
                   " zeros");
        Setup<float> s(c, ref);
        cuda::DeviceLlama<float>& model = s.model;
        cuda::DeviceArray<float> block = device_prompt(ref.block);

        model.set_gate_top_k(c.top_k);
        model.forward_logits(ref.ids, block.data());
        CUDA_CHECK_CLOSE(model.gate_host(), ref.top_k_gate, 1e-4, "top-2 gate (logits forward)");
        CUDA_CHECK_CLOSE(model.logits_host(), ref.top_k_logits, 1e-4, "top-2 logits");
        const float eval_loss = model.forward(ref.ids, ref.targets, block.data(), cuda::ForwardMode::loss);
        CUDA_CHECK(scalar_error(eval_loss, ref.top_k_loss) <= 1e-4, "top-2 evaluation loss ", eval_loss, " vs CPU ",
                   ref.top_k_loss);
        CUDA_CHECK_CLOSE(model.gate_host(), ref.top_k_gate, 1e-4, "top-2 gate (loss forward)");

        const float train_loss = model.forward(ref.ids, ref.targets, block.data(), cuda::ForwardMode::train);
        CUDA_CHECK(scalar_error(train_loss, ref.loss) <= 1e-4, "train loss under top-k ", train_loss,
                   " vs the CPU's dense ", ref.loss);
        CUDA_CHECK_CLOSE(model.gate_host(), ref.gate, 1e-4, "train forward's gate (dense under top-k)");
        cuda::DeviceArray<float> grad(ref.block.size());
        model.backward_to_prompt(grad.data());
        check_block(c, download(grad), ref.grad, 1e-4, 1e-4, "gradient block of a train forward under top-k");

        model.set_gate_top_k(0);
        model.forward_logits(ref.ids, block.data());
        CUDA_CHECK_CLOSE(model.gate_host(), ref.gate, 1e-4, "gate after set_gate_top_k(0)");
        CUDA_CHECK_CLOSE(model.logits_host(), ref.logits, 1e-4, "logits after set_gate_top_k(0)");
    }
}

// 5. PromptTuner over the whole MoP block: three AdamW steps (prompt and gate weights, the same
// options, weight decay on all) equal train::AdamW over every trainable parameter the CPU's
// MixtureOfPrompts visits; with a clip below every step's norm, the global norm over the whole block
// (train::clip_grad_norm) binds at every step.
MOPT_CUDA_TEST(prompt_injection_f32_mixture_tuner_matches_cpu) {
    for (const float clip : {0.0f, 1e-3f}) {
        PromptInjectionCase c = mixture;
        c.input_prompt = clip > 0.0f ? 3 : 0;  // the frozen P¹ is no AdamW parameter on either side
        c.adamw_steps = 3;
        c.lr = 1e-2f;
        c.clip = clip;
        c.seed = 11;  // see the header: no element of the first gradient near 0
        const PromptInjectionReference ref = mopt::cuda_test::prompt_injection_reference(c);
        const std::string what = clip > 0.0f ? "clipped AdamW" : "AdamW";
        CUDA_CHECK(min_nonzero_ratio(c, ref.grad) > 1e-4, "test setup: an element of the first gradient is only ",
                   min_nonzero_ratio(c, ref.grad), " of its part's largest; AdamW's first step takes its sign");
        if (clip > 0.0f)
            for (float norm : ref.step_grad_norms)
                CUDA_CHECK(norm > 2 * clip, "test setup: the CPU gradient norm ", norm, " does not exceed the clip ",
                           clip, " enough for the test to clip");
        Setup<float> s(c, ref);
        cuda::PromptTuner<float> tuner(s.model, shape_of(c), ref.block, {.lr = c.lr, .weight_decay = c.weight_decay},
                                       c.clip);
        std::size_t mallocs_after_first = 0;
        for (int step = 0; step < c.adamw_steps; ++step) {
            tuner.step(ref.ids, ref.targets);
            const float loss = tuner.loss();
            CUDA_CHECK(scalar_error(loss, ref.step_losses[step]) <= 1e-4, what, " step ", step + 1, " loss ", loss,
                       " vs CPU ", ref.step_losses[step]);
            CUDA_CHECK(scalar_error(tuner.grad_norm(), ref.step_grad_norms[step]) <= 1e-4, what, " step ", step + 1,
                       " gradient norm ", tuner.grad_norm(), " vs CPU ", ref.step_grad_norms[step]);
            if (step == 0) mallocs_after_first = cuda::Allocator::instance().stats().cuda_malloc_calls;
        }
        check_block(c, tuner.prompt(), ref.tuned, 1e-4, 1e-4, "block after 3 " + what + " steps");
        CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs_after_first, what,
                   ": steps after the first called cudaMalloc");
        if (clip > 0.0f) {  // the gradient the last step used was scaled down to the bound
            double sq = 0.0;
            for (float g : tuner.gradient()) sq += static_cast<double>(g) * g;
            CUDA_CHECK(scalar_error(std::sqrt(sq), clip) <= 1e-4, "clipped gradient norm ", std::sqrt(sq), " vs ",
                       clip);
        }
    }
}

// 5b. A PromptTuner replaying a CUDA graph of the MoP step (input prompt, clipping) follows the eager
// tuner step for step, and its replays allocate nothing.
MOPT_CUDA_TEST(prompt_injection_f32_mixture_tuner_graph_replays_eager_steps) {
    PromptInjectionCase c = mixture;
    c.input_prompt = 3;
    const PromptInjectionReference ref = mopt::cuda_test::prompt_injection_reference(c);
    Setup<float> s(c, ref);
    const cuda::AdamWOptions opt{.lr = 1e-2f, .weight_decay = 0.01f};
    const float clip = 1e-2f;
    constexpr int steps = 5;

    std::vector<std::vector<float>> eager_blocks;
    std::vector<float> eager_losses;
    {
        cuda::PromptTuner<float> eager(s.model, shape_of(c), ref.block, opt, clip);
        for (int step = 0; step < steps; ++step) {
            eager.step(ref.ids, ref.targets);
            eager_losses.push_back(eager.loss());
            eager_blocks.push_back(eager.prompt());
        }
    }
    cuda::PromptTuner<float> graphed(s.model, shape_of(c), ref.block, opt, clip);
    graphed.use_graph();
    std::size_t mallocs = 0;
    for (int step = 0; step < steps; ++step) {
        graphed.step(ref.ids, ref.targets);
        CUDA_CHECK(graphed.graph_captured() == (step >= 1), "step ", step + 1, ": graph captured = ",
                   graphed.graph_captured());
        if (step == 1) mallocs = cuda::Allocator::instance().stats().cuda_malloc_calls;
        const float loss = graphed.loss();
        CUDA_CHECK(scalar_error(loss, eager_losses[step]) <= 1e-6, "step ", step + 1, " loss ", loss, " vs eager ",
                   eager_losses[step]);
        check_block(c, graphed.prompt(), eager_blocks[step], 1e-6, 1e-6, "block of the graph replay");
    }
    CUDA_CHECK(cuda::Allocator::instance().stats().cuda_malloc_calls == mallocs, "graph replays called cudaMalloc");
    CUDA_CHECK(eager_losses.back() < eager_losses.front(), "the loss did not fall over ", steps, " steps: ",
               eager_losses.front(), " -> ", eager_losses.back());
}

// 6. A Switch model (4 experts, top-1, every layer; switch.cu's FFN 64) with MoP at L_int = 1: the
// routed layers below the injection point see B·T rows, those above B·(K + T). Without and with the
// load-balancing loss in the objective (aux_weight · aux_loss, as train::prompt_step).
MOPT_CUDA_TEST(prompt_injection_f32_switch_mixture_matches_cpu) {
    PromptInjectionCase c = mixture;
    c.d_ff = 64;
    c.ffn_experts = 4;
    check_against_cpu<float>(c, 1e-4, 1e-4, 1e-4);
    c.aux_loss_coef = 0.1f;
    c.aux_weight = 1.0f;
    c.input_prompt = 3;
    c.seed = 4;
    check_against_cpu<float>(c, 1e-4, 1e-4, 1e-4);
}

// 7. Refused: K not divisible by E, L_int outside the model (by reserve, or at the latest the
// forward), an input prompt of the wrong size (or for a shape without one), a top-k below 0 or
// above E, a tuner block of the wrong size.
MOPT_CUDA_TEST(prompt_injection_refuses_bad_input) {
    mopt::nn::ModelConfig config;
    config.vocab_size = 97;
    config.d_model = 128;
    config.n_layers = 3;
    config.n_heads = 4;
    config.n_kv_heads = 2;
    config.d_ff = 256;
    config.max_seq = 256;
    const std::int64_t d = config.d_model;
    cuda::DeviceLlama<float> model(config, 1);
    const cuda::LlamaRunShape good{.batch = 2, .seq = 19, .prompt_len = 6, .inject_layer = 1, .experts = 3,
                                   .gate_dim = 16, .input_prompt = 3};
    const std::vector<std::int32_t> ids(static_cast<std::size_t>(good.batch * good.seq), 1);
    // The shape refused by reserve or, at the latest, by the forward.
    auto run = [&](const cuda::LlamaRunShape& s) {
        return error_of([&] {
            model.reserve(s);
            cuda::DeviceArray<float> block(static_cast<std::size_t>(s.trainable_values(d)));
            block.zero();
            model.forward_logits(ids, block.data());
            cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        });
    };

    cuda::LlamaRunShape s = good;
    s.prompt_len = 7;
    CUDA_CHECK(!run(s).empty(), "a MoP shape with K = 7 over E = 3 experts was accepted");
    s = good;
    s.inject_layer = config.n_layers;
    CUDA_CHECK(!run(s).empty(), "a MoP shape with inject_layer = n_layers was accepted");
    s = {.batch = 2, .seq = 19, .prompt_len = 5, .inject_layer = config.n_layers};
    CUDA_CHECK(!run(s).empty(), "an injected-prompt shape with inject_layer = n_layers was accepted");

    model.reserve(good);
    {  // a forward before set_input_prompt would run with P¹ = 0: refused
        cuda::DeviceArray<float> block(static_cast<std::size_t>(good.trainable_values(d)));
        block.zero();
        const std::string e = error_of([&] { model.forward_logits(ids, block.data()); });
        CUDA_CHECK(e.find("set_input_prompt was not called") != std::string::npos,
                   "a forward without the input prompt: got '", e, "'");
    }
    const std::vector<float> p1(static_cast<std::size_t>(good.input_prompt * d), 0.5f);
    const std::vector<float> short_p1(static_cast<std::size_t>((good.input_prompt - 1) * d), 0.5f);
    const std::vector<float> long_p1(static_cast<std::size_t>((good.input_prompt + 1) * d), 0.5f);
    CUDA_CHECK(error_of([&] { model.set_input_prompt(p1); }).empty(), "the right input prompt was refused: ",
               error_of([&] { model.set_input_prompt(p1); }));
    CUDA_CHECK(!error_of([&] { model.set_input_prompt(short_p1); }).empty(),
               "an input prompt of 2 rows for a shape of 3 was accepted");
    CUDA_CHECK(!error_of([&] { model.set_input_prompt(long_p1); }).empty(),
               "an input prompt of 4 rows for a shape of 3 was accepted");
    CUDA_CHECK(!error_of([&] { model.set_gate_top_k(-1); }).empty(), "top-k = -1 was accepted");
    {  // refused by set_gate_top_k or, at the latest, by the forward (set_gate_top_k may precede reserve)
        cuda::DeviceArray<float> block(static_cast<std::size_t>(good.trainable_values(d)));
        block.zero();
        CUDA_CHECK(!error_of([&] {
                       model.set_gate_top_k(good.experts + 1);
                       model.forward_logits(ids, block.data());
                   }).empty(),
                   "top-k = ", good.experts + 1, " over ", good.experts, " experts was accepted");
        model.set_gate_top_k(0);
    }

    const std::vector<float> small_block(static_cast<std::size_t>(good.trainable_values(d) - 1), 0.0f);
    CUDA_CHECK(!error_of([&] { cuda::PromptTuner<float> t(model, good, small_block); }).empty(),
               "a PromptTuner block of trainable_values - 1 values was accepted");

    s = good;
    s.input_prompt = 0;
    model.reserve(s);
    CUDA_CHECK(!error_of([&] { model.set_input_prompt(p1); }).empty(),
               "an input prompt for a shape reserved without one was accepted");
}
