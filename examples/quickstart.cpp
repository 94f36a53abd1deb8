// quickstart — "compress, then prompt" in a few minutes on a laptop-class CPU: the committed dense
// base model (models/dense-brown) is compressed, then a soft prompt and a Mixture of Prompts are
// learned on the frozen compressed model to win back the perplexity compression lost. Prints one
// table of Brown test perplexity: dense / compressed / compressed + soft prompt / compressed + MoP.
//
//   quickstart [--model models/dense-brown] [--brown-dir data/brown] [--json PATH]
//              [--method sparsegpt --sparsity 0.75 | --method nm --nm-zero 2 --nm-group 4 | …]
//              [--prompt-len 20] [--steps 150] [--experts 7 --per-expert 4 --inject-layer 1]
//
// The experiment as types (the model's Compression slot takes the recipe at run time):
//   nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::Any, prompt::SoftPrompt>
//   nn::Transformer<nn::Llama, nn::DenseFFN<>, compress::Any, prompt::MixtureOfPrompts>
// Both prompts are trained on the same Brown train windows with AdamW (the model frozen), the
// best validation prompt kept; perplexity is measured on the first --eval-windows windows of the
// Brown test split, the same windows for every row. The compressed model is written once and
// loaded into the MoP type, so the two prompts see bit-identical compressed weights.
// --json PATH writes {"ppl_dense", "ppl_compressed", "ppl_prompt", "ppl_mop", "gap_recovered_prompt",
// "gap_recovered_mop", "bytes_dense", "bytes_compressed", "seconds", settings}.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>

#include "cli.hpp"
#include "experiment.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;
using cli::usage_check;

namespace {

using SoftModel = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::Any, prompt::SoftPrompt>;
using MopModel = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::Any, prompt::MixtureOfPrompts>;

struct Options {
    std::string model = "models/dense-brown", brown_dir = "data/brown", json, method = "sparsegpt", work;
    double sparsity = 0.75;
    int nm_zero = 2, nm_group = 4, bits = 4;
    std::int64_t prompt_len = 20, experts = 7, per_expert = 4, inject_layer = 1, gate_dim = 64;
    std::int64_t steps = 150, mop_steps = 150, gate_steps = 30, batch = 8, seq_len = 128;
    std::int64_t eval_windows = 64, calibration_windows = 32;
    float lr = 0.03f, mop_lr = 0.03f;
    std::uint64_t seed = 0;
};

compress::Recipe recipe_of(const Options& o) {
    compress::Recipe r;
    if (o.method == "nm") {
        r.prune = compress::Saliency::sparsegpt;
        r.sparsity = {.ratio = 0.0, .nm_zero = o.nm_zero, .nm_group = o.nm_group};
    } else if (o.method == "magnitude" || o.method == "wanda" || o.method == "sparsegpt") {
        r.prune = compress::parse_saliency(o.method);
        r.sparsity.ratio = o.sparsity;
    } else if (o.method == "rtn" || o.method == "gptq") {
        r.quantizer = compress::parse_quantizer(o.method);
        r.quant.bits = o.bits;
    } else {
        throw cli::UsageError("--method must be magnitude, wanda, sparsegpt, nm, rtn or gptq, got '" + o.method + "'");
    }
    try {
        r.validate("quickstart");
    } catch (const Error& e) {
        throw cli::UsageError(e.what());
    }
    return r;
}

int run(const Options& o) {
    const auto t0 = std::chrono::steady_clock::now();
    const compress::Recipe recipe = recipe_of(o);
    usage_check(fs::exists(fs::path(o.model) / "config.json"), "--model ", fs::path(o.model),
                ": no Hugging Face folder (config.json) there");
    const std::int64_t T = o.seq_len;
    experiment::BrownData d = experiment::load_brown(fs::path(o.model) / "tokenizer.model", o.brown_dir,
                                                     {.batch = o.batch, .seq_len = T, .eval_windows = o.eval_windows, .seed = o.seed});
    data::Batches &train = d.train, &test = d.test;
    const std::int64_t eval_batches = d.eval_batches;

    // 1. The dense model.
    SoftModel model = SoftModel::load(o.model);
    usage_check(T + std::max(o.prompt_len, o.experts * o.per_expert) <= model.config().max_seq, "--seq-len ", T,
                " plus the prompt must fit the model's context of ", model.config().max_seq);
    const std::int64_t bytes_dense = model.parameter_bytes();
    const double ppl_dense = eval::corpus_perplexity(model, test, eval_batches).ppl();
    std::fprintf(stderr, "quickstart: dense model %.2f MB, test ppl %.2f (%.0f s)\n", bytes_dense / 1e6, ppl_dense,
                 experiment::seconds_since(t0));

    // 2. Compressed, calibrated on windows of the train split, then saved for the MoP type.
    const Tensor calibration = compress::calibration_windows(train, o.calibration_windows, o.seed);
    const compress::CompressionReport rep = compress::compress(model, recipe, calibration);
    const double ppl_compressed = eval::corpus_perplexity(model, test, eval_batches).ppl();
    std::fprintf(stderr, "quickstart: %s: %.2f MB, test ppl %.2f (%.0f s)\n", recipe.describe().c_str(),
                 rep.model_bytes_after / 1e6, ppl_compressed, experiment::seconds_since(t0));
    const fs::path work = o.work.empty() ? fs::temp_directory_path() / ("mopt-quickstart-" + std::to_string(std::random_device{}()))
                                         : fs::path(o.work);
    model.save(work / "compressed");

    // 3. A soft prompt on the frozen compressed model.
    model.init_prompt(experiment::vocab_prompt(o.prompt_len, d, o.seed));
    const double ppl_prompt = experiment::tune_and_score(model, d, {.steps = o.steps, .lr = o.lr}).ppl();
    std::fprintf(stderr, "quickstart: + soft prompt (%lld tokens): test ppl %.2f (%.0f s)\n",
                 static_cast<long long>(o.prompt_len), ppl_prompt, experiment::seconds_since(t0));

    // 4. A Mixture of Prompts (Dun et al.): experts × per_expert prompts at layer L_int, a gate
    //    pretrained on the domain labels (expert d <-> Brown group d), then trained jointly.
    MopModel mop = MopModel::load(work / "compressed");
    prompt::PromptConfig pc = experiment::vocab_prompt(o.experts * o.per_expert, d, o.seed);
    pc.experts = o.experts;
    pc.inject_layer = o.inject_layer;
    pc.gate_dim = o.gate_dim;
    mop.init_prompt(pc);
    const std::int64_t gate_steps = o.experts == d.domains() ? o.gate_steps : 0;
    const double ppl_mop =
        experiment::tune_and_score(mop, d, {.steps = o.mop_steps, .gate_steps = gate_steps, .lr = o.mop_lr}).ppl();
    std::error_code ec;
    if (o.work.empty()) fs::remove_all(work, ec);

    const auto recovered = [&](double p) { return experiment::gap_recovered(ppl_dense, ppl_compressed, p); };
    std::printf("\nBrown test perplexity (%lld windows of %lld tokens), %s\n", static_cast<long long>(o.eval_windows),
                static_cast<long long>(T), SoftModel::structure().describe().c_str());
    std::printf("  %-44s %10s %10s %16s\n", "model", "MB", "ppl", "gap recovered");
    std::printf("  %-44s %10.2f %10.2f\n", "dense", bytes_dense / 1e6, ppl_dense);
    std::printf("  %-44s %10.2f %10.2f\n", ("compressed: " + recipe.describe()).c_str(), rep.model_bytes_after / 1e6,
                ppl_compressed);
    std::printf("  %-44s %10.2f %10.2f %15.0f%%\n",
                ("compressed + soft prompt (" + std::to_string(o.prompt_len) + " tokens)").c_str(),
                rep.model_bytes_after / 1e6, ppl_prompt, 100 * recovered(ppl_prompt));
    std::printf("  %-44s %10.2f %10.2f %15.0f%%\n",
                ("compressed + MoP (" + std::to_string(o.experts) + "x" + std::to_string(o.per_expert) + " at layer " +
                 std::to_string(o.inject_layer) + ")")
                    .c_str(),
                rep.model_bytes_after / 1e6, ppl_mop, 100 * recovered(ppl_mop));
    const double seconds = experiment::seconds_since(t0);
    std::printf("(%.0f s)\n", seconds);
    cli::write_json(o.json, {{"ppl_dense", ppl_dense},
                             {"ppl_compressed", ppl_compressed},
                             {"ppl_prompt", ppl_prompt},
                             {"ppl_mop", ppl_mop},
                             {"gap_recovered_prompt", recovered(ppl_prompt)},
                             {"gap_recovered_mop", recovered(ppl_mop)},
                             {"bytes_dense", bytes_dense},
                             {"bytes_compressed", rep.model_bytes_after},
                             {"compression", recipe.to_json()},
                             {"prompt_len", o.prompt_len},
                             {"experts", o.experts},
                             {"per_expert", o.per_expert},
                             {"inject_layer", o.inject_layer},
                             {"steps", o.steps},
                             {"mop_steps", o.mop_steps},
                             {"gate_pretrain_steps", gate_steps},
                             {"eval_windows", o.eval_windows},
                             {"seq_len", T},
                             {"model", o.model},
                             {"seconds", seconds},
                             {"machine", experiment::machine_json()}});
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("quickstart", [&] {
        Options o;
        po::options_description opts(
            "quickstart: compress the dense base model, then learn a soft prompt and a Mixture of Prompts that win "
            "back what compression lost; prints Brown test perplexity of each\nusage: quickstart [options]");
        opts.add_options()
            ("help,h", "show this help")
            ("model", po::value(&o.model)->default_value(o.model), "dense Llama model folder (config.json, tokenizer.model)")
            ("method", po::value(&o.method)->default_value(o.method), "magnitude, wanda, sparsegpt, nm (SparseGPT N:M), rtn or gptq")
            ("sparsity", po::value(&o.sparsity)->default_value(o.sparsity), "unstructured pruning: fraction of each row zeroed")
            ("nm-zero", po::value(&o.nm_zero)->default_value(o.nm_zero), "--method nm: weights ZEROED in every group of --nm-group")
            ("nm-group", po::value(&o.nm_group)->default_value(o.nm_group), "--method nm: group size M")
            ("bits", po::value(&o.bits)->default_value(o.bits), "rtn/gptq: bits per weight (groups of 128)")
            ("prompt-len", po::value(&o.prompt_len)->default_value(o.prompt_len), "soft prompt tokens")
            ("experts", po::value(&o.experts)->default_value(o.experts), "MoP experts (7 = one per Brown group, gate pretrained)")
            ("per-expert", po::value(&o.per_expert)->default_value(o.per_expert), "MoP prompts per expert")
            ("inject-layer", po::value(&o.inject_layer)->default_value(o.inject_layer), "MoP injection layer L_int")
            ("steps", po::value(&o.steps)->default_value(o.steps), "soft prompt training steps")
            ("mop-steps", po::value(&o.mop_steps)->default_value(o.mop_steps), "MoP joint training steps")
            ("gate-steps", po::value(&o.gate_steps)->default_value(o.gate_steps), "MoP gate pretraining steps")
            ("lr", po::value(&o.lr)->default_value(o.lr), "soft prompt learning rate (AdamW)")
            ("mop-lr", po::value(&o.mop_lr)->default_value(o.mop_lr), "MoP learning rate (AdamW)")
            ("work", po::value(&o.work), "folder for the compressed model (default: a temporary folder, removed)");
        experiment::add_run_options(opts, o);
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        for (auto [flag, v] : {std::pair{"prompt-len", o.prompt_len}, {"experts", o.experts}, {"per-expert", o.per_expert},
                               {"steps", o.steps}, {"mop-steps", o.mop_steps}, {"batch", o.batch}, {"seq-len", o.seq_len},
                               {"eval-windows", o.eval_windows}, {"calibration-windows", o.calibration_windows}})
            usage_check(v >= 1, "--", flag, " must be >= 1, got ", v);
        usage_check(o.gate_steps >= 0 && o.inject_layer >= 0, "--gate-steps and --inject-layer must be >= 0");
        return run(o);
    });
}
