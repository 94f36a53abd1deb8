#pragma once
// CPU reference for the CUDA Llama tests (tests/backend/cuda/llama.cu): mopt's CPU
// nn::Transformer<Llama> with a SoftPrompt, frozen, compiled by g++ (llama_reference.cpp) so the
// CUDA test never includes the CPU model's headers. It returns the model's weights in the form
// DeviceLlama uploads (llama_host_weights), the logits, the loss and the prompt's gradient through
// the tape, and the prompt after a few prompt-tuning steps with train::AdamW.
#include <cstdint>
#include <vector>

#include <mopt/backend/cuda/llama_weights.hpp>

namespace mopt::cuda_test {

struct LlamaCase {
    std::int64_t vocab = 97, d_model = 128, n_layers = 2, n_heads = 4, n_kv_heads = 2, d_ff = 256;
    std::int64_t batch = 2, seq = 19, prompt_len = 5;
    bool tie_embeddings = false;
    bool bf16_weights = false;  // round the weights and the prompt to bf16 first (the GPU's bf16 run
                                // then starts from the same values; only its arithmetic differs)
    std::uint64_t seed = 1;
    int adamw_steps = 3;        // prompt-tuning steps on the same batch
    float lr = 1e-2f, weight_decay = 0.01f;
    float clip = 0.0f;          // the AdamW steps clip the gradient to this global norm (0: no clipping)
};

struct LlamaReference {
    backend::cuda::LlamaHostWeights weights;
    std::vector<float> prompt;              // [K, d] initial prompt
    std::vector<std::int32_t> ids, targets; // [B, T]; targets = next tokens, -100 at each row's end and one more
    std::vector<float> logits;              // [B, T, vocab]
    float loss = 0.0f;
    std::vector<float> prompt_grad;         // [K, d] d loss / d prompt
    std::vector<float> step_losses;         // the loss of each AdamW step (before its update)
    std::vector<float> step_grad_norms;     // ‖d loss / d prompt‖₂ of each AdamW step, before clipping
    std::vector<float> tuned_prompt;        // [K, d] after adamw_steps steps of AdamW
};

LlamaReference llama_reference(const LlamaCase& c);

}  // namespace mopt::cuda_test
