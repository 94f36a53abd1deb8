#pragma once
// PromptTuner: prompt tuning (Lester et al. 2021) of a frozen DeviceLlama on the GPU. The trained
// values are the shape's block (LlamaRunShape::trainable_values): the prompt P [K, d] and, for a
// Mixture of Prompts, its gate's W₁ and W₂ after it ([P | W₁ | W₂], f32). The tuner keeps their f32
// master copy (the forward rounds P to the model's type as it builds the prompt rows) and their
// AdamW moments on the device; AdamW and clipping treat the block as the CPU treats the list of
// trainable parameters (one learning rate and weight decay, one global norm). One step:
//
//   upload ids, targets  ->  forward (train)  ->  backward_to_prompt: g = d loss / d block  ->  AdamW
//
// AdamW (Loshchilov & Hutter 2019) exactly as mopt/train/adamw.hpp, in one fused element-wise
// kernel: m = β₁m + (1 − β₁)g, v = β₂v + (1 − β₂)g², P −= lr·((m/(1 − β₁ᵗ)) / (√(v/(1 − β₂ᵗ)) + ε) + λP).
// The step count t lives on the device (a one-thread kernel advances it after the update), so a
// captured step replays with the right bias correction. Before the update, clipping by global norm
// as train/grad_clip.hpp (Pascanu et al. 2013): ‖g‖₂ is reduced on the device and, when it exceeds
// `clip` (> 0), the update kernel scales g by clip/‖g‖₂ (and stores the scaled g, as the CPU
// clips in place); the norm stays on the device for grad_norm(), so a graph replay needs no sync.
//
// CUDA graph: with use_graph(true), the first step runs eagerly (it warms the allocator's cache,
// cuBLAS and the kernels' attributes), the second is captured (stream capture of the model's stream)
// and replayed, and every later step replays it: one cudaGraphLaunch instead of ~30 launches per
// layer. The ids/targets upload stays outside the graph (a cudaMemcpyAsync before the launch). The
// graph holds raw pointers and the options: a reserve() of another shape on the model or
// set_options() drops it and the next step captures it again.
//
// Memory the graph uses without owning: cross_entropy allocates its 4-byte target count inside the
// step and frees it at the end. Captured, that block is baked into the graph but back in the
// allocator's cache, where a later allocation on the stream could take it and hold it across a
// replay. So after capturing, the tuner takes every cached block of that size class on the stream
// and keeps them as long as the graph lives.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/llama.cuh"

namespace mopt::backend::cuda {

// As mopt::train::AdamWOptions.
struct AdamWOptions {
    float lr = 1e-3f;
    float beta1 = 0.9f;
    float beta2 = 0.999f;
    float eps = 1e-8f;
    float weight_decay = 0.01f;
};

namespace prompt_tuner_detail {

// One AdamW update of w from g, at step *step + 1 (train/adamw.hpp's arithmetic, in f32).
// w, g, m, v: f32 [n]
// g is scaled by clip/‖g‖ first when clip > 0 and ‖g‖ = *norm exceeds it (and the scaled g stored).
// (The kernels are templates on the value type only so that this header can be included by several
// translation units: a non-template __global__ function would be defined in each.)
template <class F>
__global__ void adamw_kernel(F* w, float* g, float* m, float* v, std::int64_t n, const std::int64_t* step,
                             AdamWOptions o, const float* norm, float clip) {
    const float t = static_cast<float>(*step + 1);
    const float bc1 = 1.0f - powf(o.beta1, t), bc2 = 1.0f - powf(o.beta2, t);
    const float scale = clip > 0.0f && *norm > clip ? clip / *norm : 1.0f;
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
        float gi = g[i];
        if (scale != 1.0f) g[i] = gi = gi * scale;
        const float mi = o.beta1 * m[i] + (1.0f - o.beta1) * gi;
        const float vi = o.beta2 * v[i] + (1.0f - o.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float update = (mi / bc1) / (sqrtf(vi / bc2) + o.eps);
        w[i] -= o.lr * (update + o.weight_decay * w[i]);
    }
}

template <class I>
__global__ void advance_step_kernel(I* step) { *step += 1; }

// *norm = ‖g‖₂ (one block; the trained values are few). Partial sums in f64, as the CPU's.
template <class F>
__global__ void __launch_bounds__(1024) grad_norm_kernel(const F* g, std::int64_t n, F* norm) {
    __shared__ double partial[32];
    double s = 0.0;
    for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(g[i]) * g[i];
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < static_cast<int>(blockDim.x + 31) / 32; ++w) total += partial[w];
        *norm = static_cast<float>(sqrt(total));
    }
}

}  // namespace prompt_tuner_detail

template <DeviceFloat T>
class PromptTuner {
public:
    // prompt: host f32 [trainable_values(d)], the initial block (e.g. a CPU SoftPrompt's values; a
    // MixtureOfPrompts' prompt, gate.w1 and gate.w2 one after the other); shape.prompt_len = K >= 1.
    // clip: max global gradient norm (0: none; train::PromptTuningOptions's default is 1).
    PromptTuner(DeviceLlama<T>& model, const LlamaRunShape& shape, std::span<const float> prompt,
                AdamWOptions opt = {}, float clip = 0.0f)
        : model_(model), shape_(shape), opt_(opt), clip_(clip) {
        check(shape.prompt_len >= 1, "PromptTuner: the shape needs prompt rows (prompt_len = ", shape.prompt_len, ")");
        check(std::isfinite(clip) && clip >= 0.0f, "PromptTuner: clip (max gradient norm) must be >= 0, got ", clip);
        model_.reserve(shape_);
        const auto n = static_cast<std::size_t>(shape.trainable_values(model.config().d_model));
        cudaStream_t s = model_.stream();
        prompt_ = DeviceArray<float>(n, s);
        grad_ = DeviceArray<float>(n, s);
        m_ = DeviceArray<float>(n, s);
        v_ = DeviceArray<float>(n, s);
        step_ = DeviceArray<std::int64_t>(1, s);
        norm_ = DeviceArray<float>(1, s);
        set_prompt(prompt);
    }
    PromptTuner(const PromptTuner&) = delete;
    PromptTuner& operator=(const PromptTuner&) = delete;
    ~PromptTuner() {
        drop_graph();
        (void)cudaStreamSynchronize(model_.stream());  // the arrays go back to the cache with no work pending
    }

    // Replaces the trained block and restarts AdamW (zero moments, step 0). prompt: host f32 [trainable_values(d)]
    void set_prompt(std::span<const float> prompt) {
        check(prompt.size() == prompt_.size(), "PromptTuner::set_prompt: ", prompt.size(), " values for a prompt of [",
              shape_.prompt_len, ", ", model_.config().d_model, "]",
              shape_.experts > 0 ? " and its gate (W1, W2)" : "", ": ", prompt_.size(), " expected");
        check_cuda(cudaStreamSynchronize(model_.stream()), "cudaStreamSynchronize (PromptTuner::set_prompt)");
        prompt_.upload(prompt);  // a blocking copy on the legacy stream, which the model's stream does not wait for
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (PromptTuner::set_prompt)");
        m_.zero(model_.stream());
        v_.zero(model_.stream());
        step_.zero(model_.stream());
        grad_.zero(model_.stream());
        steps_ = 0;
        check_cuda(cudaStreamSynchronize(model_.stream()), "cudaStreamSynchronize (PromptTuner::set_prompt)");
    }
    // New hyper-parameters (a learning-rate schedule): take effect at the next step (recapture).
    void set_options(const AdamWOptions& opt) {
        opt_ = opt;
        drop_graph();
    }
    // Steps replay a captured CUDA graph (from the second step on) when on.
    void use_graph(bool on = true) {
        use_graph_ = on;
        if (!on) drop_graph();
    }

    // One prompt-tuning step on ids, targets: i32 [B, T]. Asynchronous: loss() reads its loss.
    void step(std::span<const std::int32_t> ids, std::span<const std::int32_t> targets) {
        check(!targets.empty(), "PromptTuner::step: targets are empty");
        model_.reserve(shape_);  // a no-op unless someone reserved another shape on the model
        if (graph_ && generation_ != model_.generation()) drop_graph();
        model_.set_batch(ids, targets);
        if (use_graph_ && !graph_ && steps_ >= 1) capture();
        if (graph_)
            check_cuda(cudaGraphLaunch(graph_, model_.stream()), "cudaGraphLaunch (PromptTuner::step)");
        else
            enqueue_step();
        ++steps_;
    }

    [[nodiscard]] float loss() const { return model_.loss(); }  // the last step's loss (synchronises)
    [[nodiscard]] std::int64_t steps() const { return steps_; }
    [[nodiscard]] bool graph_captured() const { return graph_ != nullptr; }
    [[nodiscard]] const float* prompt_device() const { return prompt_.data(); }
    [[nodiscard]] const float* gradient_device() const { return grad_.data(); }
    // Host copies (synchronise): the prompt after the last step and the gradient that step used.
    [[nodiscard]] std::vector<float> prompt() const { return download(prompt_); }
    [[nodiscard]] std::vector<float> gradient() const { return download(grad_); }
    [[nodiscard]] const LlamaRunShape& shape() const { return shape_; }
    [[nodiscard]] const AdamWOptions& options() const { return opt_; }
    [[nodiscard]] float clip() const { return clip_; }
    // ‖g‖₂ of the last step's gradient before clipping (synchronises; NaN when it was not finite).
    [[nodiscard]] float grad_norm() const {
        check(steps_ > 0, "PromptTuner::grad_norm: no step taken yet");
        return download(norm_)[0];
    }

private:
    // forward + backward_to_prompt + AdamW, all on the model's stream.
    void enqueue_step() {
        model_.enqueue_forward(prompt_.data(), ForwardMode::train);
        model_.enqueue_backward_to_prompt(grad_.data());
        const auto n = static_cast<std::int64_t>(prompt_.size());
        prompt_tuner_detail::grad_norm_kernel<<<1, 1024, 0, model_.stream()>>>(grad_.data(), n, norm_.data());
        prompt_tuner_detail::adamw_kernel<<<elementwise_blocks(n), elementwise_threads, 0, model_.stream()>>>(
            prompt_.data(), grad_.data(), m_.data(), v_.data(), n, step_.data(), opt_, norm_.data(), clip_);
        prompt_tuner_detail::advance_step_kernel<<<1, 1, 0, model_.stream()>>>(step_.data());
        check_launch("PromptTuner AdamW", "[", n, "]");
    }

    void capture() {
        cudaStream_t s = model_.stream();
        cudaGraph_t graph = nullptr;
        // Relaxed: the step's host-side calls that are not stream work (cudaFuncSetAttribute before each
        // attention launch, device attribute queries) are not refused while the stream captures.
        check_cuda(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
        try {
            enqueue_step();
        } catch (...) {
            (void)cudaStreamEndCapture(s, &graph);
            if (graph) (void)cudaGraphDestroy(graph);
            throw;
        }
        check_cuda(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture (PromptTuner)");
        const cudaError_t status = cudaGraphInstantiate(&graph_, graph, 0);
        (void)cudaGraphDestroy(graph);
        check_cuda(status, "cudaGraphInstantiate (PromptTuner)");
        generation_ = model_.generation();
        // Hold the step's transient blocks (see the header): every cached block a 4-byte request
        // could be given, until the allocator has none left and calls cudaMalloc.
        Allocator& alloc = Allocator::instance();
        for (;;) {
            const std::size_t mallocs = alloc.stats().cuda_malloc_calls;
            held_.emplace_back(sizeof(int), s);
            if (alloc.stats().cuda_malloc_calls != mallocs) break;
        }
    }

    void drop_graph() {
        if (graph_) {
            (void)cudaStreamSynchronize(model_.stream());
            (void)cudaGraphExecDestroy(graph_);
            graph_ = nullptr;
        }
        held_.clear();
    }

    static std::vector<float> download(const DeviceArray<float>& a) {
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (PromptTuner download)");
        std::vector<float> out(a.size());
        a.download(out);
        return out;
    }

    DeviceLlama<T>& model_;
    LlamaRunShape shape_;
    AdamWOptions opt_;
    float clip_ = 0.0f;
    DeviceArray<float> prompt_, grad_, m_, v_;  // f32 [trainable_values]: master block, its gradient, AdamW moments
    DeviceArray<float> norm_;                    // [1] ‖g‖₂ of the last step
    DeviceArray<std::int64_t> step_;             // AdamW steps taken (device)
    std::int64_t steps_ = 0;                     // steps enqueued (host)
    bool use_graph_ = false;
    cudaGraphExec_t graph_ = nullptr;
    std::uint64_t generation_ = 0;
    std::vector<DeviceBlock> held_;
};

}  // namespace mopt::backend::cuda
