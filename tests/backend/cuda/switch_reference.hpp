#pragma once
// CPU references for the CUDA Switch tests (tests/backend/cuda/switch.cu), compiled by g++
// (switch_reference.cpp) so the CUDA test never includes the CPU model's headers:
//   - one nn::SwitchFFN<Top1, EveryLayer, SwiGLU> layer on a tape: its output for an input x and
//     the input gradient of Σ out ⊙ dy + aux_weight · aux (the layer's ctx.aux_loss), with its
//     routing statistics;
//   - a whole Transformer<Llama, SwitchFFN<Top1, EveryLayer|EveryOtherLayer>> with a SoftPrompt:
//     logits, loss, aux loss, the prompt's gradient of loss + aux_weight · aux_loss (as
//     train::prompt_step's objective), the routing of every expert layer, and AdamW steps.
#include <cstdint>
#include <vector>

#include <mopt/backend/cuda/llama_weights.hpp>

namespace mopt::cuda_test {

struct SwitchCase {
    std::int64_t rows = 150, d_model = 64, d_ff = 96, experts = 4;
    float capacity_factor = 0.0f, aux_loss_coef = 0.0f, z_loss_coef = 0.0f;
    float aux_weight = 0.0f;   // weight of the layer's aux loss in the objective
    bool idle_expert = false;  // the last expert's router row loses every row: it gets no tokens
    bool bf16 = false;         // weights, x and dy rounded to bf16 values (what the GPU's bf16 run holds)
    std::uint64_t seed = 1;
};

struct SwitchReference {
    std::vector<float> router;            // [E, d]
    std::vector<float> gate, up;          // [E, F, d] (w1, w3)
    std::vector<float> down;              // [E, d, F] (w2)
    std::vector<float> x, dy;             // [N, d] input and d objective / d out
    std::vector<float> out, dx;           // [N, d] Switch(x) and d objective / d x
    std::vector<std::int64_t> assigned;   // [E] rows whose top-1 is each expert
    std::int64_t dropped = 0;
    double balance = 0.0, router_entropy = 0.0;
    double aux_loss = 0.0;                // the layer's ctx.aux_loss (0 when both coefficients are 0)
    double min_margin = 0.0;              // the smallest gap between a row's two largest router probabilities
};

SwitchReference switch_reference(const SwitchCase& c);

struct SwitchLlamaCase {
    std::int64_t vocab = 97, d_model = 128, n_layers = 2, n_heads = 4, n_kv_heads = 2, d_ff = 64, experts = 4;
    bool every_other_layer = false;  // EveryOtherLayer placement (layers 1, 3, …), dense SwiGLU elsewhere
    std::int64_t batch = 2, seq = 19, prompt_len = 5;
    float capacity_factor = 0.0f, aux_loss_coef = 0.0f, z_loss_coef = 0.0f;
    float aux_weight = 0.0f;         // the prompt objective's weight of out.aux_loss
    bool bf16_weights = false;       // weights and prompt rounded to bf16 values
    // Routing robust to bf16 rounding: residual dims 0..E−1 carry a one-hot of (token or prompt row)
    // mod (E − 1) that no projection writes to, and the router reads mostly those dims, so every
    // layer routes each row by that label with a wide margin; expert E − 1 gets no rows.
    bool designed_routing = false;
    std::uint64_t seed = 1;
    int adamw_steps = 0;             // prompt-tuning steps on the same batch (AdamW)
    float lr = 1e-2f, weight_decay = 0.01f;
};

struct SwitchLlamaReference {
    backend::cuda::LlamaHostWeights weights;
    std::vector<float> prompt;                       // [K, d]
    std::vector<std::int32_t> ids, targets;          // [B, T]
    std::vector<float> logits;                       // [B, T, vocab]
    float loss = 0.0f;
    double aux_loss = 0.0;                           // out.aux_loss (0 when undefined)
    std::vector<float> prompt_grad;                  // [K, d] d (loss + aux_weight · aux_loss) / d prompt
    std::vector<std::vector<std::int64_t>> assigned; // per expert layer, rows per expert
    std::vector<std::int64_t> dropped;               // per expert layer
    std::vector<float> step_losses;                  // each AdamW step's loss (before its update)
    std::vector<float> tuned_prompt;                 // [K, d] after adamw_steps steps
};

SwitchLlamaReference switch_llama_reference(const SwitchLlamaCase& c);

}  // namespace mopt::cuda_test
