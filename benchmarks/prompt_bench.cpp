// Benchmarks of one prompt-tuning step (train::prompt_step: forward, backward, gradient clipping
// and an AdamW step on the prompt only, the model frozen) for a randomly initialised Llama shaped
// like models/dense-brown (d_model 256, 4 layers, 8 heads, SwiGLU d_ff 512, vocabulary 4096, tied
// head, max_seq 256) at batch 8 × 128 text tokens:
//
//   BM_SoftPromptStep              SoftPrompt, K = 20 (at the input)
//   BM_InjectedPromptStep/L        InjectedPrompt, K = 20 at L_int = L (0..3): Tape::backward visits
//                                  no node recorded below L_int, so the step gets cheaper as L rises
//   BM_MixtureOfPromptsStep        MixtureOfPrompts, 7 experts × 4 prompts at L_int = 1, gate d_g 64
//   BM_FrozenForward               the model alone, forward under NoGrad: the floor of a step
//
// "tokens" counts text tokens per second (B · T per step; the prompt rows are not counted).
// Times are wall-clock (UseRealTime): the GEMMs run on several threads.
#include <benchmark/benchmark.h>

#include <mopt/mopt.hpp>
#include <mopt/train/prompt_tuning.hpp>
#include <cstdio>
#include <random>
#include <string>

using namespace mopt;

namespace {

constexpr std::int64_t batch = 8, text_len = 128;

// models/dense-brown/config.json's shape.
nn::ModelConfig dense_brown_shape() {
    return {.vocab_size = 4096, .d_model = 256, .n_layers = 4, .n_heads = 8, .d_ff = 512, .max_seq = 256,
            .tie_embeddings = true};
}

data::Batch random_batch(std::uint64_t seed) {
    data::Batch b;
    b.ids = Tensor::empty({batch, text_len}, DType::i32);
    std::mt19937_64 rng(seed);
    for (auto& v : b.ids.span<std::int32_t>()) v = static_cast<std::int32_t>(rng() % 4096);
    b.targets = nn::next_token_targets(b.ids);
    b.domains = Tensor::zeros({batch}, DType::i32);
    return b;
}

void count_tokens(benchmark::State& state) {
    state.counters["tokens"] =
        benchmark::Counter(static_cast<double>(batch * text_len), benchmark::Counter::kIsIterationInvariantRate);
}

// A frozen random model of prompt policy P with a prompt built from `pc`, stepped by AdamW.
template <class P>
void prompt_step_bench(benchmark::State& state, const prompt::PromptConfig& pc) {
    using Model = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::None, P>;
    Model model(dense_brown_shape(), 1);
    model.init_prompt(pc);
    train::freeze_model(model);
    const auto params = train::prompt_parameters(model);
    const auto every = train::prompt_parameters(model, /*trainable_only=*/false);
    train::AdamW opt(params, {.lr = 1e-3f, .weight_decay = 0.0f});  // as tune_prompt
    const data::Batch b = random_batch(9);
    autodiff::Tape tape;
    std::int64_t step = 0;
    // Two untimed steps: the tape's arena grows on the first and is consolidated on the second
    // (see mopt_bench's forward_bench).
    for (int i = 0; i < 2; ++i) train::prompt_step(model, tape, b, every, opt, {}, ++step);
    for (auto _ : state) {
        const train::PromptStepResult r = train::prompt_step(model, tape, b, every, opt, {}, ++step);
        benchmark::DoNotOptimize(r.loss);
    }
    count_tokens(state);
    state.counters["prompt_values"] = static_cast<double>(train::count_values(params));
}

}  // namespace

static void BM_SoftPromptStep(benchmark::State& state) {
    prompt::PromptConfig pc;
    pc.length = 20;
    prompt_step_bench<prompt::SoftPrompt>(state, pc);
}
BENCHMARK(BM_SoftPromptStep)->Unit(benchmark::kMillisecond)->UseRealTime();

static void BM_InjectedPromptStep(benchmark::State& state) {
    prompt::PromptConfig pc;
    pc.length = 20;
    pc.inject_layer = state.range(0);
    prompt_step_bench<prompt::InjectedPrompt>(state, pc);
}
BENCHMARK(BM_InjectedPromptStep)->ArgName("L_int")->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime();

static void BM_MixtureOfPromptsStep(benchmark::State& state) {
    prompt::PromptConfig pc;
    pc.experts = 7;
    pc.length = 7 * 4;
    pc.inject_layer = 1;
    pc.gate_dim = 64;
    prompt_step_bench<prompt::MixtureOfPrompts>(state, pc);
}
BENCHMARK(BM_MixtureOfPromptsStep)->Unit(benchmark::kMillisecond)->UseRealTime();

// The frozen model's forward alone (no prompt, no tape gradients): what a step cannot go below.
static void BM_FrozenForward(benchmark::State& state) {
    nn::Transformer<nn::Llama> model(dense_brown_shape(), 1);
    const data::Batch b = random_batch(9);
    autodiff::Tape tape;
    autodiff::NoGrad no_grad;
    for (int i = 0; i < 2; ++i) {
        tape.reset();
        benchmark::DoNotOptimize(model.forward(tape, b.ids, {.targets = &b.targets}).loss.value().raw());
    }
    for (auto _ : state) {
        tape.reset();
        benchmark::DoNotOptimize(model.forward(tape, b.ids, {.targets = &b.targets}).loss.value().raw());
    }
    count_tokens(state);
}
BENCHMARK(BM_FrozenForward)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    benchmark::AddCustomContext("openblas_core", backend::cpu::blas_core());
    benchmark::AddCustomContext("omp_threads", std::to_string(backend::cpu::max_threads()));
    if (const std::string warning = backend::cpu::blas_diagnostic(); !warning.empty())
        std::fprintf(stderr, "prompt_bench: %s\n", warning.c_str());
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
