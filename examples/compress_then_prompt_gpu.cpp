// compress_then_prompt_gpu: compress_then_prompt's prompt tuning on the GPU, for long runs (see
// compress_then_prompt_gpu.hpp). This file is the CPU side, compiled by g++: flags, Brown data,
// compression, the table and the JSON; compress_then_prompt_gpu_tune.cu runs the steps.
//
//   compress_then_prompt_gpu --model models/dense-brown --compression sparsegpt:0.5 --prompt-len 25 --steps 300,1000,3000
#include "compress_then_prompt_gpu.hpp"

#include <chrono>
#include <filesystem>
#include <tuple>

#include <mopt/nn/linear_role.hpp>  // before transformer.hpp (see tests/backend/cuda/llama_reference.cpp)

#include "experiment.hpp"
#include "mopt/backend/cuda/llama_weights.hpp"

namespace mopt::examples::gpu_ctp {

namespace {

void append(Batches& to, const data::Batch& b) {
    const auto ids = b.ids.span<std::int32_t>();
    const auto targets = b.targets.span<std::int32_t>();
    to.ids.emplace_back(ids.begin(), ids.end());
    to.targets.emplace_back(targets.begin(), targets.end());
}

template <class Model>
Setup setup_model(const Options& o, std::int64_t train_steps, Model& dense) {
    namespace fs = std::filesystem;
    const auto t0 = std::chrono::steady_clock::now();
    const compress::Recipe recipe = experiment::parse_compression(o.compression, "--compression");
    cli::usage_check(o.seq_len + o.prompt_len <= dense.config().max_seq, "--seq-len ", o.seq_len, " plus --prompt-len ",
                     o.prompt_len, " must fit the model's context of ", dense.config().max_seq);
    experiment::BrownData d = experiment::load_brown(fs::path(o.model) / "tokenizer.model", o.brown_dir,
                                                     {.batch = o.batch, .seq_len = o.seq_len,
                                                      .eval_windows = o.eval_windows, .seed = o.seed});
    Setup s;
    s.compression = recipe.describe();
    s.structure = Model::structure().describe();
    s.ppl_dense = eval::corpus_perplexity(dense, d.test, d.eval_batches).ppl();
    const Tensor calibration = compress::calibration_windows(d.train, o.calibration_windows, o.seed);
    Model m = Model::load(o.model);
    compress::compress(m, recipe, calibration);
    s.ppl_compressed = eval::corpus_perplexity(m, d.test, d.eval_batches).ppl();
    m.init_prompt(experiment::vocab_prompt(o.prompt_len, d, o.seed));
    const auto p = m.prompt().prompt.value().span();
    s.prompt.assign(p.begin(), p.end());
    s.weights = backend::cuda::llama_host_weights(m);

    // The windows the CPU run reads: train in its wrapping order, val and test from epoch 0. The GPU
    // shape is fixed, so an epoch's short last batch is left out (the CPU would train on it: the two
    // runs see the same batches up to the first epoch's end).
    data::Batch b;
    d.train.start_epoch(0);
    for (std::int64_t skipped = 0; static_cast<std::int64_t>(s.train.ids.size()) < train_steps;) {
        d.train.next_wrapping(b);
        if (b.size() == o.batch) append(s.train, b);
        else check(++skipped <= train_steps, "the Brown train split yields no batch of ", o.batch, " windows");
    }
    for (auto [batches, out, count] : {std::tuple{&d.val, &s.val, o.val_batches}, std::tuple{&d.test, &s.test, d.eval_batches}}) {
        batches->start_epoch(0);
        for (std::int64_t i = 0; i < count && batches->next(b); ++i)
            if (b.size() == o.batch) append(*out, b);  // the GPU shape is fixed: a short last batch is left out
    }
    cli::usage_check(!s.test.ids.empty() && !s.val.ids.empty(), "--brown-dir ", o.brown_dir,
                     ": too few validation or test windows for one batch of ", o.batch);
    s.seconds = experiment::seconds_since(t0);
    return s;
}

}  // namespace

Setup setup(const Options& o, std::int64_t train_steps) {
    Setup s;
    experiment::with_base_model<prompt::SoftPrompt>(o.model, [&](auto& dense) {
        s = setup_model(o, train_steps, dense);
        return 0;
    });
    return s;
}

}  // namespace mopt::examples::gpu_ctp

int main(int argc, char** argv) {
    using namespace mopt;
    using examples::gpu_ctp::Options;
    return cli::run("compress_then_prompt_gpu", [&] {
        namespace po = boost::program_options;
        namespace fs = std::filesystem;
        Options o;
        po::options_description opts(
            "compress_then_prompt_gpu: compress a base model as compress_then_prompt does and learn its soft prompt on "
            "the GPU, one run per step count, to see how much of the gap long tuning wins back\n"
            "usage: compress_then_prompt_gpu [options]");
        opts.add_options()
            ("help,h", "show this help")
            ("model", po::value(&o.model)->default_value(o.model), "base model folder (Llama family, dense or Switch top-1)")
            ("compression", po::value(&o.compression)->default_value(o.compression),
             "one compression, as compress_then_prompt's --compressions (sparsegpt:0.5, gptq:4, sparsegpt:0.5+gptq:4, ...)")
            ("prompt-len", po::value(&o.prompt_len)->default_value(o.prompt_len), "soft prompt length")
            ("steps", po::value(&o.steps)->default_value(o.steps), "comma-separated step counts, one run each")
            ("lr", po::value(&o.lr)->default_value(o.lr), "peak learning rate (AdamW, warmup 10%, cosine to 0.1 x)")
            ("clip", po::value(&o.clip)->default_value(o.clip), "gradient clipping by global norm (0: none)")
            ("eval-every", po::value(&o.eval_every)->default_value(o.eval_every), "steps between validation checks")
            ("val-batches", po::value(&o.val_batches)->default_value(o.val_batches), "validation batches per check");
        experiment::add_run_options(opts, o);
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        std::vector<std::int64_t> steps;
        for (const std::string& v : cli::split(o.steps, ',')) {
            std::size_t used = 0;
            long long n = 0;
            try {
                n = std::stoll(v, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            cli::usage_check(used == v.size() && n >= 1, "--steps: '", v, "' is not a positive step count");
            steps.push_back(n);
        }
        cli::usage_check(!steps.empty(), "--steps is empty");
        for (auto [flag, v] : {std::pair{"prompt-len", o.prompt_len}, {"batch", o.batch}, {"seq-len", o.seq_len},
                               {"eval-windows", o.eval_windows}, {"calibration-windows", o.calibration_windows},
                               {"eval-every", o.eval_every}, {"val-batches", o.val_batches}})
            cli::usage_check(v >= 1, "--", flag, " must be >= 1, got ", v);
        cli::usage_check(std::isfinite(o.lr) && o.lr > 0.0f, "--lr must be > 0, got ", o.lr);
        cli::usage_check(std::isfinite(o.clip) && o.clip >= 0.0f, "--clip must be >= 0, got ", o.clip);
        cli::usage_check(fs::exists(fs::path(o.model) / "config.json"), "--model ", fs::path(o.model),
                         ": no Hugging Face folder (config.json) there");

        check(examples::gpu_ctp::has_gpu(), "no CUDA device (this program tunes on the GPU; compress_then_prompt "
                                            "runs the same experiment on the CPU)");
        const examples::gpu_ctp::Setup s = examples::gpu_ctp::setup(o, *std::max_element(steps.begin(), steps.end()));
        std::fprintf(stderr, "compress_then_prompt_gpu: dense %.2f, %s %.2f (CPU, %.0f s)\n", s.ppl_dense,
                     s.compression.c_str(), s.ppl_compressed, s.seconds);
        const examples::gpu_ctp::Result r = examples::gpu_ctp::tune(s, o, steps);
        // f32 on both sides: the GPU's perplexity without a prompt is the CPU's up to summation order.
        check(std::abs(r.ppl_compressed - s.ppl_compressed) <= 1e-3 * s.ppl_compressed,
              "the GPU scores the compressed model ", r.ppl_compressed, ", the CPU ",
              s.ppl_compressed, ": the two backends disagree");

        std::printf("\nBrown test perplexity (%lld windows of %lld tokens), %s, %s, %lld-token prompt tuned on %s\n",
                    static_cast<long long>(s.test.ids.size() * o.batch), static_cast<long long>(o.seq_len),
                    s.structure.c_str(), s.compression.c_str(), static_cast<long long>(o.prompt_len), r.device.c_str());
        std::printf("dense %.2f, compressed %.2f (GPU %.2f)\n\n", s.ppl_dense, s.ppl_compressed, r.ppl_compressed);
        std::printf("| steps | ppl with prompt | gap recovered | seconds |\n|---:|---:|---:|---:|\n");
        nlohmann::json runs = nlohmann::json::array();
        for (const auto& run : r.runs) {
            const double g = experiment::gap_recovered(s.ppl_dense, s.ppl_compressed, run.ppl_prompt);
            std::printf("| %lld | %.2f | %.0f%% | %.1f |\n", static_cast<long long>(run.steps), run.ppl_prompt, 100.0 * g,
                        run.seconds);
            runs.push_back({{"steps", run.steps}, {"ppl_prompt", run.ppl_prompt}, {"gap_recovered", g},
                            {"best_val_loss", run.best_val_loss}, {"seconds", run.seconds}});
        }
        cli::write_json(o.json, {{"experiment", "compress_then_prompt_gpu"}, {"model", o.model},
                                 {"structure", s.structure}, {"compression", s.compression}, {"prompt_len", o.prompt_len},
                                 {"lr", o.lr}, {"clip", o.clip}, {"batch", o.batch}, {"seq_len", o.seq_len},
                                 {"eval_every", o.eval_every}, {"val_batches", o.val_batches}, {"seed", o.seed},
                                 {"ppl_dense", s.ppl_dense}, {"ppl_compressed", s.ppl_compressed},
                                 {"ppl_compressed_gpu", r.ppl_compressed}, {"device", r.device}, {"runs", runs},
                                 {"machine", experiment::machine_json()}, {"seconds_cpu_setup", s.seconds}});
        return 0;
    });
}
