// mixture_of_prompts — Dun et al. 2024, "Sweeping Heterogeneity with Smart MoPs": a Mixture of
// Prompts (experts of prompts injected at layer L_int, mixed per input by a gating network) against
// prompt tuning at L_int without a gate, on a pruned model whose tasks are the 7 Brown genre groups;
// trained centrally and federated over many non-i.i.d. clients.
//
//   mixture_of_prompts [--model models/dense-brown] [--brown-dir data/brown]
//       [--compressions sparsegpt:0.75,sparsegpt:0.85,sparsegpt:0.9,sparsegpt:2:4,sparsegpt:4:8,sparsegpt:3:4,sparsegpt:7:8]
//       [--experts 7 --per-expert 4 --inject-layer 1] [--steps 300 --gate-steps 30]
//       [--settings central,federated] [--clients 100 --active 10 --rounds 10 --local-steps 3]
//       [--ablate-layers 0,1,2,3] [--ablate-per-expert 1,2,4,8] [--out DIR] [--json PATH]
//
// N:M is written as the number of weights ZEROED in every group of M (2:4 and 4:8 are 50% sparse,
// 3:4 is 75%, 7:8 is 87.5%) — the convention of the whole library (compress/sparsity.hpp).
// For each compression (SparseGPT, calibrated on Brown train windows) and each setting:
//   baseline  prompt tuning at L_int without a gate (prompt::InjectedPrompt), as many prompt
//             vectors as the MoP has (experts × per_expert) and the same steps — Dun et al. match
//             compute this way;
//   MoPs      prompt::MixtureOfPrompts: the gate pretrained on the genre labels (expert d <-> genre
//             group d), then gate and prompts trained jointly (Alg. 1);
//   gain      baseline perplexity − MoPs perplexity (positive: MoPs better), and in % of baseline.
// Central: AdamW over the Brown train windows. Federated: FedAvg over --clients clients holding a
// skewed non-i.i.d. split (each genre's big partition on one client, Dun et al. App. A), --active a
// round, --local-steps each (the gate pretrained in the first rounds); the defaults give the
// federated runs as many client steps (10 rounds x 10 clients x 3) as the central runs have steps.
// Tables: Brown test perplexity per compression, central and federated (shaped like the paper's
// Tables 2 and 3); the effect of L_int (--ablate-layers) and of prompts per expert
// (--ablate-per-expert) on the first compression, centrally (Figs. 3–4). --out DIR gets the gate
// heatmaps before and after training per compression (gates_before.png / gates.png, Fig. 5);
// --json PATH every number, the settings, the wall time and the machine.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>
#include <mopt/train/federated.hpp>

#include "cli.hpp"
#include "experiment.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;
using cli::usage_check;

namespace {

struct Options {
    std::string model = "models/dense-brown", brown_dir = "data/brown", out, json;
    std::string compressions = "sparsegpt:0.75,sparsegpt:0.85,sparsegpt:0.9,sparsegpt:2:4,sparsegpt:4:8,sparsegpt:3:4,sparsegpt:7:8";
    std::string settings = "central,federated", ablate_layers = "0,1,2,3", ablate_per_expert = "1,2,4,8";
    std::int64_t experts = 7, per_expert = 4, inject_layer = 1, gate_dim = 64, steps = 300, gate_steps = 30;
    std::int64_t clients = 100, active = 10, rounds = 10, local_steps = 3, skew = 15;
    std::int64_t batch = 8, seq_len = 128, eval_windows = 64, calibration_windows = 32;
    float lr = 0.03f;
    std::uint64_t seed = 0;
    bool ablation_only = false;
};

// Baseline and MoPs perplexity of one compression in one setting.
struct Pair {
    double baseline = NAN, mop = NAN, seconds = 0;
    [[nodiscard]] double gain() const { return baseline - mop; }
    [[nodiscard]] nlohmann::json json() const {
        return {{"baseline", baseline}, {"mop", mop}, {"gain", gain()}, {"gain_percent", 100 * gain() / baseline},
                {"seconds", seconds}};
    }
};

std::vector<std::int64_t> parse_ints(const std::string& s, const char* flag, std::int64_t min) {
    std::vector<std::int64_t> out;
    if (s == "none") return out;
    for (const std::string& item : cli::split(s, ',')) {
        std::size_t used = 0;
        std::int64_t v = 0;
        try {
            v = std::stoll(item, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        usage_check(used == item.size() && !item.empty() && v >= min, "--", flag, " '", s, "': '", item,
                    "' is not an integer >= ", min);
        out.push_back(v);
    }
    return out;
}

template <class Mop>
class Experiment {
public:
    using Baseline = experiment::WithPrompt<Mop, prompt::InjectedPrompt>;

    Experiment(const Options& o, experiment::BrownData& d) : o_(o), d_(d) {}

    prompt::PromptConfig prompt_config(bool mop, std::int64_t inject_layer, std::int64_t per_expert) const {
        prompt::PromptConfig pc = experiment::vocab_prompt(o_.experts * per_expert, d_, o_.seed);
        pc.experts = mop ? o_.experts : 1;
        pc.inject_layer = inject_layer;
        pc.gate_dim = o_.gate_dim;
        return pc;
    }
    [[nodiscard]] std::int64_t gate_steps() const { return o_.experts == d_.domains() ? o_.gate_steps : 0; }
    // Federated runs pretrain the gate for the same share of their rounds as central runs of their
    // steps (at least one round when central runs pretrain it at all).
    [[nodiscard]] std::int64_t federated_gate_rounds(std::int64_t gate) const {
        if (gate == 0 || o_.rounds < 2) return 0;
        const double share = static_cast<double>(gate) / static_cast<double>(gate + o_.steps);
        return std::clamp<std::int64_t>(std::llround(share * static_cast<double>(o_.rounds)), 1, o_.rounds - 1);
    }

    // Trains the model's prompt (already initialised) in `setting` and returns the test perplexity.
    template <class Model>
    double train(Model& model, const std::string& setting) {
        const bool mop = Model::Prompt::name == std::string_view(prompt::MixtureOfPrompts::name);
        const std::int64_t gate = mop ? gate_steps() : 0;
        if (setting == "central")
            return experiment::tune_and_score(model, d_, {.steps = o_.steps, .gate_steps = gate, .lr = o_.lr}).ppl();
        const data::FederatedSplit split = data::skewed_split(d_.train, {.clients = o_.clients, .skew = o_.skew, .seed = o_.seed});
        const train::FederatedOptions fo{.clients = o_.clients, .active = o_.active, .rounds = o_.rounds, .seed = o_.seed};
        const train::PromptClientOptions co{.local_steps = o_.local_steps,
                                            .batch_size = o_.batch,
                                            .lr = o_.lr,
                                            .gate_rounds = federated_gate_rounds(gate),
                                            .seed = o_.seed};
        train::tune_prompt_federated(model, d_.train, &d_.val, split, fo, co,
                                     std::max<std::int64_t>(1, o_.rounds / 4), /*eval_batches=*/4);
        return eval::corpus_perplexity(model, d_.test, d_.eval_batches).ppl();
    }

    // Baseline and MoPs at (inject_layer, per_expert) on the compressed models `base`, `mop`.
    Pair compare(Baseline& base, Mop& mop, const std::string& setting, std::int64_t inject_layer, std::int64_t per_expert,
                 const fs::path& gate_maps = {}) {
        const auto t0 = std::chrono::steady_clock::now();
        Pair p;
        base.init_prompt(prompt_config(false, inject_layer, per_expert));
        p.baseline = train(base, setting);
        mop.init_prompt(prompt_config(true, inject_layer, per_expert));
        if (!gate_maps.empty())
            experiment::write_gate_map(mop, d_.test, gate_maps, "gates_before", "mean gate weight per genre, before training");
        p.mop = train(mop, setting);
        if (!gate_maps.empty())
            experiment::write_gate_map(mop, d_.test, gate_maps, "gates", "mean gate weight per genre, after training");
        p.seconds = experiment::seconds_since(t0);
        std::fprintf(stderr, "mixture_of_prompts: %s, L_int %lld, %lld per expert: baseline %.2f, MoPs %.2f (%.0f s)\n",
                     setting.c_str(), static_cast<long long>(inject_layer), static_cast<long long>(per_expert), p.baseline,
                     p.mop, p.seconds);
        return p;
    }

private:
    const Options& o_;
    experiment::BrownData& d_;
};

void print_table(const char* title, const std::vector<std::string>& names, const std::vector<double>& compressed,
                 const std::vector<Pair>& pairs) {
    std::printf("\n%s\n  %-26s %11s %10s %10s %14s\n", title, "compression", "no prompt", "baseline", "MoPs", "gain");
    for (std::size_t i = 0; i < names.size(); ++i)
        std::printf("  %-26s %11.2f %10.2f %10.2f %7.2f (%+.1f%%)\n", names[i].c_str(), compressed[i], pairs[i].baseline,
                    pairs[i].mop, pairs[i].gain(), 100 * pairs[i].gain() / pairs[i].baseline);
}

template <class Mop>
int run(const Options& o, Mop& dense) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<compress::Recipe> recipes;
    for (const std::string& spec : cli::split(o.compressions, ','))
        recipes.push_back(experiment::parse_compression(spec, "--compressions"));
    usage_check(!recipes.empty(), "--compressions is empty");
    const std::vector<std::string> settings = cli::split(o.settings, ',');
    for (const std::string& s : settings)
        usage_check(s == "central" || s == "federated", "--settings '", o.settings, "': '", s, "' is not central or federated");
    const std::vector<std::int64_t> layers = parse_ints(o.ablate_layers, "ablate-layers", 0);
    const std::vector<std::int64_t> per_expert = parse_ints(o.ablate_per_expert, "ablate-per-expert", 1);
    for (const auto l : layers)
        usage_check(l < dense.config().n_layers, "--ablate-layers: layer ", l, " is past the model's ", dense.config().n_layers,
                    " layers");
    usage_check(o.inject_layer < dense.config().n_layers, "--inject-layer ", o.inject_layer, " is past the model's ",
                dense.config().n_layers, " layers");
    std::int64_t longest = o.per_expert;
    for (const auto p : per_expert) longest = std::max(longest, p);
    usage_check(o.seq_len + o.experts * longest <= dense.config().max_seq, "--seq-len ", o.seq_len,
                " plus the longest prompt (", o.experts * longest, ") must fit the model's context of ", dense.config().max_seq);

    experiment::BrownData d = experiment::load_brown(
        fs::path(o.model) / "tokenizer.model", o.brown_dir,
        {.batch = o.batch, .seq_len = o.seq_len, .eval_windows = o.eval_windows, .seed = o.seed});
    if (o.experts != d.domains())
        std::fprintf(stderr, "mixture_of_prompts: %lld experts for %lld genre groups: the gate is not pretrained\n",
                     static_cast<long long>(o.experts), static_cast<long long>(d.domains()));
    const double ppl_dense = eval::corpus_perplexity(dense, d.test, d.eval_batches).ppl();
    const Tensor calibration = compress::calibration_windows(d.train, o.calibration_windows, o.seed);
    const fs::path work = fs::temp_directory_path() / ("mopt-mop-" + std::to_string(std::random_device{}()));
    Experiment<Mop> ex(o, d);

    std::vector<std::string> names;
    std::vector<double> compressed;
    std::vector<std::vector<Pair>> by_setting(settings.size());
    nlohmann::json ablation = nlohmann::json::object();
    for (std::size_t c = 0; c < recipes.size(); ++c) {
        Mop mop = Mop::load(o.model);
        compress::compress(mop, recipes[c], calibration);
        names.push_back(recipes[c].describe());
        compressed.push_back(eval::corpus_perplexity(mop, d.test, d.eval_batches).ppl());
        std::fprintf(stderr, "mixture_of_prompts: %s: test ppl %.2f (dense %.2f)\n", names.back().c_str(), compressed.back(),
                     ppl_dense);
        mop.save(work / "compressed");
        auto base = Experiment<Mop>::Baseline::load(work / "compressed");
        for (std::size_t s = 0; s < settings.size() && !o.ablation_only; ++s) {
            const fs::path maps = o.out.empty() || settings[s] != "central"
                                      ? fs::path()
                                      : fs::path(o.out) / experiment::short_name(recipes[c]);
            by_setting[s].push_back(ex.compare(base, mop, settings[s], o.inject_layer, o.per_expert, maps));
        }
        if (c == 0) {  // Figs. 3–4 on the first compression, centrally
            nlohmann::json lj = nlohmann::json::array(), pj = nlohmann::json::array();
            for (const auto l : layers) {
                nlohmann::json j = ex.compare(base, mop, "central", l, o.per_expert).json();
                j["inject_layer"] = l;
                lj.push_back(j);
            }
            for (const auto p : per_expert) {
                nlohmann::json j = ex.compare(base, mop, "central", o.inject_layer, p).json();
                j["per_expert"] = p;
                pj.push_back(j);
            }
            ablation = {{"compression", names.front()}, {"inject_layer", lj}, {"per_expert", pj}};
        }
    }
    std::error_code ec;
    fs::remove_all(work, ec);

    std::printf("\nBrown test perplexity (%lld windows of %lld tokens), %s; dense %.2f\n", static_cast<long long>(o.eval_windows),
                static_cast<long long>(o.seq_len), Mop::structure().describe().c_str(), ppl_dense);
    std::printf("baseline: %lld prompt vectors at layer %lld, no gate; MoPs: %lld experts x %lld at layer %lld, gated\n",
                static_cast<long long>(o.experts * o.per_expert), static_cast<long long>(o.inject_layer),
                static_cast<long long>(o.experts), static_cast<long long>(o.per_expert), static_cast<long long>(o.inject_layer));
    for (std::size_t s = 0; s < settings.size() && !o.ablation_only; ++s) {
        const std::string title =
            settings[s] == "central"
                ? mopt::detail::concat("Centralized (", o.steps, " steps)")
                : mopt::detail::concat("Federated (", o.clients, " clients, ", o.active, " a round, ", o.rounds, " rounds of ",
                                       o.local_steps, " local steps)");
        print_table(title.c_str(), names, compressed, by_setting[s]);
    }
    const auto print_ablation = [&](const char* key, const char* label) {
        if (ablation.empty() || ablation[key].empty()) return;
        std::printf("\nEffect of %s (%s, centralized)\n  %-16s %10s %10s %10s\n", label, names.front().c_str(), label,
                    "baseline", "MoPs", "gain");
        for (const auto& j : ablation[key])
            std::printf("  %-16lld %10.2f %10.2f %10.2f\n", static_cast<long long>(j[key].get<std::int64_t>()),
                        j["baseline"].get<double>(), j["mop"].get<double>(), j["gain"].get<double>());
    };
    print_ablation("inject_layer", "inject_layer");
    print_ablation("per_expert", "per_expert");
    const double seconds = experiment::seconds_since(t0);
    std::printf("(%.0f s)\n", seconds);

    nlohmann::json rows = nlohmann::json::array();
    for (std::size_t c = 0; c < recipes.size(); ++c) {
        nlohmann::json r{{"name", experiment::short_name(recipes[c])}, {"description", names[c]},
                         {"compression", recipes[c].to_json()}, {"ppl_compressed", compressed[c]}};
        for (std::size_t s = 0; s < settings.size() && !o.ablation_only; ++s) r[settings[s]] = by_setting[s][c].json();
        rows.push_back(r);
    }
    cli::write_json(o.json, {{"experiment", "mixture_of_prompts"},
                             {"model", o.model},
                             {"structure", Mop::structure().describe()},
                             {"ppl_dense", ppl_dense},
                             {"rows", rows},
                             {"ablation", ablation},
                             {"settings", o.ablation_only ? std::vector<std::string>{} : settings},
                             {"experts", o.experts},
                             {"per_expert", o.per_expert},
                             {"inject_layer", o.inject_layer},
                             {"gate_dim", o.gate_dim},
                             {"steps", o.steps},
                             {"gate_pretrain_steps", ex.gate_steps()},
                             {"lr", o.lr},
                             {"federated", {{"clients", o.clients}, {"active", o.active}, {"rounds", o.rounds},
                                            {"local_steps", o.local_steps}, {"skew", o.skew}}},
                             {"batch", o.batch},
                             {"seq_len", o.seq_len},
                             {"eval_windows", o.eval_windows},
                             {"seed", o.seed},
                             {"seconds", seconds},
                             {"machine", experiment::machine_json()}});
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("mixture_of_prompts", [&] {
        Options o;
        po::options_description opts(
            "mixture_of_prompts: Mixtures of Prompts against gate-less prompt tuning at the same layer on pruned models, "
            "centrally and federated, with the Brown genre groups as tasks (Dun et al. 2024)\n"
            "usage: mixture_of_prompts [options]");
        opts.add_options()
            ("help,h", "show this help")
            ("model", po::value(&o.model)->default_value(o.model), "base model folder (models/dense-brown or models/switch-brown)")
            ("compressions", po::value(&o.compressions)->default_value(o.compressions),
             "comma-separated compressions (N:M = N of every M zeroed), as in compress_then_prompt")
            ("experts", po::value(&o.experts)->default_value(o.experts), "MoP experts (7 = one per genre group, gate pretrained)")
            ("per-expert", po::value(&o.per_expert)->default_value(o.per_expert), "prompts per expert")
            ("inject-layer", po::value(&o.inject_layer)->default_value(o.inject_layer), "L_int: the layer prompts enter")
            ("gate-dim", po::value(&o.gate_dim)->default_value(o.gate_dim), "hidden width of the gate")
            ("steps", po::value(&o.steps)->default_value(o.steps), "central: joint training steps")
            ("gate-steps", po::value(&o.gate_steps)->default_value(o.gate_steps), "gate pretraining steps on genre labels")
            ("lr", po::value(&o.lr)->default_value(o.lr), "learning rate (AdamW centrally, constant for clients)")
            ("settings", po::value(&o.settings)->default_value(o.settings), "central, federated or both")
            ("clients", po::value(&o.clients)->default_value(o.clients), "federated: clients")
            ("active", po::value(&o.active)->default_value(o.active), "federated: clients per round")
            ("rounds", po::value(&o.rounds)->default_value(o.rounds), "federated: rounds")
            ("local-steps", po::value(&o.local_steps)->default_value(o.local_steps), "federated: local steps per round")
            ("skew", po::value(&o.skew)->default_value(o.skew), "federated: big partition / each other partition")
            ("ablate-layers", po::value(&o.ablate_layers)->default_value(o.ablate_layers),
             "L_int values compared on the first compression (none: no such ablation)")
            ("ablate-per-expert", po::value(&o.ablate_per_expert)->default_value(o.ablate_per_expert),
             "prompts-per-expert values compared on the first compression (none: no such ablation)")
            ("ablation-only", po::bool_switch(&o.ablation_only),
             "run only the ablations (on the first compression), not the settings' tables: to spread a sweep over processes")
            ("out", po::value(&o.out), "write gate heatmaps (before/after, per compression) here");
        experiment::add_run_options(opts, o);
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        for (auto [flag, v] : {std::pair{"experts", o.experts}, {"per-expert", o.per_expert}, {"gate-dim", o.gate_dim},
                               {"steps", o.steps}, {"clients", o.clients}, {"active", o.active}, {"rounds", o.rounds},
                               {"local-steps", o.local_steps}, {"skew", o.skew}, {"batch", o.batch}, {"seq-len", o.seq_len},
                               {"eval-windows", o.eval_windows}, {"calibration-windows", o.calibration_windows}})
            usage_check(v >= 1, "--", flag, " must be >= 1, got ", v);
        usage_check(o.gate_steps >= 0 && o.inject_layer >= 0, "--gate-steps and --inject-layer must be >= 0");
        usage_check(o.active <= o.clients, "--active ", o.active, " exceeds --clients ", o.clients);
        usage_check(fs::exists(fs::path(o.model) / "config.json"), "--model ", fs::path(o.model),
                    ": no Hugging Face folder (config.json) there");
        return experiment::with_base_model<prompt::MixtureOfPrompts>(o.model, [&](auto& model) { return run(o, model); });
    });
}
