// The GPU side of compress_then_prompt_gpu (see compress_then_prompt_gpu.hpp), compiled by nvcc.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "compress_then_prompt_gpu.hpp"
#include "mopt/backend/cuda/llama.cuh"
#include "mopt/backend/cuda/prompt_tuner.cuh"
#include "mopt/train/schedule.hpp"

namespace mopt::examples::gpu_ctp {

namespace cuda = backend::cuda;

namespace {

// Mean next-token loss over every counted target of `batches` (as eval::corpus_perplexity sums it).
double mean_nll(cuda::DeviceLlama<float>& model, const Batches& batches, const float* prompt, std::int64_t prompt_len,
                std::int64_t batch, std::int64_t seq) {
    model.reserve({.batch = batch, .seq = seq, .prompt_len = prompt_len});
    double nll = 0.0;
    std::int64_t count = 0;
    for (std::size_t i = 0; i < batches.ids.size(); ++i) {
        model.set_batch(batches.ids[i], batches.targets[i]);
        model.enqueue_forward(prompt, cuda::ForwardMode::loss);
        const auto n = static_cast<std::int64_t>(
            std::count_if(batches.targets[i].begin(), batches.targets[i].end(), [](std::int32_t t) { return t != -100; }));
        nll += static_cast<double>(model.loss()) * static_cast<double>(n);
        count += n;
    }
    check(count > 0, "no counted targets to score");
    return nll / static_cast<double>(count);
}

}  // namespace

bool has_gpu() { return cuda::device_count() > 0; }

Result tune(const Setup& s, const Options& o, const std::vector<std::int64_t>& steps) {
    check(cuda::device_count() > 0, "no CUDA device");
    cudaDeviceProp prop{};
    cuda::check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    Result r;
    r.device = prop.name;
    cuda::DeviceLlama<float> model(s.weights);
    const std::int64_t B = o.batch, T = o.seq_len, K = o.prompt_len;
    r.ppl_compressed = std::exp(mean_nll(model, s.test, nullptr, 0, B, T));
    cuda::DeviceArray<float> best_device(s.prompt.size());
    for (const std::int64_t n : steps) {
        const auto t0 = std::chrono::steady_clock::now();
        check(n <= static_cast<std::int64_t>(s.train.ids.size()), n, " steps but ",
              s.train.ids.size(), " train batches prepared");
        const train::WarmupCosine schedule{.peak_lr = o.lr, .warmup_steps = n / 10, .total_steps = n};
        cuda::PromptTuner<float> tuner(model, {.batch = B, .seq = T, .prompt_len = K}, s.prompt,
                                       {.lr = o.lr, .weight_decay = 0.0f}, o.clip);
        Run run{.steps = n, .best_val_loss = std::numeric_limits<double>::infinity()};
        std::vector<float> best = s.prompt;
        for (std::int64_t step = 0; step < n; ++step) {
            tuner.set_options({.lr = schedule(step), .weight_decay = 0.0f});
            tuner.step(s.train.ids[static_cast<std::size_t>(step)], s.train.targets[static_cast<std::size_t>(step)]);
            if ((step + 1) % o.eval_every == 0 || step + 1 == n) {
                const double v = mean_nll(model, s.val, tuner.prompt_device(), K, B, T);
                check(std::isfinite(v), "the validation loss is ", v, " at step ", step + 1);
                if (v < run.best_val_loss) {
                    run.best_val_loss = v;
                    best = tuner.prompt();
                }
            }
        }
        best_device.upload(best);
        cuda::check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
        run.ppl_prompt = std::exp(mean_nll(model, s.test, best_device.data(), K, B, T));
        run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "compress_then_prompt_gpu: %lld steps: best validation loss %.4f, test ppl %.2f (%.1f s)\n",
                     static_cast<long long>(n), run.best_val_loss, run.ppl_prompt, run.seconds);
        r.runs.push_back(run);
    }
    return r;
}

}  // namespace mopt::examples::gpu_ctp
