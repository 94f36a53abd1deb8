#pragma once
// compress_then_prompt_gpu: the prompt-tuning stage of compress_then_prompt on the GPU, for runs
// too long for a CPU (thousands of steps). The CPU side (compress_then_prompt_gpu.cpp, g++: flags,
// data, compression, the table and JSON) loads the base model and the Brown splits, scores the
// dense and the compressed model, compresses it exactly as compress_then_prompt does (same
// calibration windows, same recipe) and initialises the prompt as it does (PromptInit::vocab); it
// hands over plain arrays: the compressed model's weights (dequantised), the initial prompt and the
// batches. The GPU side (compress_then_prompt_gpu_tune.cu, nvcc) tunes the prompt with DeviceLlama
// + PromptTuner in f32 (so the GPU's perplexity of the compressed model without a prompt must equal
// the CPU's, which the program checks) and scores it on the same test windows.
#include <cstdint>
#include <string>
#include <vector>

#include "mopt/backend/cuda/llama_weights.hpp"

namespace mopt::examples::gpu_ctp {

struct Options {
    std::string model = "models/dense-brown", brown_dir = "data/brown", compression = "sparsegpt:0.5";
    std::string steps = "300,1000,3000,10000", json;
    std::int64_t prompt_len = 25, batch = 8, seq_len = 128, eval_windows = 64, calibration_windows = 32;
    std::int64_t val_batches = 4, eval_every = 100;
    float lr = 0.03f, clip = 1.0f;
    std::uint64_t seed = 0;
};

// Batches as the GPU takes them: each [B, T] i32, row-major.
struct Batches {
    std::vector<std::vector<std::int32_t>> ids, targets;
};

struct Setup {
    backend::cuda::LlamaHostWeights weights;  // the compressed model
    std::vector<float> prompt;                // [K, d] the initial prompt
    Batches train, val, test;                 // train: one batch per step of the longest run
    double ppl_dense = 0.0, ppl_compressed = 0.0;
    std::string compression, structure;
    double seconds = 0.0;
};

// The CPU side. Throws mopt::Error naming the flag or file on bad input.
Setup setup(const Options& o, std::int64_t train_steps);

struct Run {
    std::int64_t steps = 0;
    double best_val_loss = 0.0, ppl_prompt = 0.0, seconds = 0.0;
};
struct Result {
    std::string device;
    double ppl_compressed = 0.0;  // the GPU's, no prompt (must match the CPU's)
    std::vector<Run> runs;        // one prompt-tuning run from the same initial prompt per entry of steps
};

// Whether a CUDA device is present (checked before the CPU side's minutes of work).
bool has_gpu();

// The GPU side: for each entry of `steps` a run of that many steps (warmup 10%, cosine decay to
// 0.1·lr, AdamW, clipping, the best validation prompt kept), scored on the test batches.
Result tune(const Setup& s, const Options& o, const std::vector<std::int64_t>& steps);

}  // namespace mopt::examples::gpu_ctp
