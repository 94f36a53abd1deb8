// Benchmarks of the CPU backend's hot paths: the GEMM behind every linear layer, a linear layer's
// forward + backward through the tape, and causal attention forward + backward.
// Counters report FLOP/s (a multiply-add counts as 2 FLOPs).
#include <benchmark/benchmark.h>

#include <mopt/mopt.hpp>
#include <cstdio>
#include <random>
#include <string>

using namespace mopt;
using namespace mopt::autodiff;

namespace {
Tensor random(Shape s, std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    Tensor t = Tensor::empty(s);
    for (float& v : t.span()) v = d(rng);
    return t;
}
// Reports FLOP/s (shown with an SI prefix, e.g. "FLOPS=198G/s").
void gflops(benchmark::State& state, double flops_per_iteration) {
    state.counters["FLOPS"] =
        benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}
}  // namespace

// C[n, n] = A[n, n] B[n, n]ᵀ, the layout of a linear layer.
static void BM_Gemm(benchmark::State& state) {
    const std::int64_t n = state.range(0);
    Tensor a = random({n, n}, 1), b = random({n, n}, 2), c = Tensor::zeros({n, n});
    for (auto _ : state) {
        backend::cpu::gemm({.trans_b = true, .m = n, .n = n, .k = n, .a = a.f32(), .lda = n, .b = b.f32(), .ldb = n,
                            .c = c.f32(), .ldc = n});
        benchmark::DoNotOptimize(c.f32());
    }
    gflops(state, 2.0 * n * n * n);
}
BENCHMARK(BM_Gemm)->Arg(128)->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond);

// Linear layer [tokens, d] x [4d, d]ᵀ, forward and backward (dx and dW) through the tape.
static void BM_LinearForwardBackward(benchmark::State& state) {
    const std::int64_t tokens = state.range(0), d = state.range(1);
    Parameter w("w", random({4 * d, d}, 3));
    Tensor x = random({tokens, d}, 4);
    Tape tape;
    for (auto _ : state) {
        tape.reset();
        Var in = tape.input(x);
        tape.backward(sum(linear(in, tape.parameter(w))));
        w.zero_grad();
    }
    gflops(state, 3 * 2.0 * tokens * d * 4 * d);
}
BENCHMARK(BM_LinearForwardBackward)->Args({512, 256})->Args({1024, 512})->Unit(benchmark::kMillisecond);

// Causal attention (B=1, H heads of 64, T tokens), forward only and forward + backward.
static void attention_bench(benchmark::State& state, bool backward) {
    const std::int64_t T = state.range(0), H = state.range(1), Dh = 64;
    Tensor q = random({1, T, H, Dh}, 5), k = random({1, T, H, Dh}, 6), v = random({1, T, H, Dh}, 7);
    Tape tape;
    auto step = [&] {
        tape.reset();
        Var vq = tape.input(q, backward), vk = tape.input(k, backward), vv = tape.input(v, backward);
        Var o = attention(vq, vk, vv);
        if (backward) tape.backward(sum(o));
        benchmark::DoNotOptimize(o.value().raw());
    };
    for (int i = 0; i < 2; ++i) step();  // untimed: grow and consolidate the arena (see forward_bench)
    for (auto _ : state) step();
    // QKᵀ and PV each 2·T²·Dh per head (the causal half is still computed); backward ≈ 2× forward.
    gflops(state, (backward ? 3.0 : 1.0) * 4.0 * H * T * T * Dh);
}
static void BM_AttentionForward(benchmark::State& state) { attention_bench(state, false); }
static void BM_AttentionForwardBackward(benchmark::State& state) { attention_bench(state, true); }
BENCHMARK(BM_AttentionForward)->Args({256, 8})->Args({512, 8})->Unit(benchmark::kMillisecond);
BENCHMARK(BM_AttentionForwardBackward)->Args({256, 8})->Args({512, 8})->Unit(benchmark::kMillisecond);

// Whole-model forward (evaluation, under NoGrad): a Llama-shaped model of `layers` layers, d=256,
// 8 heads, SwiGLU 688, vocabulary 4096, batch 4 × 256 tokens; `switch` replaces every layer's
// feed-forward by 8 Switch experts (top-1). Reports tokens/s.
namespace {
nn::ModelConfig bench_config(std::int64_t layers, bool with_experts) {
    nn::ModelConfig c{.vocab_size = 4096, .d_model = 256, .n_layers = layers, .n_heads = 8, .d_ff = 688, .max_seq = 256};
    if (with_experts) c.num_experts = 8;
    return c;
}
template <class Model>
void forward_bench(benchmark::State& state, Model& model) {
    const std::int64_t B = 4, T = 256;
    Tensor ids = Tensor::empty({B, T}, DType::i32);
    std::mt19937_64 rng(9);
    for (auto& v : ids.span<std::int32_t>()) v = static_cast<std::int32_t>(rng() % 4096);
    Tape tape;
    NoGrad no_grad;
    // Two untimed passes, as cpu_vs_torch.py warms PyTorch up: the tape's first step grows its arena
    // block by block and the second consolidates it into one fresh block, so both take page faults
    // on new memory that a steady evaluation loop never sees. Google Benchmark calls this function
    // anew (with a new tape) for every run and repetition, and a slow model's first run of one
    // iteration can already pass --benchmark_min_time, so without the warm-up those cold steps
    // were most of what was measured, more so the deeper the model.
    for (int i = 0; i < 2; ++i) {
        tape.reset();
        benchmark::DoNotOptimize(model.forward(tape, ids).logits.value().raw());
    }
    for (auto _ : state) {
        tape.reset();
        nn::ForwardOutput out = model.forward(tape, ids);
        benchmark::DoNotOptimize(out.logits.value().raw());
    }
    state.counters["tokens"] = benchmark::Counter(static_cast<double>(B * T), benchmark::Counter::kIsIterationInvariantRate);
}
}  // namespace
static void BM_TransformerForward(benchmark::State& state) {
    const std::int64_t layers = state.range(0);
    if (state.range(1) == 0) {
        nn::Transformer<nn::Llama> model(bench_config(layers, false), 1);
        forward_bench(state, model);
    } else {
        nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>> model(bench_config(layers, true), 1);
        forward_bench(state, model);
    }
}
BENCHMARK(BM_TransformerForward)->Args({2, 0})->Args({6, 0})->Args({2, 1})->Args({6, 1})->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    benchmark::AddCustomContext("openblas_core", backend::cpu::blas_core());
    benchmark::AddCustomContext("omp_threads", std::to_string(backend::cpu::max_threads()));
    if (const std::string warning = backend::cpu::blas_diagnostic(); !warning.empty())
        std::fprintf(stderr, "mopt_bench: %s\n", warning.c_str());
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
