#pragma once
// CPU reference for the CUDA prompt-injection tests (tests/backend/cuda/prompt_injection.cu): mopt's
// CPU nn::Transformer<Llama, DenseFFN or SwitchFFN<Top1>> with a prompt::InjectedPrompt or a
// prompt::MixtureOfPrompts, frozen, compiled by g++ (prompt_injection_reference.cpp) so the CUDA
// test never includes the CPU model's headers.
//
// Everything trainable travels as ONE f32 block, DeviceLlama's layout (LlamaRunShape::
// trainable_values): [prompt_embeddings K·d | gate.w1 d_g·d | gate.w2 E·d_g] (InjectedPrompt: the
// prompt only), each in the CPU's row-major layout (MixtureOfPrompts' prompt expert-major). The
// reference returns the block, the frozen input prompt P¹, the logits, loss and gate of a forward,
// d (loss + aux_weight · aux_loss) / d block through the tape, the top-k evaluation (set_top_k under
// NoGrad), and the block after a few AdamW steps over every trainable parameter the prompt layer
// visits (train::AdamW, train::clip_grad_norm over all of them).
#include <cstdint>
#include <vector>

#include <mopt/backend/cuda/llama_weights.hpp>

namespace mopt::cuda_test {

struct PromptInjectionCase {
    // The model: llama.cu's sizes with a third layer, so there are layers below and above L_int.
    std::int64_t vocab = 97, d_model = 128, n_layers = 3, n_heads = 4, n_kv_heads = 2, d_ff = 256;
    // Switch FFN in every layer (top-1) with this many experts (0: dense SwiGLU); d_ff is then each
    // expert's width.
    std::int64_t ffn_experts = 0;
    float aux_loss_coef = 0.0f;   // Switch: the load-balancing loss coefficient (0: no aux loss)
    float aux_weight = 0.0f;      // the objective's weight of out.aux_loss (as LlamaOptions::aux_loss_weight)
    std::int64_t batch = 2, seq = 19;

    // The prompt: MixtureOfPrompts with `experts` groups of `per_expert` rows, or (mixture = false)
    // an InjectedPrompt of prompt_len rows.
    bool mixture = true;
    std::int64_t inject_layer = 1;                   // L_int
    std::int64_t prompt_len = 5;                     // InjectedPrompt's K
    std::int64_t experts = 3, per_expert = 2;        // MoP: K = experts · per_expert
    std::int64_t gate_dim = 16;                      // MoP d_g
    std::int64_t input_prompt = 0;                   // MoP frozen P¹ rows p₁
    std::int64_t top_k = 2;                          // MoP: the evaluation's top-k (0: no top-k run)
    // MoP: the gate weights are the CPU Gate's initialisation (uniform ±1/√fan_in) times this; > 1
    // spreads the gate probabilities (an untrained gate is close to uniform).
    float gate_scale = 1.0f;

    bool bf16_weights = false;    // weights, prompts and gate weights rounded to bf16 values first
    std::uint64_t seed = 1;
    int adamw_steps = 0;          // steps on the same batch after the first forward/backward
    float lr = 1e-2f, weight_decay = 0.01f;
    float clip = 0.0f;            // global-norm clip of the AdamW steps (0: none)

    [[nodiscard]] std::int64_t prompt_rows() const { return mixture ? experts * per_expert : prompt_len; }
};

struct PromptInjectionReference {
    backend::cuda::LlamaHostWeights weights;
    std::vector<float> block;                // [prompt K·d | gate.w1 d_g·d | gate.w2 E·d_g] initial values
    std::vector<float> input_prompt;         // [p₁, d] the frozen input prompt (empty when p₁ = 0)
    std::vector<std::int32_t> ids, targets;  // [B, T]
    std::vector<float> logits;               // [B, T, vocab] (dense gate)
    float loss = 0.0f;
    double aux_loss = 0.0;                   // out.aux_loss (0 when undefined)
    std::vector<float> gate;                 // [B, E] gate probabilities (MoP; dense)
    std::vector<float> grad;                 // block layout: d (loss + aux_weight · aux) / d block
    // The smallest gap, over the batch, between the k-th and (k+1)-th largest dense gate probability
    // (k = top_k; 1 when there is no top-k run): how robust the top-k choice is to rounding.
    double top_k_margin = 1.0;
    // Evaluation with set_top_k(top_k) under autodiff::NoGrad (MoP with top_k > 0 only).
    std::vector<float> top_k_logits;         // [B, T, vocab]
    std::vector<float> top_k_gate;           // [B, E]
    float top_k_loss = 0.0f;
    // AdamW steps (adamw_steps > 0).
    std::vector<float> step_losses;          // each step's loss, before its update
    std::vector<float> step_grad_norms;      // each step's ‖gradient block‖₂ before clipping
    std::vector<float> tuned;                // block after adamw_steps steps
};

PromptInjectionReference prompt_injection_reference(const PromptInjectionCase& c);

}  // namespace mopt::cuda_test
