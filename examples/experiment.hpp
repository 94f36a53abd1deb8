#pragma once
// What the experiment programs share (quickstart, compress_then_prompt, mixture_of_prompts,
// switch_soft_prompt): the Brown corpus in examples/pretrain's split, batched for training,
// validation and test; compression recipes written on the command line; "train this prompt, then
// score the test windows"; and the fraction of the compression gap a prompt wins back.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <mopt/mopt.hpp>

#include "cli.hpp"
#include "model_dispatch.hpp"

namespace mopt::experiment {

inline double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Where a run ran, for the results page: CPU model, hardware threads, OpenMP threads used.
inline nlohmann::json machine_json() {
    std::string cpu = "unknown";
    std::ifstream info("/proc/cpuinfo");
    for (std::string line; std::getline(info, line);)
        if (line.rfind("model name", 0) == 0) {
            cpu = line.substr(line.find(':') + 2);
            break;
        }
    return {{"cpu", cpu},
            {"hardware_threads", std::thread::hardware_concurrency()},
            {"threads", backend::cpu::max_threads()}};
}

// The Brown corpus (7 genre groups = domains), split as examples/pretrain split it (seed 1234), and
// tokenized with the model's tokenizer. Test perplexity is measured on the first `eval_windows`
// windows of the test split, the same windows for every row of a table.
struct BrownData {
    data::Tokenizer tok;
    data::CorpusSplits splits;
    data::Batches train, val, test;
    std::int64_t eval_batches;
    std::vector<std::int32_t> frequent_ids;  // train ids, most frequent first (vocab prompt initialisation)

    [[nodiscard]] std::int64_t domains() const { return static_cast<std::int64_t>(splits.train.domains.size()); }
};

// A prompt of `length` rows initialised from the embeddings of the Brown train split's most frequent
// tokens (Lester et al.'s vocabulary initialisation), as every experiment starts its prompts.
inline prompt::PromptConfig vocab_prompt(std::int64_t length, const BrownData& d, std::uint64_t seed) {
    prompt::PromptConfig pc;
    pc.length = length;
    pc.init = prompt::PromptInit::vocab;
    pc.frequent_ids = d.frequent_ids;
    pc.seed = seed;
    return pc;
}

struct BrownOptions {
    std::int64_t batch = 8, seq_len = 128, eval_windows = 64;
    std::uint64_t seed = 0;
};

inline BrownData load_brown(const std::filesystem::path& tokenizer, const std::string& brown_dir, const BrownOptions& o) {
    cli::usage_check(std::filesystem::is_directory(brown_dir), "--brown-dir ", std::filesystem::path(brown_dir),
                     ": no such folder (scripts/setup downloads the Brown corpus there)");
    data::Tokenizer tok = data::Tokenizer::load(tokenizer);
    data::CorpusSplits splits = data::split_corpus(data::read_brown(brown_dir, data::BrownDomains::groups7), 1234);
    data::Batches train(splits.train, tok, {.batch_size = o.batch, .seq_len = o.seq_len, .seed = o.seed});
    data::Batches val(splits.validation, tok, {.batch_size = o.batch, .seq_len = o.seq_len, .seed = 0});
    data::Batches test(splits.test, tok, {.batch_size = o.batch, .seq_len = o.seq_len, .seed = 0});
    std::vector<std::int32_t> frequent = data::ids_by_frequency(train.streams());
    return {std::move(tok), std::move(splits), std::move(train), std::move(val), std::move(test), (o.eval_windows + o.batch - 1) / o.batch,
            std::move(frequent)};
}

// A compression recipe from its command-line spelling; parts joined by '+' (prune, then quantise):
//   magnitude:0.5  wanda:75%  sparsegpt:0.625     unstructured pruning, fraction (or percent) zeroed
//   sparsegpt:2:4  wanda:7:8                      N:M pruning, N weights ZEROED in every group of M
//   gptq:4  rtn:3  gptq:4:64                      bits [: group size, default 128]
//   int8                                          absmax int8
//   sparsegpt:0.5+gptq:4                          both
inline compress::Recipe parse_compression(const std::string& spec, const std::string& flag) {
    const auto bad = [&](const std::string& why) {
        return cli::UsageError(flag + " '" + spec + "': " + why +
                               " (e.g. sparsegpt:0.5, wanda:2:4, gptq:4, rtn:3:64, int8, sparsegpt:0.5+gptq:4)");
    };
    const auto number = [&](const std::string& s) {
        std::size_t used = 0;
        double v = 0;
        try {
            v = std::stod(s, &used);
        } catch (const std::exception&) {
            throw bad("'" + s + "' is not a number");
        }
        if (used == s.size()) return v;
        if (used + 1 == s.size() && s.back() == '%') return v / 100.0;
        throw bad("'" + s + "' is not a number");
    };
    const auto integer = [&](const std::string& s) {
        const double v = number(s);
        if (v != static_cast<double>(static_cast<std::int64_t>(v))) throw bad("'" + s + "' is not an integer");
        return static_cast<std::int64_t>(v);
    };
    compress::Recipe r;
    for (const std::string& part : cli::split(spec, '+')) {
        const std::vector<std::string> f = cli::split(part, ':');
        if (f.empty() || f[0].empty()) throw bad("empty part");
        if (f[0] == "magnitude" || f[0] == "wanda" || f[0] == "sparsegpt") {
            if (r.prune) throw bad("two pruning parts");
            r.prune = compress::parse_saliency(f[0]);
            if (f.size() == 2) {
                r.sparsity.ratio = number(f[1]);
            } else if (f.size() == 3) {
                r.sparsity.nm_zero = static_cast<int>(integer(f[1]));
                r.sparsity.nm_group = static_cast<int>(integer(f[2]));
            } else {
                throw bad(f[0] + " needs a sparsity (" + f[0] + ":0.5) or N:M (" + f[0] + ":2:4)");
            }
        } else if (f[0] == "rtn" || f[0] == "gptq") {
            if (r.quantizer != compress::Quantizer::none) throw bad("two quantisation parts");
            if (f.size() < 2 || f.size() > 3) throw bad(f[0] + " needs bits (" + f[0] + ":4) and optionally a group size");
            r.quantizer = compress::parse_quantizer(f[0]);
            r.quant.bits = static_cast<int>(integer(f[1]));
            if (f.size() == 3) r.quant.group = integer(f[2]);
        } else if (f[0] == "int8") {
            if (r.quantizer != compress::Quantizer::none) throw bad("two quantisation parts");
            if (f.size() != 1) throw bad("int8 takes no arguments");
            r.quantizer = compress::Quantizer::int8;
        } else {
            throw bad("unknown method '" + f[0] + "'");
        }
    }
    try {
        r.validate(flag + " '" + spec + "'");
    } catch (const Error& e) {
        throw cli::UsageError(e.what());
    }
    return r;
}

// A short name for tables and file names: "sparsegpt50", "gptq4", "sparsegpt2:4", "sparsegpt50+gptq4".
inline std::string short_name(const compress::Recipe& r) {
    std::string s;
    if (r.prune) {
        s = std::string(compress::name(*r.prune));
        if (r.sparsity.structured())
            s += mopt::detail::concat(r.sparsity.nm_zero, ":", r.sparsity.nm_group);
        else
            s += mopt::detail::concat(r.sparsity.ratio * 100.0);
    }
    if (r.quantizer != compress::Quantizer::none) {
        if (!s.empty()) s += "+";
        s += r.quantizer == compress::Quantizer::int8 ? std::string("int8")
                                                      : mopt::detail::concat(compress::name(r.quantizer), r.quant.bits);
    }
    return s;
}

// The flags every experiment program takes for its data and its output; O has brown_dir, batch,
// seq_len, eval_windows, calibration_windows, seed and json.
template <class O>
void add_run_options(boost::program_options::options_description& opts, O& o) {
    namespace po = boost::program_options;
    opts.add_options()
        ("brown-dir", po::value(&o.brown_dir)->default_value(o.brown_dir), "where scripts/setup put the Brown corpus")
        ("batch", po::value(&o.batch)->default_value(o.batch), "windows per step and per scored batch")
        ("seq-len", po::value(&o.seq_len)->default_value(o.seq_len), "text tokens per window")
        ("eval-windows", po::value(&o.eval_windows)->default_value(o.eval_windows), "Brown test windows scored")
        ("calibration-windows", po::value(&o.calibration_windows)->default_value(o.calibration_windows),
         "Brown train windows that calibrate the compression")
        ("seed", po::value(&o.seed)->default_value(o.seed), "seed of batches, calibration, splits and prompt initialisation")
        ("json", po::value(&o.json), "write every number as JSON to this file");
}

// Fraction of the compression gap (compressed - dense perplexity) that `ppl` wins back.
inline double gap_recovered(double dense, double compressed, double ppl) {
    return compressed > dense ? (compressed - ppl) / (compressed - dense) : 0.0;
}

struct TuneOptions {
    std::int64_t steps = 300, gate_steps = 0;
    float lr = 0.03f, aux_loss_coef = 0.0f;
    train::Teacher teacher;                     // knowledge distillation: e.g. train::teacher_of(dense)
    float kd_weight = 0.0f, kd_temperature = 1.0f;  // objective (1 − w)·LM + w·KD (0: LM only)
    std::int64_t eval_batches = 4;  // validation batches per check
    bool show_progress = true;
};

// Trains the model's prompt (already built by init_prompt) on the Brown train windows, keeps the
// best validation prompt, and returns the test perplexity (prompt included) with expert load. With a
// teacher and kd_weight > 0 the prompt also learns to match the teacher's next-token distribution.
template <class Model>
eval::CorpusPerplexity tune_and_score(Model& model, BrownData& d, const TuneOptions& o) {
    train::PromptTuningOptions to{.steps = o.steps,
                                  .gate_pretrain_steps = o.gate_steps,
                                  .lr = o.lr,
                                  .warmup = o.steps / 10,
                                  .aux_loss_coef = o.aux_loss_coef,
                                  .teacher = o.teacher,
                                  .kd_weight = o.kd_weight,
                                  .kd_temperature = o.kd_temperature,
                                  .eval_every = std::max<std::int64_t>(o.steps / 3, 1),
                                  .eval_batches = o.eval_batches,
                                  .log_every = 25,
                                  .show_progress = o.show_progress};
    train::tune_prompt(model, d.train, &d.val, to);
    return eval::corpus_perplexity(model, d.test, d.eval_batches);
}

// The same model type with prompt policy P in the Prompt slot.
template <class Base, class P>
using WithPrompt = nn::Transformer<typename Base::Family, typename Base::FFN, typename Base::Compression, P,
                                   typename Base::BackendType>;

// Loads --model into the type its config.json describes (examples/model_dispatch.hpp's list) with
// prompt policy P, and returns f(model).
template <class P, class F>
int with_prompt_model(const std::filesystem::path& path, F&& f) {
    using namespace examples;
    const auto run = [&]<class Base>(std::type_identity<Base>) {
        auto model = io::load_model<WithPrompt<Base, P>>(path);
        return f(model);
    };
    const std::filesystem::path config = examples::detail::config_json_of(path);
    if (config.empty()) return run(std::type_identity<DenseLlama>{});
    const io::HfConfig hf = io::read_hf_config(config);
    if (examples::detail::computes<DenseLlama>(hf.structure)) return run(std::type_identity<DenseLlama>{});
    if (examples::detail::computes<SwitchEveryOther>(hf.structure)) return run(std::type_identity<SwitchEveryOther>{});
    if (examples::detail::computes<SwitchEveryLayer>(hf.structure)) return run(std::type_identity<SwitchEveryLayer>{});
    if constexpr (!ExampleBackend::is_cuda) {  // CPU only (model_dispatch.hpp)
        if (examples::detail::computes<Mixtral>(hf.structure)) return run(std::type_identity<Mixtral>{});
        if (examples::detail::computes<Gpt>(hf.structure)) return run(std::type_identity<Gpt>{});
    }
    throw Error(mopt::detail::concat("config '", config.string(), "': ", hf.architecture, " is ",
                                     hf.structure.describe(), ", a structure this program is not compiled for (backend ",
                                     ExampleBackend::name, ")"));
}

nlohmann::json per_domain(const eval::CorpusPerplexity& p) {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& d : p.domains)
        if (d.tokens > 0) j[d.domain] = d.ppl();
    return j;
}
nlohmann::json expert_load(const eval::CorpusPerplexity& p) {
    nlohmann::json load = nlohmann::json::array();
    for (const auto& e : p.experts)
        load.push_back({{"layer", e.layer}, {"fraction", e.fraction}, {"dropped", e.dropped},
                        {"router_entropy", e.router_entropy}});
    return load;
}

// Mean gate weight per domain over the test split (Dun et al. Fig. 5): CSV and heatmap in `out`.
template <class Model>
void write_gate_map(Model& model, data::Batches& test, const std::filesystem::path& out, const std::string& stem,
                    const std::string& title) {
    std::filesystem::create_directories(out);
    eval::GateByDomain gates(test.streams().domains, model.prompt().config().experts);
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    data::Batch batch;
    test.start_epoch(0);
    while (test.next(batch)) {
        tape.reset();
        const nn::ForwardOutput o = model.forward(tape, batch.ids);
        std::vector<std::int64_t> domains(static_cast<std::size_t>(batch.size()));
        for (std::int64_t b = 0; b < batch.size(); ++b) domains[static_cast<std::size_t>(b)] = batch.domains.data<std::int32_t>()[b];
        gates.add(o.gate.value(), domains);
    }
    gates.write_csv(out / (stem + ".csv"));
    gates.write_png(out / (stem + ".png"), title);
}

// Each expert layer's load (share of tokens per expert) before and after the prompt, as bars.
void write_expert_load(const eval::CorpusPerplexity& before, const eval::CorpusPerplexity& after, const std::filesystem::path& file) {
    eval::BarChart chart{.title = "expert load on the test split, without and with the prompt", .x_label = "expert",
                         .y_label = "share of tokens"};
    for (std::size_t e = 0; e < before.experts.front().fraction.size(); ++e) chart.categories.push_back(std::to_string(e));
    for (std::size_t l = 0; l < before.experts.size(); ++l) {
        chart.groups.push_back({.label = "layer " + std::to_string(before.experts[l].layer) + " without", .y = before.experts[l].fraction});
        chart.groups.push_back({.label = "layer " + std::to_string(after.experts[l].layer) + " with prompt", .y = after.experts[l].fraction});
    }
    eval::write_png(file, chart, 900, 500);
}

// Like with_prompt_model, for the two base-model structures the experiments run (models/dense-brown
// and models/switch-brown): fewer instantiations, so the experiment programs build faster.
template <class P, class F>
int with_base_model(const std::filesystem::path& path, F&& f) {
    const auto run = [&]<class Base>(std::type_identity<Base>) {
        auto model = io::load_model<WithPrompt<Base, P>>(path);
        return f(model);
    };
    const io::HfConfig hf = io::read_hf_config(path / "config.json");
    if (examples::detail::computes<examples::DenseLlama>(hf.structure)) return run(std::type_identity<examples::DenseLlama>{});
    if (examples::detail::computes<examples::SwitchEveryOther>(hf.structure))
        return run(std::type_identity<examples::SwitchEveryOther>{});
    throw Error(mopt::detail::concat("--model ", path, ": ", hf.structure.describe(),
                                     " is neither of the experiments' base structures (", examples::DenseLlama::structure().describe(),
                                     "; ", examples::SwitchEveryOther::structure().describe(), ")"));
}

}  // namespace mopt::experiment
