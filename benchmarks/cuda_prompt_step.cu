// The issue-8 GPU benchmark: one prompt-tuning step (K prompt rows, frozen model, AdamW on the
// prompt) and the forward evaluation of a random Llama-shaped model in bf16 with mopt's CUDA backend
// (DeviceLlama + PromptTuner). One JSON line per shape on stdout; benchmarks/torch_prompt_step.py
// prints the same fields for PyTorch and benchmarks/cuda_vs_torch.sh compares them.
//
//   shapes: a = d 768, 12 layers, 12 heads, FFN 3072, vocab 32000, batch 8 x 512, K = 100
//           b = shape a with a Switch feed-forward in every layer: 8 experts of FFN 3072, top-1,
//               no capacity limit (no row dropped, as Hugging Face's Mixtral), aux loss not trained
//           c = d 4096, 32 layers, 32 heads, FFN 11008, vocab 32000, batch 1 x 1024, K = 100 (7B)
//           d = shape a with a Mixture of Prompts: 7 experts x 10 prompts (K = 70) injected at layer 3,
//               gate MLP width 64; AdamW on the prompts and the gate (prompt/mixture_of_prompts.hpp)
//
// Build (sm_90, no CMake):
//   nvcc -std=c++20 -O3 -arch=sm_90 -Xcompiler -march=x86-64-v4 --expt-relaxed-constexpr -Iinclude \
//        benchmarks/cuda_prompt_step.cu -o .cache/bin/cuda/cuda_prompt_step -lcublas -lcublasLt
// Run: .cache/bin/cuda/cuda_prompt_step [--shapes a,b,c,d] [--steps 20] [--warmup 3] [--peak-tflops 989]
//                                       [--chunk-rows 64]   (b: rows per expert GEMM problem, switch.cuh)
//
// Timing: CUDA events on the model's stream around `steps` back-to-back steps after `warmup` ones
// (the ids/targets upload is inside the timed loop, as in a training loop); step_ms is with the
// step replayed as a CUDA graph, step_eager_ms without. fwd_ms is a forward with the loss and no
// backward (evaluation), eager. Memory: activation_peak_bytes is the caching allocator's peak over
// the steps (activations, the prompt and its AdamW state; the weights sit outside it in exact-size
// buffers, weight_bytes); device_used_bytes is cudaMemGetInfo's total − free at the end (weights,
// cached blocks, CUDA context, cuBLAS workspaces). Switch shapes also print the rows each expert of
// layer 0 got in the last forward and the busiest expert's load over the mean, over all layers.
//
// Model FLOPs (stated, not measured): block ℓ runs over S_ℓ positions per sequence (S = K + T from
// the injection layer L_int on, T below it; L_int = 0 for shapes a-c), N_ℓ = B·S_ℓ rows:
//   P_ℓ   = d·(H + 2·Hkv)·Dh + H·Dh·d + 3·d·F            block ℓ's matmul weights
//           (+ d·E for a Switch layer's router: top-1 runs one expert's 3·d·F per token, the
//           FLOPs of the dense FFN; the padding rows of the expert GEMMs are not counted)
//   attn_ℓ = 4·B·H·Dh·S_ℓ(S_ℓ+1)/2                       causal QKᵀ and PV
//   head  = 2·B·T·d·V                                    logits of the text rows only
//   gate  = 2·B·(d·d_g + d_g·E)                          MoP's gate MLP (d only)
//   forward FLOPs  = Σ_ℓ (2·N_ℓ·P_ℓ + attn_ℓ) + head + gate
//   step FLOPs     = forward + Σ_{ℓ >= L_int} (2·N_ℓ·P_ℓ + 2·attn_ℓ) + head + 2·gate (the torch peer's count)
//                    frozen weights: the backward is the dX half (training would add 2·N·P for dW),
//                    attention backward = 2 x forward, and it stops at L_int (nothing below is trained)
//   mfu = FLOPs / time / peak (--peak-tflops: H100 SXM dense bf16 989; PCIe 756)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <mopt/backend/cuda/llama.cuh>
#include <mopt/backend/cuda/prompt_tuner.cuh>

namespace {

namespace cuda = mopt::backend::cuda;
using bf16 = __nv_bfloat16;

struct BenchShape {
    std::string name;
    mopt::nn::ModelConfig config;
    cuda::LlamaRunShape run;
};

BenchShape shape_by_name(const std::string& name) {
    mopt::nn::ModelConfig c;
    c.vocab_size = 32000;
    c.max_seq = 2048;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.tie_embeddings = false;
    if (name == "a") {
        c.d_model = 768, c.n_layers = 12, c.n_heads = 12, c.n_kv_heads = 12, c.d_ff = 3072;
        return {name, c, {.batch = 8, .seq = 512, .prompt_len = 100}};
    }
    if (name == "b") {
        c.d_model = 768, c.n_layers = 12, c.n_heads = 12, c.n_kv_heads = 12, c.d_ff = 3072;
        c.num_experts = 8, c.experts_per_token = 1, c.expert_interval = 1, c.capacity_factor = 0.0f;
        return {name, c, {.batch = 8, .seq = 512, .prompt_len = 100}};
    }
    if (name == "c") {
        c.d_model = 4096, c.n_layers = 32, c.n_heads = 32, c.n_kv_heads = 32, c.d_ff = 11008;
        return {name, c, {.batch = 1, .seq = 1024, .prompt_len = 100}};
    }
    if (name == "d") {
        c.d_model = 768, c.n_layers = 12, c.n_heads = 12, c.n_kv_heads = 12, c.d_ff = 3072;
        return {name, c,
                {.batch = 8, .seq = 512, .prompt_len = 70, .inject_layer = 3, .experts = 7, .gate_dim = 64}};
    }
    mopt::check(false, "cuda_prompt_step: unknown shape '", name, "' (a, b, c or d)");
    return {};
}

struct Flops {
    double forward = 0, step = 0;
};

Flops model_flops(const BenchShape& s) {
    const mopt::nn::ModelConfig& c = s.config;
    const cuda::LlamaRunShape& r = s.run;
    const double B = static_cast<double>(r.batch), T = static_cast<double>(r.seq);
    const double d = static_cast<double>(c.d_model), H = static_cast<double>(c.n_heads),
                 Hkv = static_cast<double>(c.kv_heads()), Dh = static_cast<double>(c.head_dim()),
                 F = static_cast<double>(c.d_ff), V = static_cast<double>(c.vocab_size);
    const double head = 2 * B * T * d * V;
    const double gate = 2 * B * static_cast<double>(r.gate_values(c.d_model));
    Flops f{head + gate, 2 * head + 3 * gate};  // step: forward + backward of the head, gate MLP forward + dW + dX
    for (std::int64_t l = 0; l < c.n_layers; ++l) {
        const double S = static_cast<double>(r.positions_at(l)), N = B * S;
        const double p = d * (H + 2 * Hkv) * Dh + H * Dh * d + 3 * d * F +
                         (c.has_experts(l) ? d * static_cast<double>(c.num_experts) : 0.0);  // router
        const double attn = 4 * B * H * Dh * S * (S + 1) / 2;
        f.forward += 2 * N * p + attn;
        if (l >= r.inject_layer) f.step += 2 * N * p + 2 * attn;
    }
    f.step += f.forward - head - gate;  // the step runs the forward too (its head and gate are counted above)
    return f;
}

class Timer {
public:
    explicit Timer(cudaStream_t s) : stream_(s) {
        cuda::check_cuda(cudaEventCreate(&start_), "cudaEventCreate");
        cuda::check_cuda(cudaEventCreate(&stop_), "cudaEventCreate");
    }
    ~Timer() {
        cudaEventDestroy(start_);
        cudaEventDestroy(stop_);
    }
    void start() { cuda::check_cuda(cudaEventRecord(start_, stream_), "cudaEventRecord"); }
    // Milliseconds since start() (synchronises).
    float stop() {
        cuda::check_cuda(cudaEventRecord(stop_, stream_), "cudaEventRecord");
        cuda::check_cuda(cudaEventSynchronize(stop_), "cudaEventSynchronize");
        float ms = 0;
        cuda::check_cuda(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
        return ms;
    }

private:
    cudaStream_t stream_;
    cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

std::size_t device_used_bytes() {
    std::size_t free_bytes = 0, total = 0;
    cuda::check_cuda(cudaMemGetInfo(&free_bytes, &total), "cudaMemGetInfo");
    return total - free_bytes;
}

void run_shape(const BenchShape& s, int steps, int warmup, double peak_tflops, std::int64_t chunk_rows) {
    cuda::Allocator& alloc = cuda::Allocator::instance();
    alloc.release_cached();
    const std::size_t used_before = device_used_bytes();
    cuda::DeviceLlama<bf16> model(s.config, /*seed=*/1234, {.expert_chunk_rows = chunk_rows});
    const cuda::LlamaRunShape& r = s.run;

    // A batch of random tokens with next-token targets inside each sequence (the last one: -100).
    std::mt19937_64 rng(7);
    std::uniform_int_distribution<std::int32_t> token(0, static_cast<std::int32_t>(s.config.vocab_size) - 1);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(r.text_rows())), targets(ids.size());
    for (auto& v : ids) v = token(rng);
    for (std::int64_t b = 0; b < r.batch; ++b)
        for (std::int64_t t = 0; t < r.seq; ++t)
            targets[b * r.seq + t] = t + 1 < r.seq ? ids[b * r.seq + t + 1] : -100;
    // The trained block: the prompt rows at the scale of the model's token embeddings, then (MoP) the
    // gate's W₁ [d_g, d] and W₂ [E, d_g] uniform ±1/√fan_in as prompt::Gate draws them.
    const std::int64_t d = s.config.d_model, prompt_values = r.prompt_len * d;
    std::vector<float> prompt(static_cast<std::size_t>(r.trainable_values(d)));
    std::normal_distribution<float> init(0.0f, 0.02f);
    for (std::int64_t i = 0; i < prompt_values; ++i) prompt[i] = init(rng);
    for (std::int64_t i = prompt_values; i < static_cast<std::int64_t>(prompt.size()); ++i) {
        const bool w1 = i < prompt_values + r.gate_dim * d;
        const float a = 1.0f / std::sqrt(static_cast<float>(w1 ? d : r.gate_dim));
        prompt[i] = std::uniform_real_distribution<float>(-a, a)(rng);
    }

    alloc.reset_peak();
    const cuda::AdamWOptions adamw{.lr = 1e-3f, .weight_decay = 0.0f};
    Timer timer(model.stream());
    float step_eager_ms = 0, step_graph_ms = 0, loss = 0;
    {
        cuda::PromptTuner<bf16> tuner(model, r, prompt, adamw);
        for (int i = 0; i < warmup; ++i) tuner.step(ids, targets);
        timer.start();
        for (int i = 0; i < steps; ++i) tuner.step(ids, targets);
        step_eager_ms = timer.stop() / static_cast<float>(steps);

        tuner.use_graph();
        for (int i = 0; i < warmup; ++i) tuner.step(ids, targets);  // the first of these captures
        timer.start();
        for (int i = 0; i < steps; ++i) tuner.step(ids, targets);
        step_graph_ms = timer.stop() / static_cast<float>(steps);
        loss = tuner.loss();
    }
    // The evaluation forward: loss, no dlogits, nothing for a backward is needed (the buffers exist anyway).
    cuda::DeviceArray<float> eval_prompt(prompt.size(), model.stream());
    eval_prompt.upload(prompt);
    cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    for (int i = 0; i < warmup; ++i) {
        model.set_batch(ids, targets);
        model.enqueue_forward(eval_prompt.data(), cuda::ForwardMode::loss);
    }
    timer.start();
    for (int i = 0; i < steps; ++i) {
        model.set_batch(ids, targets);
        model.enqueue_forward(eval_prompt.data(), cuda::ForwardMode::loss);
    }
    const float fwd_ms = timer.stop() / static_cast<float>(steps);
    const float eval_loss = model.loss();

    const Flops f = model_flops(s);
    const double text_tokens = static_cast<double>(r.text_rows());
    const double peak = peak_tflops * 1e12;
    cudaDeviceProp prop{};
    int device = 0;
    cuda::check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    cuda::check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    const cuda::AllocatorStats st = alloc.stats();
    std::ostringstream os;
    os << "{\"impl\": \"mopt_cuda\", \"shape\": \"" << s.name << "\", \"device\": \"" << prop.name
       << "\", \"dtype\": \"bf16\", \"d_model\": " << s.config.d_model << ", \"layers\": " << s.config.n_layers
       << ", \"heads\": " << s.config.n_heads << ", \"kv_heads\": " << s.config.kv_heads()
       << ", \"d_ff\": " << s.config.d_ff << ", \"vocab\": " << s.config.vocab_size << ", \"batch\": " << r.batch
       << ", \"seq\": " << r.seq << ", \"prompt_len\": " << r.prompt_len << ", \"params\": " << model.num_parameters()
       << ", \"steps\": " << steps << ", \"step_ms\": " << step_graph_ms << ", \"step_eager_ms\": " << step_eager_ms
       << ", \"step_tokens_per_s\": " << text_tokens / (step_graph_ms * 1e-3) << ", \"fwd_ms\": " << fwd_ms
       << ", \"fwd_tokens_per_s\": " << text_tokens / (fwd_ms * 1e-3) << ", \"step_flops\": " << f.step
       << ", \"fwd_flops\": " << f.forward << ", \"step_mfu\": " << f.step / (step_graph_ms * 1e-3) / peak
       << ", \"fwd_mfu\": " << f.forward / (fwd_ms * 1e-3) / peak << ", \"peak_tflops\": " << peak_tflops
       << ", \"activation_peak_bytes\": " << st.peak_bytes << ", \"weight_bytes\": " << model.weight_bytes()
       << ", \"device_used_bytes\": " << device_used_bytes() << ", \"device_used_before_bytes\": " << used_before
       << ", \"loss\": " << loss << ", \"eval_loss\": " << eval_loss;
    if (r.experts > 0)
        os << ", \"mop_experts\": " << r.experts << ", \"mop_per_expert\": " << r.per_expert()
           << ", \"inject_layer\": " << r.inject_layer << ", \"gate_dim\": " << r.gate_dim;
    if (s.config.num_experts > 0) {
        // The routing of the last (evaluation) forward: layer 0's rows per expert, drops, max / mean load.
        const std::vector<cuda::SwitchStats> routing = model.expert_stats();
        double worst = 0;
        std::int64_t dropped = 0;
        for (const cuda::SwitchStats& st : routing) {
            std::int64_t most = 0;
            for (std::int64_t a : st.assigned) most = std::max(most, a);
            worst = std::max(worst, static_cast<double>(most) * static_cast<double>(st.assigned.size()) /
                                        static_cast<double>(st.tokens));
            dropped += st.dropped;
        }
        os << ", \"experts\": " << s.config.num_experts << ", \"experts_per_token\": " << s.config.experts_per_token
           << ", \"capacity_factor\": " << s.config.capacity_factor << ", \"expert_chunk_rows\": " << chunk_rows
           << ", \"expert_rows_layer0\": [";
        for (std::size_t e = 0; e < routing.at(0).assigned.size(); ++e)
            os << (e ? ", " : "") << routing[0].assigned[e];
        os << "], \"expert_load_max_over_mean\": " << worst << ", \"expert_rows_dropped\": " << dropped;
    }
    os << "}";
    std::printf("%s\n", os.str().c_str());
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    std::string shapes = "a,c";
    int steps = 20, warmup = 3;
    std::int64_t chunk_rows = 64;
    double peak_tflops = 989.0;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "cuda_prompt_step: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--shapes") shapes = value();
        else if (a == "--steps") steps = std::atoi(value().c_str());
        else if (a == "--warmup") warmup = std::atoi(value().c_str());
        else if (a == "--peak-tflops") peak_tflops = std::atof(value().c_str());
        else if (a == "--chunk-rows") chunk_rows = std::atoll(value().c_str());
        else {
            std::fprintf(stderr, "usage: cuda_prompt_step [--shapes a,b,c,d] [--steps 20] [--warmup 3] [--peak-tflops 989] "
                                 "[--chunk-rows 64]\n");
            return 2;
        }
    }
    if (cuda::device_count() == 0) {
        std::fprintf(stderr, "cuda_prompt_step: no CUDA device\n");
        return 77;
    }
    if (steps < 1 || warmup < 2) {
        std::fprintf(stderr, "cuda_prompt_step: --steps must be >= 1 and --warmup >= 2 (the graph is captured in it)\n");
        return 2;
    }
    try {
        std::stringstream list(shapes);
        for (std::string name; std::getline(list, name, ',');)
            if (!name.empty()) run_shape(shape_by_name(name), steps, warmup, peak_tflops, chunk_rows);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cuda_prompt_step: %s\n", e.what());
        return 1;
    }
    return 0;
}
