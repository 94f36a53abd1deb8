// compress_then_prompt — Xu et al. 2023, "Compress, Then Prompt": compress a base model, then learn
// a soft prompt on the frozen compressed model and see how much of the lost perplexity it wins back.
//
//   compress_then_prompt [--model models/dense-brown | models/switch-brown] [--brown-dir data/brown]
//       [--compressions sparsegpt:0.5,sparsegpt:0.625,sparsegpt:0.75,gptq:4,gptq:3,gptq:2,sparsegpt:0.5+gptq:4]
//       [--prompt-lens 25,50,100] [--transfer-len 100] [--transfer-text FILE] [--steps 300]
//       [--kd-weight 0] [--kd-temperature 1] [--out DIR] [--prompts-from DIR] [--json PATH]
//
// For each compression (examples/experiment.hpp's parse_compression spells them) the base model is
// compressed (calibrated on Brown train windows), then one soft prompt per length in --prompt-lens is
// learned on it (AdamW on the prompt only, best validation prompt kept). The prompt's objective is
// the next-token loss, or with --kd-weight w > 0, (1 − w)·LM + w·KD: knowledge distillation from
// the dense base model (its next-token distribution at temperature --kd-temperature, Hinton et al.
// 2015; train/prompt_tuning.hpp); validation stays on perplexity. Three tables:
//   1. Brown test perplexity: dense, compressed, compressed + K-token prompt, and the share of the
//      gap (compressed − dense) each prompt wins back;
//   2. the cross-compression transfer matrix: the --transfer-len prompt learned on one compression
//      (row) scored on every other compressed model (column) — Xu et al.'s transferability;
//   3. with --transfer-text FILE: cross-dataset transfer, the same prompts (learned on Brown) scored
//      on windows of any plain-text file: dense, compressed, compressed + prompt.
// The experiment as types (the Compression slot takes the recipe at run time):
//   nn::Transformer<nn::Llama, nn::DenseFFN<…>, compress::Any, prompt::SoftPrompt>
//   nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer>, compress::Any, prompt::SoftPrompt>
// --out DIR keeps the prompts (PEFT files, DIR/prompts/<compression>-K<len>/); --prompts-from DIR
// trains nothing and scores the prompts an earlier run kept there (so the compressions can be trained
// by separate processes, one each, and the tables made by one run over all); --json PATH writes
// every number with the settings, wall time and machine (scripts/results reads it).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
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

struct Options {
    std::string model = "models/dense-brown", brown_dir = "data/brown", out, json, transfer_text, prompts_from;
    std::string compressions = "sparsegpt:0.5,sparsegpt:0.625,sparsegpt:0.75,gptq:4,gptq:3,gptq:2,sparsegpt:0.5+gptq:4";
    std::string prompt_lens = "25,50,100";
    std::int64_t transfer_len = 100, steps = 300, batch = 8, seq_len = 128, eval_windows = 64, calibration_windows = 32;
    float lr = 0.03f, kd_weight = 0.0f, kd_temperature = 1.0f;
    std::uint64_t seed = 0;
};

struct Row {
    compress::Recipe recipe;
    std::string name;
    std::int64_t bytes = 0;
    double ppl = 0, ppl_text = NAN, ppl_text_prompt = NAN, seconds = 0;
    std::vector<double> prompted;  // per --prompt-lens
};

std::vector<std::int64_t> parse_lengths(const std::string& s) {
    std::vector<std::int64_t> out;
    for (const std::string& item : cli::split(s, ',')) {
        std::size_t used = 0;
        std::int64_t k = 0;
        try {
            k = std::stoll(item, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        usage_check(used == item.size() && !item.empty() && k >= 1, "--prompt-lens '", s, "': '", item,
                    "' is not a positive prompt length");
        out.push_back(k);
    }
    usage_check(!out.empty(), "--prompt-lens is empty");
    return out;
}

template <class Model>
int run(const Options& o, Model& dense) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<compress::Recipe> recipes;
    for (const std::string& spec : cli::split(o.compressions, ','))
        recipes.push_back(experiment::parse_compression(spec, "--compressions"));
    usage_check(!recipes.empty(), "--compressions is empty");
    const std::vector<std::int64_t> lens = parse_lengths(o.prompt_lens);
    const auto transfer_at = std::find(lens.begin(), lens.end(), o.transfer_len);
    usage_check(o.transfer_len == 0 || transfer_at != lens.end(), "--transfer-len ", o.transfer_len,
                " is not one of --prompt-lens (", o.prompt_lens, "); 0 turns transfer off");
    const std::int64_t T = o.seq_len;
    usage_check(T + *std::max_element(lens.begin(), lens.end()) <= dense.config().max_seq, "--seq-len ", T,
                " plus the longest prompt must fit the model's context of ", dense.config().max_seq);

    experiment::BrownData d = experiment::load_brown(fs::path(o.model) / "tokenizer.model", o.brown_dir,
                                                     {.batch = o.batch, .seq_len = T, .eval_windows = o.eval_windows, .seed = o.seed});
    std::optional<data::Batches> text;
    if (!o.transfer_text.empty()) {
        usage_check(fs::is_regular_file(o.transfer_text), "--transfer-text ", fs::path(o.transfer_text), ": no such file");
        text.emplace(data::read_text_file(o.transfer_text), d.tok, data::BatchOptions{.batch_size = o.batch, .seq_len = T, .seed = 0});
    }
    const auto text_ppl = [&](Model& m) { return text ? eval::corpus_perplexity(m, *text, d.eval_batches).ppl() : NAN; };

    const double ppl_dense = eval::corpus_perplexity(dense, d.test, d.eval_batches).ppl();
    const double ppl_dense_text = text_ppl(dense);
    const std::int64_t bytes_dense = dense.parameter_bytes();
    std::fprintf(stderr, "compress_then_prompt: dense %.2f MB, test ppl %.2f\n", bytes_dense / 1e6, ppl_dense);

    const fs::path out = o.out.empty() ? fs::temp_directory_path() / ("mopt-ctp-" + std::to_string(std::random_device{}()))
                                       : fs::path(o.out);
    const auto prompt_dir = [&](const Row& r, std::int64_t k) {
        return (o.prompts_from.empty() ? out : fs::path(o.prompts_from)) / "prompts" / (r.name + "-K" + std::to_string(k));
    };
    const Tensor calibration = compress::calibration_windows(d.train, o.calibration_windows, o.seed);
    // The distillation teacher: the dense model, run alone (its prompt slot is never built).
    const train::Teacher teacher = o.kd_weight > 0.0f ? train::teacher_of(dense) : train::Teacher{};
    std::vector<Row> rows;
    std::vector<Model> compressed;  // kept for the transfer matrix
    for (const compress::Recipe& recipe : recipes) {
        const auto tr = std::chrono::steady_clock::now();
        Row r{.recipe = recipe, .name = experiment::short_name(recipe)};
        Model m = Model::load(o.model);
        r.bytes = compress::compress(m, recipe, calibration).model_bytes_after;
        r.ppl = eval::corpus_perplexity(m, d.test, d.eval_batches).ppl();
        r.ppl_text = text_ppl(m);
        std::fprintf(stderr, "compress_then_prompt: %s: %.2f MB, test ppl %.2f\n", recipe.describe().c_str(), r.bytes / 1e6, r.ppl);
        for (const std::int64_t k : lens) {
            m.init_prompt(experiment::vocab_prompt(k, d, o.seed));
            if (o.prompts_from.empty()) {
                r.prompted.push_back(experiment::tune_and_score(m, d,
                                                                {.steps = o.steps, .lr = o.lr, .teacher = teacher,
                                                                 .kd_weight = o.kd_weight, .kd_temperature = o.kd_temperature})
                                         .ppl());
                io::save_prompt(m.prompt(), prompt_dir(r, k));
            } else {  // learned by an earlier run (e.g. one process per compression), scored here
                io::load_prompt(m.prompt(), prompt_dir(r, k));
                r.prompted.push_back(eval::corpus_perplexity(m, d.test, d.eval_batches).ppl());
            }
            std::fprintf(stderr, "compress_then_prompt: %s + %lld-token prompt: test ppl %.2f (%.0f s)\n", r.name.c_str(),
                         static_cast<long long>(k), r.prompted.back(), experiment::seconds_since(t0));
            if (k == o.transfer_len) r.ppl_text_prompt = text_ppl(m);
        }
        r.seconds = experiment::seconds_since(tr);
        rows.push_back(std::move(r));
        compressed.push_back(std::move(m));
    }

    // The transfer matrix: prompt of row s (at --transfer-len) on the model of column t.
    std::vector<std::vector<double>> transfer;
    if (o.transfer_len > 0) {
        transfer.assign(rows.size(), std::vector<double>(rows.size(), NAN));
        for (std::size_t t = 0; t < rows.size(); ++t)
            for (std::size_t s = 0; s < rows.size(); ++s) {
                io::load_prompt(compressed[t].prompt(), prompt_dir(rows[s], o.transfer_len));
                transfer[s][t] = eval::corpus_perplexity(compressed[t], d.test, d.eval_batches).ppl();
            }
    }
    std::error_code ec;
    if (o.out.empty()) fs::remove_all(out, ec);

    // Table 1.
    std::printf("\nBrown test perplexity (%lld windows of %lld tokens), %s, prompts trained %lld steps%s\n",
                static_cast<long long>(o.eval_windows), static_cast<long long>(T), Model::structure().describe().c_str(),
                static_cast<long long>(o.steps),
                o.kd_weight > 0.0f ? mopt::detail::concat(" (KD from the dense model, weight ", o.kd_weight, ", temperature ",
                                                          o.kd_temperature, ")").c_str()
                                   : "");
    std::printf("  %-28s %8s %9s", "compression", "MB", "ppl");
    for (const auto k : lens) std::printf(" %9s %6s", ("K=" + std::to_string(k)).c_str(), "gap");
    std::printf("\n  %-28s %8.2f %9.2f\n", "dense", bytes_dense / 1e6, ppl_dense);
    for (const Row& r : rows) {
        std::printf("  %-28s %8.2f %9.2f", r.recipe.describe().c_str(), r.bytes / 1e6, r.ppl);
        for (const double p : r.prompted) std::printf(" %9.2f %5.0f%%", p, 100 * experiment::gap_recovered(ppl_dense, r.ppl, p));
        std::printf("\n");
    }
    std::printf("  (gap: share of the perplexity compression lost that the prompt wins back)\n");
    // Table 2.
    if (!transfer.empty()) {
        std::printf("\nTransfer: the %lld-token prompt learned on <row> scored on <column> (test ppl)\n",
                    static_cast<long long>(o.transfer_len));
        std::printf("  %-22s", "learned on \\ scored on");
        for (const Row& r : rows) std::printf(" %14s", r.name.c_str());
        std::printf("\n  %-22s", "(no prompt)");
        for (const Row& r : rows) std::printf(" %14.2f", r.ppl);
        for (std::size_t s = 0; s < rows.size(); ++s) {
            std::printf("\n  %-22s", rows[s].name.c_str());
            for (const double p : transfer[s]) std::printf(" %14.2f", p);
        }
        std::printf("\n");
    }
    // Table 3.
    if (text) {
        std::printf("\nCross-dataset: prompts learned on Brown, scored on %s (%lld windows)\n", o.transfer_text.c_str(),
                    static_cast<long long>(o.eval_windows));
        std::printf("  %-28s %10s %10s\n", "compression", "no prompt", ("K=" + std::to_string(o.transfer_len)).c_str());
        std::printf("  %-28s %10.2f\n", "dense", ppl_dense_text);
        for (const Row& r : rows) std::printf("  %-28s %10.2f %10.2f\n", r.recipe.describe().c_str(), r.ppl_text, r.ppl_text_prompt);
    }
    const double seconds = experiment::seconds_since(t0);
    std::printf("(%.0f s)\n", seconds);

    nlohmann::json jr = nlohmann::json::array();
    for (const Row& r : rows) {
        nlohmann::json prompted = nlohmann::json::object(), recovered = nlohmann::json::object();
        for (std::size_t i = 0; i < lens.size(); ++i) {
            prompted[std::to_string(lens[i])] = r.prompted[i];
            recovered[std::to_string(lens[i])] = experiment::gap_recovered(ppl_dense, r.ppl, r.prompted[i]);
        }
        nlohmann::json row{{"name", r.name},         {"compression", r.recipe.to_json()}, {"bytes", r.bytes},
                           {"ppl_compressed", r.ppl}, {"ppl_prompt", prompted},            {"gap_recovered", recovered},
                           {"seconds", r.seconds}};
        if (text) row["transfer_text"] = {{"ppl_compressed", r.ppl_text}, {"ppl_prompt", r.ppl_text_prompt}};
        jr.push_back(row);
    }
    nlohmann::json j{{"experiment", "compress_then_prompt"},
                     {"model", o.model},
                     {"structure", Model::structure().describe()},
                     {"ppl_dense", ppl_dense},
                     {"bytes_dense", bytes_dense},
                     {"prompt_lens", lens},
                     {"rows", jr},
                     {"steps", o.steps},
                     {"lr", o.lr},
                     {"kd_weight", o.kd_weight},
                     {"kd_temperature", o.kd_temperature},
                     {"batch", o.batch},
                     {"seq_len", T},
                     {"eval_windows", o.eval_windows},
                     {"calibration_windows", o.calibration_windows},
                     {"seed", o.seed},
                     {"prompts_from", o.prompts_from},
                     {"seconds", seconds},
                     {"machine", experiment::machine_json()}};
    if (!transfer.empty()) j["transfer"] = {{"prompt_len", o.transfer_len}, {"ppl", transfer}};
    if (text) j["transfer_text"] = {{"file", o.transfer_text}, {"ppl_dense", ppl_dense_text}};
    cli::write_json(o.json, j);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("compress_then_prompt", [&] {
        Options o;
        po::options_description opts(
            "compress_then_prompt: compress a base model several ways, learn soft prompts of several lengths on each, "
            "and measure how much perplexity they win back, how they transfer across compressions and to other "
            "text (Xu et al. 2023)\nusage: compress_then_prompt [options]");
        opts.add_options()
            ("help,h", "show this help")
            ("model", po::value(&o.model)->default_value(o.model), "base model folder: models/dense-brown or models/switch-brown")
            ("compressions", po::value(&o.compressions)->default_value(o.compressions),
             "comma-separated compressions: sparsegpt:0.5 (fraction zeroed), wanda:2:4 (N of M zeroed), gptq:4, rtn:3:64 "
             "(bits[:group]), int8, sparsegpt:0.5+gptq:4")
            ("prompt-lens", po::value(&o.prompt_lens)->default_value(o.prompt_lens), "comma-separated soft prompt lengths")
            ("transfer-len", po::value(&o.transfer_len)->default_value(o.transfer_len),
             "prompt length of the transfer tables (one of --prompt-lens; 0: no transfer)")
            ("transfer-text", po::value(&o.transfer_text), "plain-text file: also score the prompts there (cross-dataset)")
            ("steps", po::value(&o.steps)->default_value(o.steps), "prompt training steps")
            ("lr", po::value(&o.lr)->default_value(o.lr), "prompt learning rate (AdamW)")
            ("kd-weight", po::value(&o.kd_weight)->default_value(o.kd_weight),
             "w in [0, 1]: train the prompt on (1 - w) next-token loss + w distillation from the dense model (0: no teacher)")
            ("kd-temperature", po::value(&o.kd_temperature)->default_value(o.kd_temperature),
             "temperature of the distillation loss (> 0)")
            ("out", po::value(&o.out), "keep the learned prompts here (default: a temporary folder, removed)")
            ("prompts-from", po::value(&o.prompts_from),
             "do not train: score the prompts an earlier run kept with --out in this folder (same compressions, lengths)");
        experiment::add_run_options(opts, o);
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        for (auto [flag, v] : {std::pair{"steps", o.steps}, {"batch", o.batch}, {"seq-len", o.seq_len},
                               {"eval-windows", o.eval_windows}, {"calibration-windows", o.calibration_windows}})
            usage_check(v >= 1, "--", flag, " must be >= 1, got ", v);
        usage_check(o.transfer_len >= 0, "--transfer-len must be >= 0, got ", o.transfer_len);
        usage_check(o.kd_weight >= 0.0f && o.kd_weight <= 1.0f, "--kd-weight must be in [0, 1], got ", o.kd_weight);
        usage_check(std::isfinite(o.kd_temperature) && o.kd_temperature > 0.0f, "--kd-temperature must be > 0, got ",
                    o.kd_temperature);
        usage_check(fs::exists(fs::path(o.model) / "config.json"), "--model ", fs::path(o.model),
                    ": no Hugging Face folder (config.json) there");
        return experiment::with_base_model<prompt::SoftPrompt>(o.model, [&](auto& model) { return run(o, model); });
    });
}
