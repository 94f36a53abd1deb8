#pragma once
// DeviceLlama: a frozen Llama-family model (RMSNorm, rotary GQA attention, SwiGLU, pre-norm) on the
// GPU, run as mopt's CPU model with a SoftPrompt runs it (nn/transformer.hpp, prompt/soft_prompt.hpp),
// for prompt tuning (Lester et al. 2021) and its evaluation:
//
//   x₀ = [P; E[ids]]                  K prompt rows before the T text embeddings   [B, S = K + T, d]
//   positions 0..S−1                  RoPE (half style) over prompt and text (PEFT's numbering)
//   x_mid = x + o_proj(attn(norm(x)))  causal over [prompt; text] (PEFT: prompt row i sees rows ≤ i)
//   x'    = x_mid + down(silu(gate(norm(x_mid))) ⊙ up(norm(x_mid)))
//   logits = norm(x_L)[text rows] Wᵀ  W = lm_head, or embed_tokens when tied       [B, T, vocab]
//   loss   = mean over targets ≠ −100 of −log softmax(logits)[target]
//
// backward_to_prompt() computes d loss / d P only. The weights are frozen: no weight-gradient GEMM
// runs, only the chain of input gradients (llm.c's backward with every dW line removed): dgrad
// GEMMs dX = dY·W, the norm, RoPE, SwiGLU and attention backwards, and the residual adds.
//
// backward_weights() (pretraining, no prompt) adds the weight gradients, all f32 in
// one block (weight_gradient_layout(): Hugging Face names, offsets, sizes): per projection one wgrad
// GEMM dW = dYᵀ·X (bf16 inputs, f32 output), the norms' gains in their backward pass, the head's
// [V, d] GEMM and the embedding rows by atomic scatter-add (tied: into the same block); Switch
// layers' routers and experts in DeviceSwitchFFN::backward (per-expert wgrads over the sorted rows). The GEMM
// inputs the frozen backward never needed — norm(x), norm(x_mid) and silu(gate) ⊙ up — are
// recomputed from what the forward saved (x, x_mid, gate|up) instead of kept: no extra memory.
// update_weights() uploads changed host weights into the same buffers (an optimizer step on the host).
//
// Fewer, larger launches: Wq, Wk, Wv are stored stacked and run as one strided-batched GEMM into
// q, k, v planes (RoPE then runs once over the adjacent q and k planes); Wgate and Wup are stacked
// so gate|up is one GEMM and its backward one GEMM over the packed d gate|d up; each norm's
// backward adds into the residual gradient in the same pass.
//
// Memory: weights live in exact-size cudaMalloc buffers (DeviceBuffer, allocated at construction);
// every activation of a (batch, seq, prompt_len) shape comes from the caching allocator once, in
// reserve(), and is reused by every step. A step makes no allocation (cross_entropy's 4-byte count
// is served by the allocator's cache) and no host↔device copy except the ids/targets upload
// (pinned staging, cudaMemcpyAsync) and, when asked, the loss read back at the end; all its work is
// on the model's own stream, so it can be captured into a CUDA graph (prompt_tuner.cuh).
//
// What the forward saves for the backward (per layer): the residual inputs x and x_mid (the norms'
// inputs), the roped q, k and v and the attention output with its logsumexp (FlashAttention-2's
// backward recomputes P from them), the norms' 1/rms, and the gate and up projections (the SwiGLU
// backward; the backward overwrites them with their gradients). The normed inputs and the SwiGLU
// output are not saved: a frozen weight needs no dW = Xᵀ·dY, so nothing reads them in the backward.
//
// Switch models (config.num_experts > 0, top-1): the layers config.has_experts(l) marks run
// switch.cuh's DeviceSwitchFFN in place of the dense feed-forward, x' = x_mid + p·E_i(norm(x_mid)),
// and save its routing instead of gate|up; the backward goes through the experts and the router, and
// adds LlamaOptions::aux_loss_weight × the layers' auxiliary losses to the objective (as
// train::prompt_step's aux_loss_coef). expert_stats() reads the last forward's routing.
//
// Prompts at an intermediate layer (LlamaRunShape::inject_layer = L_int > 0: InjectedPrompt, and
// MixtureOfPrompts with experts > 0), as the CPU's prompt policies run them: the blocks below L_int
// see the rows [P¹; text] (P¹: MoP's frozen input prompt, often none) at positions K..S−1; at the
// input of block L_int the K prompt rows are prepended (positions 0..K−1); the head reads the text
// rows. A Mixture of Prompts (gate.cuh) computes its gate g [B, E] from the mean of block L_int's
// input over its non-prompt rows and scales expert e's p rows by g[b, e] at the input of every block
// from L_int on (keeping the unscaled rows for the backward). The backward walks down to L_int only:
// nothing below it is trainable (d P, then d W₁, d W₂ through the gate). The trained values are one
// f32 block, [P | W₁ | W₂] (LlamaRunShape::trainable_values), which the forward reads and the
// backward writes. Switch layers below L_int route their own (fewer) rows: a second DeviceSwitchFFN.
//
// T = float or __nv_bfloat16 is the storage of weights and activations (chosen at construction);
// norm weights, statistics, the prompt master copy and its gradient are f32; math is f32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "mopt/backend/cuda/activation.cuh"
#include "mopt/backend/cuda/allocator.cuh"
#include "mopt/backend/cuda/attention.cuh"
#include "mopt/backend/cuda/blas.cuh"
#include "mopt/backend/cuda/common.cuh"
#include "mopt/backend/cuda/cross_entropy.cuh"
#include "mopt/backend/cuda/device.cuh"
#include "mopt/backend/cuda/gate.cuh"
#include "mopt/backend/cuda/llama_weights.hpp"
#include "mopt/backend/cuda/norm.cuh"
#include "mopt/backend/cuda/rope.cuh"
#include "mopt/backend/cuda/switch.cuh"
#include "mopt/nn/config.hpp"

namespace mopt::backend::cuda {

// The sizes of one step: B sequences of T text tokens, and the prompt rows around them.
//
// Prompts, as the CPU's prompt policies place them (positions: the CPU's, see the header):
//   prompt_len = 0:                      the model alone;
//   prompt_len = K, experts = 0:         K trainable rows prepended at the input of block
//                                        inject_layer (SoftPrompt at 0, InjectedPrompt above);
//   experts = E >= 1:                    a Mixture of Prompts: the K = E·p rows are E experts' groups
//                                        of p, scaled per sequence by a gate MLP of width gate_dim
//                                        at the input of every block >= inject_layer, after
//                                        input_prompt frozen rows P¹ prepended at the embeddings.
struct LlamaRunShape {
    std::int64_t batch = 1;         // B
    std::int64_t seq = 0;           // T: text tokens per sequence (ids and targets are [B, T])
    std::int64_t prompt_len = 0;    // K: trainable prompt rows (0: the model alone)
    std::int64_t inject_layer = 0;  // L_int: the block whose input the K rows join (0: the embeddings)
    std::int64_t experts = 0;       // MoP: E expert groups of K / E rows, gated (0: a plain prompt)
    std::int64_t gate_dim = 0;      // MoP: d_g of the gate MLP
    std::int64_t input_prompt = 0;  // MoP: p₁ frozen input-prompt rows (DeviceLlama::set_input_prompt)

    [[nodiscard]] std::int64_t positions() const { return prompt_len + input_prompt + seq; }  // S = K + p₁ + T
    [[nodiscard]] std::int64_t lower_positions() const { return input_prompt + seq; }  // blocks < L_int
    [[nodiscard]] std::int64_t positions_at(std::int64_t layer) const {
        return layer < inject_layer ? lower_positions() : positions();
    }
    [[nodiscard]] std::int64_t rows() const { return batch * positions(); }   // N = B·S
    [[nodiscard]] std::int64_t rows_at(std::int64_t layer) const { return batch * positions_at(layer); }
    [[nodiscard]] std::int64_t text_rows() const { return batch * seq; }      // B·T
    [[nodiscard]] std::int64_t text_offset() const { return prompt_len + input_prompt; }  // first text position
    [[nodiscard]] std::int64_t per_expert() const { return experts > 0 ? prompt_len / experts : 0; }
    // The trained values, one f32 block: [prompt K·d | gate.w1 d_g·d | gate.w2 E·d_g] (MoP: the gate's too).
    [[nodiscard]] std::int64_t gate_values(std::int64_t d) const {
        return experts > 0 ? gate_dim * d + experts * gate_dim : 0;
    }
    [[nodiscard]] std::int64_t trainable_values(std::int64_t d) const { return prompt_len * d + gate_values(d); }
    friend bool operator==(const LlamaRunShape&, const LlamaRunShape&) = default;
};

struct LlamaOptions {
    GemmCompute compute = GemmCompute::f32;                // f32 models: exact f32 or tf32 GEMMs
    AttentionKernel attention = AttentionKernel::automatic;  // bf16: tensor cores when aligned
    float aux_loss_weight = 0.0f;         // Switch: the objective is loss + this × Σ layers' aux loss
    std::int64_t expert_chunk_rows = 64;  // Switch: rows per expert GEMM problem (switch.cuh)
};

// What a forward computes: logits only (evaluation, generation), the loss as well (evaluation), or
// the loss with d loss / d logits written over the logits and everything the backward needs (train);
// keep: the logits and everything the backward needs, the loss and d loss / d logits left to the
// caller (set_logits_gradient before the backward: a loss computed elsewhere, e.g. on a tape).
enum class ForwardMode { logits, loss, train, keep };

namespace llama_detail {

#define MOPT_LLAMA_GRID_STRIDE(i, n)                                                                   \
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < (n); \
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

// x₀[b, s] = first[s] for s < A, second[s − A] for A <= s < A + A₂, else E[ids[b, s − A − A₂]]: the
// prompt rows the embeddings start with (SoftPrompt: P; MoP at L_int = 0: P, P¹; MoP above: P¹).
// ids: i32 [B, T], table: [vocab, d], first: f32 [A, d], second: f32 [A₂, d] -> x: [B, A + A₂ + T, d]
template <class T>
__global__ void embed_with_prompt_kernel(const std::int32_t* ids, const T* table, const float* first,
                                         int first_rows, const float* second, int second_rows, T* x,
                                         std::int64_t rows, int seq, int d) {
    const int prefix = first_rows + second_rows, positions = seq + prefix;
    MOPT_LLAMA_GRID_STRIDE(e, rows * d) {
        const std::int64_t r = e / d;
        const int j = static_cast<int>(e % d), s = static_cast<int>(r % positions);
        const std::int64_t b = r / positions;
        x[e] = s < first_rows ? from_f32<T>(first[static_cast<std::int64_t>(s) * d + j])
               : s < prefix   ? from_f32<T>(second[static_cast<std::int64_t>(s - first_rows) * d + j])
                              : table[static_cast<std::int64_t>(ids[b * seq + (s - prefix)]) * d + j];
    }
}

// The input of block L_int > 0: the K prompt rows before the rows the blocks below produced
// (InjectedPrompt's and MoP's prepend). prompt: f32 [K, d], lower: [B, S − K, d] -> x: [B, S, d]
template <class T>
__global__ void inject_prompt_kernel(const float* prompt, const T* lower, T* x, std::int64_t rows, int positions,
                                     int prompt_len, int d) {
    MOPT_LLAMA_GRID_STRIDE(e, rows * d) {
        const std::int64_t r = e / d;
        const int j = static_cast<int>(e % d), s = static_cast<int>(r % positions);
        const std::int64_t b = r / positions;
        x[e] = s < prompt_len ? from_f32<T>(prompt[static_cast<std::int64_t>(s) * d + j])
                              : lower[(b * (positions - prompt_len) + (s - prompt_len)) * d + j];
    }
}

// The prompt is broadcast over the batch, so its gradient sums the batch's prompt rows:
// dP[k, j] = Σ_b dx₀[b, k, j]. dx: [B, S, d] -> dprompt: f32 [K, d]
template <class T>
__global__ void prompt_gradient_kernel(const T* dx, float* dprompt, int batch, std::int64_t batch_stride,
                                       std::int64_t prompt_values) {
    MOPT_LLAMA_GRID_STRIDE(i, prompt_values) {
        float s = 0.0f;
        for (int b = 0; b < batch; ++b) s += to_f32(dx[b * batch_stride + i]);
        dprompt[i] = s;
    }
}

// The embedding's gradient: dE[ids[r]] += dx₀[r] for every row (no prompt rows: pretraining).
// ids: i32 [rows], dx: [rows, d] -> dtable: f32 [vocab, d] (accumulated, atomically: ids repeat)
template <class T>
__global__ void embedding_backward_kernel(const std::int32_t* ids, const T* dx, float* dtable, std::int64_t rows,
                                          int d) {
    MOPT_LLAMA_GRID_STRIDE(e, rows * d) {
        const std::int64_t r = e / d;
        atomicAdd(dtable + static_cast<std::int64_t>(ids[r]) * d + e % d, to_f32(dx[e]));
    }
}

__device__ inline std::uint64_t splitmix64(std::uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// w[i] ~ Normal(0, stddev), a counter-based draw (Box–Muller on two hashes of (seed, i)): the
// same seed gives the same weights on any grid.
template <class T>
__global__ void fill_normal_kernel(T* w, std::int64_t n, float stddev, std::uint64_t seed) {
    MOPT_LLAMA_GRID_STRIDE(i, n) {
        const std::uint64_t h1 = splitmix64(seed ^ (2 * static_cast<std::uint64_t>(i)));
        const std::uint64_t h2 = splitmix64(seed ^ (2 * static_cast<std::uint64_t>(i) + 1));
        const float u1 = (static_cast<float>(h1 >> 40) + 1.0f) * 0x1p-24f;  // (0, 1]
        const float u2 = static_cast<float>(h2 >> 40) * 0x1p-24f;          // [0, 1)
        w[i] = from_f32<T>(stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
    }
}

template <class T>
__global__ void fill_kernel(T* w, std::int64_t n, float value) {
    MOPT_LLAMA_GRID_STRIDE(i, n) w[i] = from_f32<T>(value);
}

#undef MOPT_LLAMA_GRID_STRIDE

// Row-major weights [out_i, in] stacked along out, in order: one [Σ out_i, in] matrix, so the
// projections that read one input run as one GEMM.
inline std::vector<float> stacked(std::initializer_list<const std::vector<float>*> parts) {
    std::vector<float> out;
    std::size_t n = 0;
    for (const std::vector<float>* p : parts) n += p->size();
    out.reserve(n);
    for (const std::vector<float>* p : parts) out.insert(out.end(), p->begin(), p->end());
    return out;
}

// Page-locked host memory: cudaMemcpyAsync from it is truly asynchronous.
template <class V>
class PinnedArray {
public:
    PinnedArray() = default;
    explicit PinnedArray(std::size_t count) : count_(count) {
        if (count_)
            check_cuda(cudaMallocHost(reinterpret_cast<void**>(&data_), count_ * sizeof(V)), "cudaMallocHost");
    }
    PinnedArray(const PinnedArray&) = delete;
    PinnedArray& operator=(const PinnedArray&) = delete;
    PinnedArray(PinnedArray&& o) noexcept : data_(std::exchange(o.data_, nullptr)), count_(std::exchange(o.count_, 0)) {}
    PinnedArray& operator=(PinnedArray&& o) noexcept {
        std::swap(data_, o.data_);
        std::swap(count_, o.count_);
        return *this;
    }
    ~PinnedArray() {
        if (data_) cudaFreeHost(data_);
    }
    [[nodiscard]] V* data() const { return data_; }
    [[nodiscard]] std::size_t size() const { return count_; }

private:
    V* data_ = nullptr;
    std::size_t count_ = 0;
};

// buffer = host rounded to T, into the buffer it has when the size matches (else a new one).
template <class T>
void put(DeviceBuffer<T>& buffer, const std::vector<float>& host) {
    if (buffer.size() != host.size()) buffer = DeviceBuffer<T>(host.size());
    if (host.empty()) return;  // a tied model has no lm_head
    if constexpr (std::is_same_v<T, float>) {
        buffer.upload(host);
    } else {
        std::vector<T> converted(host.size());
        for (std::size_t i = 0; i < host.size(); ++i) converted[i] = __float2bfloat16(host[i]);
        buffer.upload(converted);
    }
}

}  // namespace llama_detail

template <DeviceFloat T>
class DeviceLlama {
public:
    using value_type = T;
    static constexpr DType dtype = std::is_same_v<T, float> ? DType::f32 : DType::bf16;

    // Copies a CPU model's weights (llama_host_weights(model), in a g++-compiled file), rounded to T.
    explicit DeviceLlama(const LlamaHostWeights& w, LlamaOptions opt = {}) : config_(w.config), opt_(opt) {
        w.validate();
        init_stream();
        layers_.resize(w.layers.size());
        assign_weights(w);
        plan_gradients();
    }

    // New values of the same model's weights (after an optimizer step on the host): uploaded into the
    // buffers the model has (Switch layers' experts are re-uploaded whole). The config must match.
    void update_weights(const LlamaHostWeights& w) {
        w.validate();
        check(w.config.vocab_size == config_.vocab_size && w.config.d_model == config_.d_model &&
                  w.config.n_layers == config_.n_layers && w.config.d_ff == config_.d_ff &&
                  w.config.num_experts == config_.num_experts && w.config.tie_embeddings == config_.tie_embeddings &&
                  w.config.kv_heads() == config_.kv_heads() && w.config.n_heads == config_.n_heads,
              "DeviceLlama::update_weights: the weights' config differs from the model's (a new model needs a new "
              "DeviceLlama)");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::update_weights)");
        assign_weights(w);
    }

    // Seeded random weights of the config's shape, drawn on the device (benchmarks: no host copy of
    // a 7B model). As nn::Transformer's init: Normal(0, 0.02), the residual projections o_proj and
    // down_proj Normal(0, 0.02/√(2·layers)) (GPT-2), norm weights 1.
    DeviceLlama(const nn::ModelConfig& c, std::uint64_t seed, LlamaOptions opt = {}) : config_(c), opt_(opt) {
        c.validate("DeviceLlama");
        check(c.num_experts == 0 || c.experts_per_token == 1, "DeviceLlama: experts_per_token = ",
              c.experts_per_token, "; only dense and Switch (top-1) SwiGLU models run here");
        init_stream();
        const std::int64_t d = c.d_model, V = c.vocab_size, F = c.d_ff, q = c.n_heads * c.head_dim(),
                           kv = c.kv_heads() * c.head_dim();
        const float residual_std = 0.02f / std::sqrt(2.0f * static_cast<float>(c.n_layers));
        std::uint64_t stream_id = seed * 0x2545F4914F6CDD1Dull;
        auto normal = [&](std::int64_t n, float stddev) {
            DeviceBuffer<T> b(static_cast<std::size_t>(n));
            llama_detail::fill_normal_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream_>>>(
                b.data(), n, stddev, ++stream_id * 0xD1342543DE82EF95ull);
            check_launch("DeviceLlama random init", "[", n, "]");
            return b;
        };
        auto ones = [&](std::int64_t n) {
            DeviceBuffer<float> b(static_cast<std::size_t>(n));
            llama_detail::fill_kernel<<<elementwise_blocks(n), elementwise_threads, 0, stream_>>>(b.data(), n, 1.0f);
            check_launch("DeviceLlama norm init", "[", n, "]");
            return b;
        };
        embed_tokens_ = normal(V * d, 0.02f);
        for (std::int64_t l = 0; l < c.n_layers; ++l) {
            LayerWeights& w = layers_.emplace_back();
            w.attn_norm = ones(d);
            w.ffn_norm = ones(d);
            w.qkv_proj = normal((q + 2 * kv) * d, 0.02f);
            w.o_proj = normal(d * q, residual_std);
            if (c.has_experts(l)) {  // Switch layer: router and experts instead (nn::SwitchFFN's init)
                const std::int64_t E = c.num_experts;
                w.experts.router = normal(E * d, 0.02f);
                w.experts.gate_up = normal(E * 2 * F * d, 0.02f);
                w.experts.down = normal(E * d * F, residual_std);
                w.experts.index = l / c.expert_interval;
                continue;
            }
            w.gate_up_proj = normal(2 * F * d, 0.02f);
            w.down_proj = normal(d * F, residual_std);
        }
        final_norm_ = ones(d);
        if (!c.tie_embeddings) lm_head_ = normal(V * d, 0.02f);
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama random init)");
        plan_gradients();
    }

    DeviceLlama(const DeviceLlama&) = delete;
    DeviceLlama& operator=(const DeviceLlama&) = delete;
    ~DeviceLlama() {
        if (stream_) {
            (void)cudaStreamSynchronize(stream_);
            // Activations go back to the allocator's cache before the stream they belong to is gone.
            acts_ = Activations{};
            for (cudaEvent_t& e : upload_done_)
                if (e) (void)cudaEventDestroy(e);
            (void)cudaStreamDestroy(stream_);
        }
    }

    [[nodiscard]] const nn::ModelConfig& config() const { return config_; }
    [[nodiscard]] const LlamaOptions& options() const { return opt_; }
    [[nodiscard]] cudaStream_t stream() const { return stream_; }
    [[nodiscard]] const LlamaRunShape& shape() const { return shape_; }
    // Incremented whenever reserve() reallocates: a captured graph of an older generation is stale.
    [[nodiscard]] std::uint64_t generation() const { return generation_; }

    // Parameters and their bytes on the device (norm weights f32, the rest T).
    [[nodiscard]] std::int64_t num_parameters() const { return weight_values(false) + weight_values(true); }
    [[nodiscard]] std::int64_t weight_bytes() const {
        return weight_values(false) * static_cast<std::int64_t>(sizeof(T)) +
               weight_values(true) * static_cast<std::int64_t>(sizeof(float));
    }

    // The weight gradients of backward_weights(): one f32 block, each weight's part named as the CPU
    // model's parameter (model.layers.{l}.self_attn.q_proj.weight, …) with its offset and size, and
    // the weight it belongs to on the device: `gain` (the f32 norm gains) or `weight` (in T; q, k, v
    // and gate, up inside their stacked buffers) — an optimizer on the device writes through them.
    struct WeightGradient {
        std::string name;
        std::int64_t offset = 0, count = 0;
        float* gain = nullptr;
        T* weight = nullptr;
    };
    [[nodiscard]] std::vector<WeightGradient> weight_gradient_layout() {
        const std::int64_t d = config_.d_model, F = config_.d_ff, q = config_.n_heads * config_.head_dim(),
                           kv = config_.kv_heads() * config_.head_dim();
        std::vector<WeightGradient> out{
            {"model.embed_tokens.weight", grads_.embed, config_.vocab_size * d, nullptr, embed_tokens_.data()}};
        for (std::size_t l = 0; l < grads_.layers.size(); ++l) {
            const LayerGradients& g = grads_.layers[l];
            LayerWeights& w = layers_[l];
            const std::string p = "model.layers." + std::to_string(l) + ".";
            out.push_back({p + "input_layernorm.weight", g.attn_norm, d, w.attn_norm.data()});
            out.push_back({p + "self_attn.q_proj.weight", g.qkv, q * d, nullptr, w.qkv_proj.data()});
            out.push_back({p + "self_attn.k_proj.weight", g.qkv + q * d, kv * d, nullptr, w.qkv_proj.data() + q * d});
            out.push_back({p + "self_attn.v_proj.weight", g.qkv + (q + kv) * d, kv * d, nullptr,
                           w.qkv_proj.data() + (q + kv) * d});
            out.push_back({p + "self_attn.o_proj.weight", g.o, d * q, nullptr, w.o_proj.data()});
            out.push_back({p + "post_attention_layernorm.weight", g.ffn_norm, d, w.ffn_norm.data()});
            if (w.experts.routed()) {  // Switch layer: the router, then each expert's w1, w3 (stacked) and w2
                const std::string m = p + "block_sparse_moe.";
                out.push_back({m + "gate.weight", g.router, config_.num_experts * d, nullptr, w.experts.router.data()});
                for (std::int64_t e = 0; e < config_.num_experts; ++e) {
                    const std::string x = m + "experts." + std::to_string(e) + ".";
                    const std::int64_t gu = e * 2 * F * d, dn = e * d * F;
                    out.push_back({x + "w1.weight", g.gate_up + gu, F * d, nullptr, w.experts.gate_up.data() + gu});
                    out.push_back({x + "w3.weight", g.gate_up + gu + F * d, F * d, nullptr,
                                   w.experts.gate_up.data() + gu + F * d});
                    out.push_back({x + "w2.weight", g.down + dn, d * F, nullptr, w.experts.down.data() + dn});
                }
                continue;
            }
            out.push_back({p + "mlp.gate_proj.weight", g.gate_up, F * d, nullptr, w.gate_up_proj.data()});
            out.push_back({p + "mlp.up_proj.weight", g.gate_up + F * d, F * d, nullptr, w.gate_up_proj.data() + F * d});
            out.push_back({p + "mlp.down_proj.weight", g.down, d * F, nullptr, w.down_proj.data()});
        }
        out.push_back({"model.norm.weight", grads_.final_norm, d, final_norm_.data()});
        if (!config_.tie_embeddings)
            out.push_back({"lm_head.weight", grads_.lm_head, config_.vocab_size * d, nullptr, lm_head_.data()});
        return out;
    }
    // Values in the weight-gradient block.
    [[nodiscard]] std::int64_t weight_gradient_values() const { return grads_.total; }

    // Allocates the activations of `s` (nothing when s is the shape already reserved).
    void reserve(const LlamaRunShape& s) {
        check(s.batch >= 1 && s.seq >= 1 && s.prompt_len >= 0, "DeviceLlama::reserve: batch ", s.batch, " and seq ",
              s.seq, " must be >= 1 and prompt_len ", s.prompt_len, " >= 0");
        check(s.positions() <= config_.max_seq, "DeviceLlama::reserve: positions up to ", s.positions(), " (",
              s.prompt_len, " prompt + ", s.input_prompt, " input prompt + ", s.seq,
              " text) exceed the model's context max_seq = ", config_.max_seq);
        check(s.rows() <= INT_MAX && s.text_rows() * config_.vocab_size <= (std::int64_t{1} << 40),
              "DeviceLlama::reserve: ", s.batch, " x ", s.positions(), " rows are too many for one step");
        check(s.inject_layer >= 0 && s.inject_layer < config_.n_layers, "DeviceLlama::reserve: inject_layer L_int = ",
              s.inject_layer, " must lie in [0, n_layers = ", config_.n_layers, ")");
        check(s.prompt_len > 0 || (s.inject_layer == 0 && s.experts == 0 && s.input_prompt == 0),
              "DeviceLlama::reserve: inject_layer, experts and input_prompt need prompt rows (prompt_len = 0)");
        check(s.experts >= 0 && s.input_prompt >= 0 && (s.experts > 0 || s.input_prompt == 0),
              "DeviceLlama::reserve: experts = ", s.experts, " and input_prompt = ", s.input_prompt,
              " must be >= 0, and an input prompt belongs to a Mixture of Prompts (experts >= 1)");
        check(s.experts == 0 || (s.prompt_len % s.experts == 0 && s.gate_dim >= 1),
              "DeviceLlama::reserve: a Mixture of Prompts needs prompt_len K = ", s.prompt_len,
              " divisible by experts E = ", s.experts, " and gate_dim >= 1 (got ", s.gate_dim, ")");
        if (s == shape_ && acts_.reserved) return;
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::reserve)");
        acts_ = Activations{};
        shape_ = s;
        const std::int64_t N = s.rows(), d = config_.d_model, F = config_.d_ff, V = config_.vocab_size;
        const std::int64_t q = config_.n_heads * config_.head_dim(), kv = config_.kv_heads() * config_.head_dim();
        const std::int64_t stats = s.batch * config_.n_heads * s.positions();
        const std::int64_t L = s.inject_layer;
        auto array = [&](auto tag, std::int64_t n) {
            return DeviceArray<decltype(tag)>(static_cast<std::size_t>(n), stream_);
        };
        Activations& a = acts_;
        for (std::int64_t l = 0; l <= config_.n_layers; ++l) a.residual.push_back(array(T{}, N * d));
        if (L > 0) a.injected = array(T{}, N * d);
        for (std::int64_t l = 0; l < config_.n_layers; ++l) {
            LayerActivations& la = a.layer.emplace_back();
            la.x_mid = array(T{}, N * d);
            la.qkv = array(T{}, N * (q + 2 * kv));
            la.attn_out = array(T{}, N * q);
            la.lse = array(float{}, stats);
            la.rstd_attn = array(float{}, N);
            la.rstd_ffn = array(float{}, N);
            if (!config_.has_experts(l)) la.gate_up = array(T{}, N * 2 * F);  // Switch layers: in a.experts
            if (s.experts > 0 && l >= L) la.prompt_in = array(T{}, s.batch * s.prompt_len * d);
        }
        if (config_.num_experts > 0) {  // Switch layers from L_int on route N rows, those below fewer
            const SwitchConfig sc = SwitchConfig::of(config_, opt_.expert_chunk_rows);
            const std::int64_t lower = lower_switch_layers(), upper = config_.n_layers / config_.expert_interval - lower;
            if (upper > 0) a.experts = DeviceSwitchFFN<T>(sc, N, upper, compute(), stream_);
            if (lower > 0) a.experts_lower = DeviceSwitchFFN<T>(sc, s.rows_at(0), lower, compute(), stream_);
        }
        a.normed = array(T{}, N * d);
        const bool dense_ffn = config_.num_experts == 0 || config_.expert_interval > 1;  // any dense layer
        a.ffn_hidden = array(T{}, dense_ffn ? N * F : 0);
        a.final_normed = array(T{}, N * d);
        a.rstd_final = array(float{}, N);
        a.logits = array(T{}, s.text_rows() * V);
        a.row_loss = array(float{}, s.text_rows());
        a.loss = array(float{}, 1);
        a.rope = array(float{}, s.positions() * config_.head_dim());
        a.tokens = array(std::int32_t{}, 2 * s.text_rows());
        a.d_residual = array(T{}, N * d);
        a.d_normed = array(T{}, N * d);
        a.d_ffn_hidden = array(T{}, dense_ffn ? N * F : 0);
        a.d_attn_out = array(T{}, N * q);
        a.dqkv = array(T{}, N * (q + 2 * kv));
        a.delta = array(float{}, stats);
        a.d_final_normed = array(T{}, N * d);
        a.d_final_normed.zero(stream_);  // its prompt rows stay 0: the loss does not read them
        rope_table(a.rope.data(), s.positions(), config_.head_dim(), config_.rope_theta, 0, stream_);
        if (L > 0) {  // the blocks below L_int: positions K..S−1
            a.rope_lower = array(float{}, s.lower_positions() * config_.head_dim());
            rope_table(a.rope_lower.data(), s.lower_positions(), config_.head_dim(), config_.rope_theta, s.prompt_len,
                       stream_);
        }
        input_prompt_set_ = s.input_prompt == 0;  // a new shape needs its P¹ (set_input_prompt)
        if (s.experts > 0) {
            a.input_prompt = array(float{}, s.input_prompt * d);
            a.input_prompt.zero(stream_);
            a.gate_avg = array(float{}, s.batch * d);
            a.gate_hidden = array(float{}, s.batch * s.gate_dim);
            a.gate_logits = array(float{}, s.batch * s.experts);
            a.gate = array(float{}, s.batch * s.experts);
            a.d_gate = array(float{}, s.batch * s.experts);
        }
        for (auto& slot : a.staging) slot = llama_detail::PinnedArray<std::int32_t>(2 * s.text_rows());
        a.reserved = true;
        ++generation_;
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::reserve)");
    }

    // MoP: the frozen input prompt P¹, host f32 [p₁, d] (zeros until set). After reserve().
    void set_input_prompt(std::span<const float> p1) {
        check(acts_.reserved && shape_.input_prompt > 0,
              "DeviceLlama::set_input_prompt: the reserved shape has no input prompt (input_prompt = ",
              shape_.input_prompt, ")");
        check(static_cast<std::int64_t>(p1.size()) == shape_.input_prompt * config_.d_model,
              "DeviceLlama::set_input_prompt: ", p1.size(), " values for an input prompt of [", shape_.input_prompt,
              ", ", config_.d_model, "]");
        check_cuda(cudaMemcpyAsync(acts_.input_prompt.data(), p1.data(), p1.size() * sizeof(float),
                                   cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync (DeviceLlama::set_input_prompt)");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::set_input_prompt)");
        input_prompt_set_ = true;
    }
    // MoP: keep the k largest gate values (renormalised) in logits and loss forwards, as the CPU's
    // set_top_k with gradients off; train forwards keep the dense gate. 0: dense.
    void set_gate_top_k(std::int64_t k) {
        check(k >= 0, "DeviceLlama::set_gate_top_k: k = ", k, " must be >= 0");
        gate_top_k_ = k;
    }
    // MoP: the gate g [B, E] of the last forward (top-k applied where it was), host copy (synchronises).
    [[nodiscard]] std::vector<float> gate_host() const { return gate_state().probs; }
    // MoP: the gate's values in the last forward, host copies (synchronises).
    struct GateState {
        std::vector<float> avg;     // [B, d] mean of block L_int's input over its non-prompt rows
        std::vector<float> hidden;  // [B, d_g] ReLU(avg W₁ᵀ)
        std::vector<float> logits;  // [B, E] z
        std::vector<float> probs;   // [B, E] g (top-k applied where it was)
    };
    [[nodiscard]] GateState gate_state() const {
        check(acts_.reserved && shape_.experts > 0, "DeviceLlama::gate_state: the reserved shape has no gate");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::gate_state)");
        GateState g{std::vector<float>(acts_.gate_avg.size()), std::vector<float>(acts_.gate_hidden.size()),
                    std::vector<float>(acts_.gate_logits.size()), std::vector<float>(acts_.gate.size())};
        acts_.gate_avg.download(g.avg);
        acts_.gate_hidden.download(g.hidden);
        acts_.gate_logits.download(g.logits);
        acts_.gate.download(g.probs);
        return g;
    }

    // Uploads a batch: ids i32 [B, T] in [0, vocab) and targets i32 [B, T] (next tokens, −100 =
    // not predicted; may be empty for ForwardMode::logits). Host memcpy into a pinned slot (two
    // slots: the host may run one step ahead), then one cudaMemcpyAsync on the model's stream.
    void set_batch(std::span<const std::int32_t> ids, std::span<const std::int32_t> targets) {
        check(acts_.reserved, "DeviceLlama::set_batch: call reserve(shape) first");
        const std::int64_t n = shape_.text_rows();
        check(static_cast<std::int64_t>(ids.size()) == n, "DeviceLlama::set_batch: ids hold ", ids.size(),
              " tokens, the reserved shape [B, T] = [", shape_.batch, ", ", shape_.seq, "] needs ", n);
        check(targets.empty() || static_cast<std::int64_t>(targets.size()) == n, "DeviceLlama::set_batch: targets hold ",
              targets.size(), " values, ids ", n);
        const std::int32_t V = static_cast<std::int32_t>(config_.vocab_size);
        for (std::int64_t i = 0; i < n; ++i)
            check(ids[i] >= 0 && ids[i] < V, "DeviceLlama::set_batch: token id ", ids[i], " at [", i / shape_.seq,
                  ", ", i % shape_.seq, "] is outside the vocabulary [0, ", V, ")");
        for (std::size_t i = 0; i < targets.size(); ++i)
            check(targets[i] == -100 || (targets[i] >= 0 && targets[i] < V), "DeviceLlama::set_batch: target ",
                  targets[i], " at [", static_cast<std::int64_t>(i) / shape_.seq, ", ",
                  static_cast<std::int64_t>(i) % shape_.seq, "] is neither -100 nor a token id below ", V);
        const int slot = next_slot_;
        next_slot_ ^= 1;
        check_cuda(cudaEventSynchronize(upload_done_[slot]), "cudaEventSynchronize (DeviceLlama::set_batch)");
        std::int32_t* staging = acts_.staging[slot].data();
        std::memcpy(staging, ids.data(), static_cast<std::size_t>(n) * sizeof(std::int32_t));
        if (targets.empty())
            std::fill_n(staging + n, n, -100);
        else
            std::memcpy(staging + n, targets.data(), static_cast<std::size_t>(n) * sizeof(std::int32_t));
        check_cuda(cudaMemcpyAsync(acts_.tokens.data(), staging, 2 * static_cast<std::size_t>(n) * sizeof(std::int32_t),
                                   cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync (DeviceLlama::set_batch)");
        check_cuda(cudaEventRecord(upload_done_[slot], stream_), "cudaEventRecord (DeviceLlama::set_batch)");
    }

    // The whole forward of the uploaded batch, enqueued on stream() (no host synchronisation).
    // params: device f32 [trainable_values(d)] = [P | W₁ | W₂] (nullptr when K = 0).
    void enqueue_forward(const float* params, ForwardMode mode) {
        check(acts_.reserved, "DeviceLlama::forward: call reserve(shape) first");
        check(shape_.prompt_len == 0 || params != nullptr, "DeviceLlama::forward: the reserved shape has ",
              shape_.prompt_len, " prompt rows but the prompt pointer is null");
        check(gate_top_k_ <= shape_.experts || shape_.experts == 0, "DeviceLlama::forward: gate top-k = ", gate_top_k_,
              " exceeds the ", shape_.experts, " experts");
        check(input_prompt_set_, "DeviceLlama::forward: the reserved shape has ", shape_.input_prompt,
              " input-prompt rows P¹ but set_input_prompt was not called since reserve()");
        Activations& a = acts_;
        const std::int64_t B = shape_.batch, text = shape_.seq, K = shape_.prompt_len, L = shape_.inject_layer;
        const std::int64_t N = shape_.rows(), d = config_.d_model, F = config_.d_ff, V = config_.vocab_size;
        const std::int64_t H = config_.n_heads, Hkv = config_.kv_heads(), Dh = config_.head_dim();
        const float eps = config_.norm_eps;
        const float* prompt = params;
        last_params_ = params;

        // x₀: [P; P¹; E[ids]] when L_int = 0, else [P¹; E[ids]] (P joins at block L_int)
        const std::int64_t N0 = shape_.rows_at(0);
        const float* first = L == 0 ? prompt : a.input_prompt.data();
        const std::int64_t first_rows = L == 0 ? K : shape_.input_prompt, second_rows = L == 0 ? shape_.input_prompt : 0;
        llama_detail::embed_with_prompt_kernel<<<elementwise_blocks(N0 * d), elementwise_threads, 0, stream_>>>(
            a.tokens.data(), embed_tokens_.data(), first, static_cast<int>(first_rows), a.input_prompt.data(),
            static_cast<int>(second_rows), a.residual[0].data(), N0, static_cast<int>(text), static_cast<int>(d));
        check_launch("DeviceLlama embed", "[", B, ", ", shape_.positions_at(0), ", ", d, "]");

        for (std::size_t l = 0; l < layers_.size(); ++l) {
            const auto layer = static_cast<std::int64_t>(l);
            const LayerWeights& w = layers_[l];
            LayerActivations& la = a.layer[l];
            const std::int64_t rows = shape_.rows_at(layer), S = shape_.positions_at(layer);
            if (layer == L && L > 0) {  // the prompt joins: [P; rows below]
                llama_detail::inject_prompt_kernel<<<elementwise_blocks(N * d), elementwise_threads, 0, stream_>>>(
                    prompt, a.residual[l].data(), a.injected.data(), N, static_cast<int>(S), static_cast<int>(K),
                    static_cast<int>(d));
                check_launch("DeviceLlama inject prompt", "[", B, ", ", S, ", ", d, "]");
            }
            T* x = block_input(layer);
            if (shape_.experts > 0 && layer >= L) {  // MoP: the gate at L_int, the experts' rows scaled from there on
                if (layer == L) gate_forward_step(x, params + K * d, mode);
                scale_prompt_rows(x, la.prompt_in.data(), a.gate.data(), gate_shape(), S, stream_);
            }
            // Attention half: x_mid = x + o_proj(attn(rope(q), rope(k), v)), q|k|v = norm(x) W{q,k,v}ᵀ
            rms_norm_forward(x, w.attn_norm.data(), a.normed.data(), la.rstd_attn.data(), rows, d, eps, stream_);
            const Qkv<T> qkv = split_qkv(la.qkv.data(), rows);
            project_qkv(a.normed.data(), w.qkv_proj.data(), qkv, rows);  // [rows, d] -> q [B, S, H, Dh], k, v [B, S, Hkv, Dh]
            rope_qk(qkv, false, layer);
            const AttentionShape attn{.batch = B, .seq_q = S, .seq_k = S, .heads = H, .kv_heads = Hkv, .head_dim = Dh};
            attention_forward<T>({.q = qkv.q, .k = qkv.k, .v = qkv.v, .out = la.attn_out.data(), .lse = la.lse.data()},
                                 attn, attention_options(), stream_);
            copy(la.x_mid.data(), x, rows * d);
            linear(la.attn_out.data(), w.o_proj.data(), la.x_mid.data(), rows, H * Dh, d, 1.0f);  // x_mid += o Woᵀ
            // Feed-forward half: x' = x_mid + down(silu(gate) ⊙ up), gate|up = norm(x_mid) W{gate,up}ᵀ
            rms_norm_forward(la.x_mid.data(), w.ffn_norm.data(), a.normed.data(), la.rstd_ffn.data(), rows, d, eps,
                             stream_);
            if (w.experts.routed()) {  // Switch layer: x' = x_mid + p·E_i(norm(x_mid))
                switch_of(layer).forward(switch_index(layer), w.experts.view(), a.normed.data(), la.x_mid.data(),
                                         a.residual[l + 1].data());
                continue;
            }
            linear(a.normed.data(), w.gate_up_proj.data(), la.gate_up.data(), rows, d, 2 * F);  // [rows, d] -> [rows, 2F]
            swiglu_forward_packed(la.gate_up.data(), a.ffn_hidden.data(), rows, F, stream_);
            T* x_next = a.residual[l + 1].data();
            copy(x_next, la.x_mid.data(), rows * d);
            linear(a.ffn_hidden.data(), w.down_proj.data(), x_next, rows, F, d, 1.0f);  // x' += h Wdownᵀ
        }

        // Final norm (all rows; only the text rows reach the head) and the head on the text rows:
        // logits[b] = norm(x_L)[b, K + p₁:S] Wᵀ, [T, d] -> [T, V] per sequence
        const std::int64_t S = shape_.positions();
        rms_norm_forward(a.residual[layers_.size()].data(), final_norm_.data(), a.final_normed.data(),
                         a.rstd_final.data(), N, d, eps, stream_);
        gemm_strided_batched(head_args(false, text, V, d, a.final_normed.data() + shape_.text_offset() * d, d,
                                       head_weight(), d, a.logits.data(), V),
                             {.count = B, .stride_a = S * d, .stride_b = 0, .stride_c = text * V});
        if (mode != ForwardMode::logits)
            cross_entropy(a.logits.data(), a.tokens.data() + shape_.text_rows(), a.loss.data(), shape_.text_rows(), V,
                          {.ignore_index = -100, .write_dlogits = mode == ForwardMode::train, .dloss = 1.0f,
                           .row_loss = a.row_loss.data(), .stream = stream_});
        last_mode_ = mode;
        saved_for_backward_ = mode == ForwardMode::train || mode == ForwardMode::keep;
    }

    // After a keep-mode forward: d loss / d logits, host f32 [B, T, vocab], for the next backward.
    void set_logits_gradient(std::span<const float> dlogits) {
        check(saved_for_backward_ && last_mode_ == ForwardMode::keep,
              "DeviceLlama::set_logits_gradient: needs a ForwardMode::keep forward with no backward since");
        check(dlogits.size() == acts_.logits.size(), "DeviceLlama::set_logits_gradient: ", dlogits.size(),
              " values for logits of [", shape_.batch, ", ", shape_.seq, ", ", config_.vocab_size, "]");
        const float* src = dlogits.data();
        std::vector<T> converted;
        if constexpr (!std::is_same_v<T, float>) {
            converted.resize(dlogits.size());
            for (std::size_t i = 0; i < dlogits.size(); ++i) converted[i] = __float2bfloat16(dlogits[i]);
        }
        const void* from = std::is_same_v<T, float> ? static_cast<const void*>(src) : converted.data();
        check_cuda(cudaMemcpyAsync(acts_.logits.data(), from, dlogits.size() * sizeof(T), cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync (DeviceLlama::set_logits_gradient)");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::set_logits_gradient)");
    }
    // The weight of the Switch layers' auxiliary loss in the objective the next backward differentiates.
    void set_aux_loss_weight(float w) {
        check(std::isfinite(w), "DeviceLlama::set_aux_loss_weight: ", w, " is not finite");
        opt_.aux_loss_weight = w;
    }

    // d loss / d [P | W₁ | W₂] of the last train-mode forward, enqueued on stream(): dparams: device
    // f32 [trainable_values(d)], overwritten. Consumes what the forward saved (the gate and up buffers
    // become their gradients), so each train forward allows one backward.
    void enqueue_backward_to_prompt(float* dparams) {
        check(shape_.prompt_len > 0 && dparams != nullptr,
              "DeviceLlama::backward_to_prompt: the reserved shape has no prompt rows (K = ", shape_.prompt_len,
              ") or dprompt is null");
        enqueue_backward(dparams, nullptr);
    }
    // d loss / d every weight of the last train- or keep-mode forward (pretraining), enqueued on
    // stream(): dweights: device f32 [weight_gradient_values()], overwritten, laid out as
    // weight_gradient_layout() says. Models without a prompt (K = 0); one backward per forward. Switch
    // layers: routers and experts too, with set_aux_loss_weight()'s multiple of the auxiliary losses.
    void enqueue_backward_weights(float* dweights) {
        check(dweights != nullptr, "DeviceLlama::backward_weights: the gradient block is null");
        check(shape_.prompt_len == 0, "DeviceLlama::backward_weights: the reserved shape has ", shape_.prompt_len,
              " prompt rows; weight gradients run for the model alone (pretraining)");
        enqueue_backward(nullptr, dweights);
    }

private:
    // The backward to the prompt (dparams), or to every weight (dweights), or both.
    void enqueue_backward(float* dparams, float* dweights) {
        check(saved_for_backward_, "DeviceLlama::backward: needs a ForwardMode::train or keep forward first (",
              last_mode_ == ForwardMode::train || last_mode_ == ForwardMode::keep
                  ? "its saved activations were used by an earlier backward"
                  : "the last forward did not save activations",
              ")");
        saved_for_backward_ = false;
        Activations& a = acts_;
        const std::int64_t B = shape_.batch, S = shape_.positions(), text = shape_.seq, K = shape_.prompt_len;
        const std::int64_t N = shape_.rows(), d = config_.d_model, F = config_.d_ff, V = config_.vocab_size;
        const std::int64_t H = config_.n_heads, Hkv = config_.kv_heads(), Dh = config_.head_dim();
        const std::int64_t L = shape_.inject_layer, last = config_.n_layers - 1;
        const float eps = config_.norm_eps;
        float* const dw = dweights;  // nullptr: the weights are frozen
        auto at = [dw](std::int64_t offset) { return dw ? dw + offset : nullptr; };

        // Head: d norm(x_L)[b, K + p₁:S] = dlogits[b] W, [T, V] -> [T, d] (the other rows stay 0)
        gemm_strided_batched(head_args(true, text, d, V, a.logits.data(), V, head_weight(), d,
                                       a.d_final_normed.data() + shape_.text_offset() * d, d),
                             {.count = B, .stride_a = text * V, .stride_b = 0, .stride_c = S * d});
        // d W_head = dlogitsᵀ norm(x_L), [V, N] [N, d] (K = 0: every row is text; tied: the embedding's block)
        if (dw) weight_grad(a.logits.data(), a.final_normed.data(), at(config_.tie_embeddings ? grads_.embed : grads_.lm_head), N, V, d);
        T* dx = a.d_residual.data();  // d loss / d x, the residual stream's gradient, from x_L down to block L_int's input
        rms_norm_backward(a.residual[layers_.size()].data(), final_norm_.data(), a.rstd_final.data(),
                          a.d_final_normed.data(), dx, at(grads_.final_norm), N, d, stream_);

        const AttentionShape attn{.batch = B, .seq_q = S, .seq_k = S, .heads = H, .kv_heads = Hkv, .head_dim = Dh};
        for (std::int64_t layer = last; layer >= L; --layer) {  // nothing below L_int is trainable
            const auto l = static_cast<std::size_t>(layer);
            const LayerWeights& w = layers_[l];
            LayerActivations& la = a.layer[l];
            const LayerGradients& gl = grads_.layers[l];
            // Feed-forward half, x' = x_mid + down(swiglu(gate, up)): dx_mid = dx' + normᵀ(d gate Wg + d up Wu)
            if (w.experts.routed()) {  // Switch layer: d norm(x_mid) through the experts and the router
                SwitchWeightGrads<T> sg{.router = at(gl.router), .gate_up = at(gl.gate_up), .down = at(gl.down),
                                        .x = a.normed.data()};
                if (dw)  // the experts' input norm(x_mid) again
                    rms_norm_forward(la.x_mid.data(), w.ffn_norm.data(), a.normed.data(), la.rstd_ffn.data(), N, d,
                                     eps, stream_);
                switch_of(layer).backward(switch_index(layer), w.experts.view(), dx, a.d_normed.data(),
                                          opt_.aux_loss_weight, dw ? &sg : nullptr);
            } else {
                if (dw) {  // recompute norm(x_mid) and h = silu(gate) ⊙ up; d W_down = dx'ᵀ h, [d, N] [N, F]
                    rms_norm_forward(la.x_mid.data(), w.ffn_norm.data(), a.normed.data(), la.rstd_ffn.data(), N, d,
                                     eps, stream_);
                    swiglu_forward_packed(la.gate_up.data(), a.ffn_hidden.data(), N, F, stream_);
                    weight_grad(dx, a.ffn_hidden.data(), at(gl.down), N, d, F);
                }
                linear_dgrad(dx, w.down_proj.data(), a.d_ffn_hidden.data(), N, F, d);  // [N, d] -> [N, F]
                // in place: gate_up now holds d gate | d up, and one GEMM against [Wg; Wu] gives d norm
                swiglu_backward_packed(la.gate_up.data(), a.d_ffn_hidden.data(), la.gate_up.data(), N, F, stream_);
                if (dw) weight_grad(la.gate_up.data(), a.normed.data(), at(gl.gate_up), N, 2 * F, d);  // [2F, d]
                linear_dgrad(la.gate_up.data(), w.gate_up_proj.data(), a.d_normed.data(), N, d, 2 * F);  // [N, 2F] -> [N, d]
            }
            rms_norm_backward_accumulate(la.x_mid.data(), w.ffn_norm.data(), la.rstd_ffn.data(), a.d_normed.data(), dx,
                                         N, d, stream_, at(gl.ffn_norm));
            // Attention half, x_mid = x + o_proj(attn): dx = dx_mid + normᵀ(dq Wq + dk Wk + dv Wv)
            if (dw) weight_grad(dx, la.attn_out.data(), at(gl.o), N, d, H * Dh);  // d W_o = dx_midᵀ attn, [d, H·Dh]
            linear_dgrad(dx, w.o_proj.data(), a.d_attn_out.data(), N, H * Dh, d);  // [N, d] -> [B, S, H, Dh]
            const Qkv<T> qkv = split_qkv(la.qkv.data(), N);
            const Qkv<T> dqkv = split_qkv(a.dqkv.data(), N);
            attention_backward<T>({.q = qkv.q, .k = qkv.k, .v = qkv.v, .out = la.attn_out.data(),
                                   .grad_out = a.d_attn_out.data(), .lse = la.lse.data(), .delta = a.delta.data(),
                                   .dq = dqkv.q, .dk = dqkv.k, .dv = dqkv.v},
                                  attn, attention_options(), stream_);
            rope_qk(dqkv, true, layer);
            const T* wqkv = w.qkv_proj.data();
            const std::int64_t q = H * Dh, kv = Hkv * Dh;
            if (dw) {  // recompute norm(x); d W_{q,k,v} = d{q,k,v}ᵀ norm(x) into the stacked [q + 2kv, d] block
                rms_norm_forward(block_input(layer), w.attn_norm.data(), a.normed.data(), la.rstd_attn.data(), N, d,
                                 eps, stream_);
                weight_grad(dqkv.q, a.normed.data(), at(gl.qkv), N, q, d);
                weight_grad(dqkv.k, a.normed.data(), at(gl.qkv + q * d), N, kv, d);
                weight_grad(dqkv.v, a.normed.data(), at(gl.qkv + (q + kv) * d), N, kv, d);
            }
            linear_dgrad(dqkv.q, wqkv, a.d_normed.data(), N, d, q);  // [N, H·Dh] -> [N, d]
            linear_dgrad(dqkv.k, wqkv + q * d, a.d_normed.data(), N, d, kv, 1.0f);
            linear_dgrad(dqkv.v, wqkv + (q + kv) * d, a.d_normed.data(), N, d, kv, 1.0f);
            rms_norm_backward_accumulate(block_input(layer), w.attn_norm.data(), la.rstd_attn.data(),
                                         a.d_normed.data(), dx, N, d, stream_, at(gl.attn_norm));
            // MoP: through the scaling of the experts' rows at this block's input (dg summed over the blocks)
            if (shape_.experts > 0)
                scale_prompt_rows_backward(dx, la.prompt_in.data(), a.gate.data(), a.d_gate.data(), layer != last,
                                           gate_shape(), S, stream_);
        }
        if (dw) {  // dE[ids[r]] += dx₀[r] (tied: onto the head's gradient already in the block)
            float* dtable = dw + grads_.embed;
            if (!config_.tie_embeddings)
                check_cuda(cudaMemsetAsync(dtable, 0, static_cast<std::size_t>(V * d) * sizeof(float), stream_),
                           "cudaMemsetAsync (DeviceLlama embedding gradient)");
            llama_detail::embedding_backward_kernel<<<elementwise_blocks(N * d), elementwise_threads, 0, stream_>>>(
                a.tokens.data(), dx, dtable, N, static_cast<int>(d));
            check_launch("DeviceLlama embedding gradient", "[", N, ", ", d, "]");
        }
        if (dparams == nullptr) return;
        // dP = Σ_b dx[b, 0:K] at block L_int's input
        llama_detail::prompt_gradient_kernel<<<elementwise_blocks(K * d), elementwise_threads, 0, stream_>>>(
            dx, dparams, static_cast<int>(B), S * d, K * d);
        check_launch("DeviceLlama prompt gradient", "[", K, ", ", d, "]");
        if (shape_.experts > 0) {  // d W₁, d W₂ from d g
            const float* w2 = last_params_ + K * d + shape_.gate_dim * d;
            gate_backward(a.gate_avg.data(), a.gate_hidden.data(), a.gate.data(), a.d_gate.data(), w2, dparams + K * d,
                          dparams + K * d + shape_.gate_dim * d, gate_shape(), stream_);
        }
    }

public:
    // Blocking conveniences (tests, evaluation loops) over the enqueue_* calls.
    // ids, targets: [B, T] (shape reserved) -> the mean loss (read back when read_loss, else NaN; it
    // stays on the device in loss_device()).
    float forward(std::span<const std::int32_t> ids, std::span<const std::int32_t> targets, const float* prompt,
                  ForwardMode mode = ForwardMode::train, bool read_loss = true) {
        check(mode != ForwardMode::logits && !targets.empty(),
              "DeviceLlama::forward: the loss needs targets and a loss or train mode (forward_logits gives logits)");
        set_batch(ids, targets);
        enqueue_forward(prompt, mode);
        return read_loss ? loss() : NAN;
    }
    // ids: [B, T] -> device logits [B, T, vocab] of type T (valid until the next forward)
    const T* forward_logits(std::span<const std::int32_t> ids, const float* prompt) {
        set_batch(ids, {});
        enqueue_forward(prompt, ForwardMode::logits);
        return acts_.logits.data();
    }
    // dprompt: device f32 [K, d]
    void backward_to_prompt(float* dprompt) { enqueue_backward_to_prompt(dprompt); }

    // The last loss, read back (synchronises the stream).
    [[nodiscard]] float loss() const {
        check(acts_.reserved && (last_mode_ == ForwardMode::loss || last_mode_ == ForwardMode::train),
              "DeviceLlama::loss: the last forward computed no loss (a logits or keep forward)");
        float v = 0.0f;
        check_cuda(cudaMemcpyAsync(&v, acts_.loss.data(), sizeof(float), cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpyAsync (DeviceLlama::loss)");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::loss)");
        return v;
    }
    [[nodiscard]] const float* loss_device() const { return acts_.loss.data(); }
    // Switch models: each Switch layer's routing in the last forward (synchronises; empty when dense).
    [[nodiscard]] std::vector<SwitchStats> expert_stats() const {
        std::vector<SwitchStats> all;
        for (const DeviceSwitchFFN<T>* e : {&acts_.experts_lower, &acts_.experts})  // in layer order
            if (e->reserved())
                for (SwitchStats& st : e->stats()) all.push_back(std::move(st));
        return all;
    }
    // Switch models: Σ layers' aux_loss_coef·balance + z_loss_coef·z of the last forward over the
    // layers from L_int on — those the prompt reaches, whose term the backward differentiates; the
    // CPU's ForwardOutput::aux_loss (synchronises; 0 when dense).
    [[nodiscard]] double aux_loss() const {
        double sum = 0.0;
        if (acts_.experts.reserved())
            for (const SwitchStats& s : acts_.experts.stats()) sum += s.aux_loss;
        return sum;
    }
    // Logits of the last logits/loss-mode forward as f32 [B, T, vocab] (synchronises).
    [[nodiscard]] std::vector<float> logits_host() const {
        std::vector<float> out(acts_.logits.size());
        logits_to_host(out);
        return out;
    }
    // The same into caller memory (f32 [B, T, vocab]): f32 models copy straight into it.
    void logits_to_host(std::span<float> out) const {
        check(acts_.reserved && last_mode_ != ForwardMode::train &&
                  (last_mode_ != ForwardMode::keep || saved_for_backward_),
              "DeviceLlama::logits_host: the last forward's logits became gradients (a train forward, or a "
              "keep forward's backward)");
        check(out.size() == acts_.logits.size(), "DeviceLlama::logits_host: ", out.size(), " values for logits of [",
              shape_.batch, ", ", shape_.seq, ", ", config_.vocab_size, "]");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (DeviceLlama::logits_host)");
        if constexpr (std::is_same_v<T, float>) {
            acts_.logits.download(out);
        } else {
            std::vector<T> raw(acts_.logits.size());
            acts_.logits.download(raw);
            for (std::size_t i = 0; i < raw.size(); ++i) out[i] = to_f32(raw[i]);
        }
    }

private:
    struct LayerWeights {
        DeviceBuffer<float> attn_norm, ffn_norm;                                  // [d]
        DeviceBuffer<T> qkv_proj;      // [H·Dh + 2·Hkv·Dh, d]: Wq, Wk, Wv stacked (one forward GEMM)
        DeviceBuffer<T> o_proj;        // [d, H·Dh]
        DeviceBuffer<T> gate_up_proj;  // [2F, d]: Wgate, Wup stacked (one GEMM each way)
        DeviceBuffer<T> down_proj;     // [d, F]
        SwitchExpertWeights<T> experts;  // Switch layers: router and experts (gate_up_proj, down_proj empty)
    };
    // Saved by a forward for backward_to_prompt (N = B·S rows).
    struct LayerActivations {
        DeviceArray<T> x_mid;                     // [N, d] residual after attention (the FFN norm's input)
        DeviceArray<T> qkv;                       // q [B, S, H, Dh], then k, v [B, S, Hkv, Dh] (planar), q, k roped
        DeviceArray<T> attn_out;                  // [B, S, H, Dh]
        DeviceArray<float> lse;                   // [B, H, S] attention row logsumexp
        DeviceArray<float> rstd_attn, rstd_ffn;   // [N] 1/rms of the norms' inputs
        DeviceArray<T> gate_up;                   // [N, 2F] gate | up per row (their gradients after the backward)
        DeviceArray<T> prompt_in;                 // MoP, blocks >= L_int: [B, K, d] the prompt rows before scaling
    };
    struct Activations {
        bool reserved = false;
        std::vector<DeviceArray<T>> residual;     // L + 1 of [N, d]: residual[l] is block l's input
        DeviceArray<T> injected;                  // [N, d] block L_int's input when L_int > 0 (block_input)
        std::vector<LayerActivations> layer;
        DeviceArray<T> normed, ffn_hidden;        // scratch [N, d], [N, F]: a norm's output, silu(gate) ⊙ up
        DeviceArray<T> final_normed;              // [N, d]
        DeviceArray<float> rstd_final;            // [N]
        DeviceArray<T> logits;                    // [B, T, V] (train: overwritten by d loss / d logits)
        DeviceArray<float> row_loss, loss;        // [B·T], [1]
        DeviceArray<float> rope;                  // [2, S, Dh/2] cos, sin of positions 0..S−1
        DeviceArray<float> rope_lower;            // L_int > 0: [2, S − K, Dh/2] of positions K..S−1
        DeviceArray<float> input_prompt;          // MoP: f32 [p₁, d] frozen P¹
        DeviceArray<float> gate_avg, gate_hidden; // MoP: f32 [B, d] mean of block L_int's input, [B, d_g] ReLU
        DeviceArray<float> gate_logits, gate;     // MoP: f32 [B, E] z and g
        DeviceArray<float> d_gate;                // MoP: f32 [B, E] d loss / d g
        DeviceArray<std::int32_t> tokens;         // [2, B, T]: ids, then targets
        DeviceArray<T> d_residual;                // [N, d] d loss / d x as the backward walks down
        DeviceArray<T> d_normed;                  // [N, d] a norm's output gradient
        DeviceArray<T> d_ffn_hidden;              // [N, F]
        DeviceArray<T> d_attn_out;                // [B, S, H, Dh]
        DeviceArray<T> dqkv;                      // dq, dk, dv planar as qkv
        DeviceArray<float> delta;                 // [B, H, S] attention backward scratch
        DeviceArray<T> d_final_normed;            // [N, d], prompt rows 0
        DeviceSwitchFFN<T> experts;               // Switch layers >= L_int: their saved routing and scratch
        DeviceSwitchFFN<T> experts_lower;         // Switch layers < L_int (fewer rows)
        llama_detail::PinnedArray<std::int32_t> staging[2];  // host [2, B, T] upload slots
    };

    // Offsets of each weight's gradient in the block of backward_weights (plan_gradients).
    struct LayerGradients {
        std::int64_t attn_norm = 0, qkv = 0, o = 0, ffn_norm = 0, router = 0, gate_up = 0, down = 0;  // Switch: router,
                                                                                                  // experts' [E, …]
    };
    struct GradientLayout {
        std::int64_t embed = 0, final_norm = 0, lm_head = 0, total = 0;
        std::vector<LayerGradients> layers;
    };
    // The block's order: embedding, then per layer attn_norm, q|k|v, o, ffn_norm, gate|up, down (a
    // Switch layer: router [E, d], gate|up [E, 2F, d], down [E, d, F]; as the device stores them), then
    // the final norm and the head.
    void plan_gradients() {
        const std::int64_t d = config_.d_model, F = config_.d_ff, q = config_.n_heads * config_.head_dim(),
                           kv = config_.kv_heads() * config_.head_dim();
        std::int64_t next = 0;
        auto take = [&](std::int64_t n) { return std::exchange(next, next + n); };
        grads_ = {};
        grads_.embed = take(config_.vocab_size * d);
        for (std::int64_t l = 0; l < config_.n_layers; ++l) {
            LayerGradients& g = grads_.layers.emplace_back();
            const std::int64_t experts = config_.has_experts(l) ? config_.num_experts : 0;  // Switch layer
            g.attn_norm = take(d);
            g.qkv = take((q + 2 * kv) * d);
            g.o = take(d * q);
            g.ffn_norm = take(d);
            g.router = take(experts * d);
            g.gate_up = take(std::max<std::int64_t>(experts, 1) * 2 * F * d);
            g.down = take(std::max<std::int64_t>(experts, 1) * d * F);
        }
        grads_.final_norm = take(d);
        grads_.lm_head = take(config_.tie_embeddings ? 0 : config_.vocab_size * d);
        grads_.total = next;
    }

    // The weights from the host (constructor, update_weights): rounded to T; q|k|v and gate|up stacked.
    void assign_weights(const LlamaHostWeights& w) {
        using llama_detail::put;
        put(embed_tokens_, w.embed_tokens);
        put(lm_head_, w.lm_head);
        put(final_norm_, w.final_norm);
        for (std::size_t i = 0; i < w.layers.size(); ++i) {
            const LlamaHostWeights::Layer& src = w.layers[i];
            LayerWeights& l = layers_[i];
            put(l.attn_norm, src.attn_norm);
            put(l.ffn_norm, src.ffn_norm);
            put(l.qkv_proj, llama_detail::stacked({&src.q_proj, &src.k_proj, &src.v_proj}));
            put(l.o_proj, src.o_proj);
            put(l.gate_up_proj, llama_detail::stacked({&src.gate_proj, &src.up_proj}));
            put(l.down_proj, src.down_proj);
            const auto layer = static_cast<std::int64_t>(i);
            if (config_.has_experts(layer))
                l.experts = upload_switch_weights<T>(src.router, src.expert_gate, src.expert_up, src.expert_down,
                                                     config_.num_experts, config_.d_model, config_.d_ff,
                                                     layer / config_.expert_interval);
        }
        check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize (DeviceLlama weights upload)");
    }

    void init_stream() {
        check(config_.head_dim() == 32 || config_.head_dim() == 64 || config_.head_dim() == 128,
              "DeviceLlama: head_dim = d_model / n_heads = ", config_.head_dim(),
              " is not one the attention kernels take (32, 64, 128)");
        check(device_count() > 0, "DeviceLlama: no CUDA device");
        check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        for (cudaEvent_t& e : upload_done_) {
            check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
            check_cuda(cudaEventRecord(e, stream_), "cudaEventRecord");
        }
    }

    [[nodiscard]] std::int64_t weight_values(bool f32_norms) const {
        const std::int64_t d = config_.d_model;
        if (f32_norms) return d * (2 * config_.n_layers + 1);
        std::int64_t n = static_cast<std::int64_t>(embed_tokens_.size() + lm_head_.size());
        for (const LayerWeights& l : layers_)
            n += static_cast<std::int64_t>(l.qkv_proj.size() + l.o_proj.size() + l.gate_up_proj.size() +
                                           l.down_proj.size()) +
                 l.experts.values();
        return n;
    }

    [[nodiscard]] const T* head_weight() const {
        return config_.tie_embeddings ? embed_tokens_.data() : lm_head_.data();
    }

    [[nodiscard]] GemmCompute compute() const { return dtype == DType::f32 ? opt_.compute : GemmCompute::f32; }

    // The head GEMMs, batched over the sequences: forward (trans_b: logits = h Wᵀ) or backward (dh = dlogits W).
    [[nodiscard]] GemmArgs head_args(bool backward, std::int64_t m, std::int64_t n, std::int64_t k, const T* a,
                                     std::int64_t lda, const T* b, std::int64_t ldb, T* c, std::int64_t ldc) const {
        return {.trans_a = false, .trans_b = !backward, .m = m, .n = n, .k = k, .alpha = 1.0f, .beta = 0.0f,
                .a = a, .lda = lda, .b = b, .ldb = ldb, .c = c, .ldc = ldc, .ab_type = dtype, .c_type = dtype,
                .compute = compute(), .stream = stream_};
    }

    // y = x wᵀ + beta·y (nn::Linear). x: [rows, in], w: [out, in] -> y: [rows, out]
    void linear(const T* x, const T* w, T* y, std::int64_t rows, std::int64_t in, std::int64_t out,
                float beta = 0.0f) const {
        gemm({.trans_a = false, .trans_b = true, .m = rows, .n = out, .k = in, .alpha = 1.0f, .beta = beta, .a = x,
              .lda = in, .b = w, .ldb = in, .c = y, .ldc = out, .ab_type = dtype, .c_type = dtype,
              .compute = compute(), .stream = stream_});
    }
    // dx = dy w + beta·dx: the input gradient of y = x wᵀ (the only GEMM a frozen weight needs).
    // dy: [rows, out], w: [out, in] -> dx: [rows, in]
    void linear_dgrad(const T* dy, const T* w, T* dx, std::int64_t rows, std::int64_t in, std::int64_t out,
                      float beta = 0.0f) const {
        gemm({.trans_a = false, .trans_b = false, .m = rows, .n = in, .k = out, .alpha = 1.0f, .beta = beta, .a = dy,
              .lda = out, .b = w, .ldb = in, .c = dx, .ldc = in, .ab_type = dtype, .c_type = dtype,
              .compute = compute(), .stream = stream_});
    }
    // dw = dyᵀ x (f32): the weight gradient of y = x wᵀ. dy: [rows, out], x: [rows, in] -> dw: f32 [out, in]
    void weight_grad(const T* dy, const T* x, float* dw, std::int64_t rows, std::int64_t out, std::int64_t in) const {
        gemm({.trans_a = true, .trans_b = false, .m = out, .n = in, .k = rows, .alpha = 1.0f, .beta = 0.0f, .a = dy,
              .lda = out, .b = x, .ldb = in, .c = dw, .ldc = in, .ab_type = dtype, .c_type = DType::f32,
              .compute = compute(), .stream = stream_});
    }
    // q, k, v planes of a [rows, H·Dh + 2·Hkv·Dh] planar buffer (q's plane, then k's, then v's).
    template <class V>
    struct Qkv {
        V *q, *k, *v;
    };
    template <class V>
    [[nodiscard]] Qkv<V> split_qkv(V* base, std::int64_t rows) const {
        const std::int64_t q = config_.n_heads * config_.head_dim(), kv = config_.kv_heads() * config_.head_dim();
        return {base, base + rows * q, base + rows * (q + kv)};
    }
    // q|k|v = x [Wq; Wk; Wv]ᵀ into their planes: one strided-batched GEMM over the three
    // projections when they have one size (no GQA), else q alone and k, v batched.
    void project_qkv(const T* x, const T* w, const Qkv<T>& out, std::int64_t rows) const {
        const std::int64_t d = config_.d_model, q = config_.n_heads * config_.head_dim(),
                           kv = config_.kv_heads() * config_.head_dim();
        auto batched = [&](const T* wb, T* c, std::int64_t cols, std::int64_t count) {
            gemm_strided_batched({.trans_a = false, .trans_b = true, .m = rows, .n = cols, .k = d, .alpha = 1.0f,
                                  .beta = 0.0f, .a = x, .lda = d, .b = wb, .ldb = d, .c = c, .ldc = cols,
                                  .ab_type = dtype, .c_type = dtype, .compute = compute(), .stream = stream_},
                                 {.count = count, .stride_a = 0, .stride_b = cols * d, .stride_c = rows * cols});
        };
        if (q == kv) return batched(w, out.q, q, 3);
        linear(x, w, out.q, rows, d, q);
        batched(w + q * d, out.k, kv, 2);
    }
    // RoPE on block `layer`'s q and k (backward: on dq and dk): one launch over both planes when
    // they have one size. Blocks below L_int take the table of positions K..S−1.
    void rope_qk(const Qkv<T>& t, bool backward, std::int64_t layer) const {
        const std::int64_t B = shape_.batch, S = shape_.positions_at(layer), H = config_.n_heads,
                           Hkv = config_.kv_heads(), Dh = config_.head_dim();
        const float* table = layer < shape_.inject_layer ? acts_.rope_lower.data() : acts_.rope.data();
        auto apply = [&](T* x, std::int64_t batch, std::int64_t heads) {
            if (backward) rope_backward(x, x, table, batch, S, heads, Dh, RopeStyle::half, stream_);
            else rope_forward(x, x, table, batch, S, heads, Dh, RopeStyle::half, stream_);
        };
        if (H == Hkv) return apply(t.q, 2 * B, H);  // [2, B, S, H, Dh]: the q and k planes are adjacent
        apply(t.q, B, H);
        apply(t.k, B, Hkv);
    }

    [[nodiscard]] AttentionOptions attention_options() const {
        return {.causal = true, .prefix = 0, .scale = 0.0f, .kernel = opt_.attention};
    }
    // Block `layer`'s input: residual[layer], or at L_int > 0 the rows with the prompt prepended.
    [[nodiscard]] T* block_input(std::int64_t layer) {
        const auto l = static_cast<std::size_t>(layer);
        return layer == shape_.inject_layer && layer > 0 ? acts_.injected.data() : acts_.residual[l].data();
    }
    // Switch layers below L_int (they route fewer rows, in acts_.experts_lower).
    [[nodiscard]] std::int64_t lower_switch_layers() const {
        std::int64_t n = 0;
        for (std::int64_t l = 0; l < shape_.inject_layer; ++l) n += config_.has_experts(l) ? 1 : 0;
        return n;
    }
    [[nodiscard]] DeviceSwitchFFN<T>& switch_of(std::int64_t layer) {
        return layer < shape_.inject_layer ? acts_.experts_lower : acts_.experts;
    }
    [[nodiscard]] std::int64_t switch_index(std::int64_t layer) const {
        const std::int64_t index = layers_[static_cast<std::size_t>(layer)].experts.index;
        return layer < shape_.inject_layer ? index : index - lower_switch_layers();
    }

    [[nodiscard]] GateShape gate_shape() const {
        return {.batch = shape_.batch, .d_model = config_.d_model, .gate_dim = shape_.gate_dim,
                .experts = shape_.experts, .per_expert = shape_.per_expert()};
    }
    // MoP at block L_int's input x [B, S, d]: g from the mean of its non-prompt rows.
    // gate_params: device f32 [W₁ (d_g·d) | W₂ (E·d_g)]
    void gate_forward_step(const T* x, const float* gate_params, ForwardMode mode) {
        const GateShape g = gate_shape();
        gate_mean(x, acts_.gate_avg.data(), g.batch, shape_.positions(), shape_.prompt_len, g.d_model, stream_);
        gate_forward(acts_.gate_avg.data(), gate_params, gate_params + g.gate_dim * g.d_model,
                     acts_.gate_hidden.data(), acts_.gate_logits.data(), acts_.gate.data(), g,
                     mode == ForwardMode::train ? 0 : gate_top_k_, stream_);
    }

    void copy(T* dst, const T* src, std::int64_t n) const {
        check_cuda(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToDevice, stream_),
                   "cudaMemcpyAsync (DeviceLlama residual copy)");
    }

    nn::ModelConfig config_;
    LlamaOptions opt_;
    cudaStream_t stream_ = nullptr;
    cudaEvent_t upload_done_[2] = {nullptr, nullptr};
    int next_slot_ = 0;
    DeviceBuffer<T> embed_tokens_, lm_head_;  // [vocab, d]; lm_head empty when tied
    DeviceBuffer<float> final_norm_;          // [d]
    std::vector<LayerWeights> layers_;
    GradientLayout grads_;
    LlamaRunShape shape_{};
    Activations acts_;
    std::uint64_t generation_ = 0;
    ForwardMode last_mode_ = ForwardMode::logits;
    bool saved_for_backward_ = false;
    std::int64_t gate_top_k_ = 0;          // MoP top-k at evaluation (0: dense)
    bool input_prompt_set_ = true;         // MoP: P¹ uploaded since the last reserve (or none needed)
    const float* last_params_ = nullptr;   // the trained block the last forward read
};

}  // namespace mopt::backend::cuda
