// switch_soft_prompt — does a soft prompt rebalance the experts of a Switch (mixture-of-experts)
// model? (Bao et al.-style soft prompting of a Switch model; issue 7, item 3.) A soft prompt
// (Lester et al. 2021) is learned on the frozen Switch base model (models/switch-brown), plain and
// compressed, with and without the Switch load-balancing loss in the prompt's objective; the
// Brown test perplexity and the experts' load are measured before (the model alone) and after
// (the model with the learned prompt).
//
//   switch_soft_prompt [--model models/switch-brown] [--brown-dir data/brown] [--compression sparsegpt:0.5]
//                      [--prompt-len 50] [--steps 300] [--lr 0.03] [--aux-coef 0.01] [--batch 8]
//                      [--seq-len 128] [--eval-windows 64] [--calibration-windows 32] [--seed 0]
//                      [--out DIR] [--json PATH]
//
// The runs: {plain, compressed by --compression} × {aux off, aux on}. Each is a SoftPrompt of
// --prompt-len vectors, initialised from frequent train tokens with --seed (the same start for aux
// off and on), trained --steps steps on the Brown train windows (experiment::tune_and_score: AdamW,
// warmup, cosine decay, the best validation prompt kept). "aux on" adds α · Σ_layers E·Σ_e f_e·P_e
// to the next-token loss, with α = --aux-coef (Fedus et al. eq. 4; f_e the batch's share of tokens
// routed to expert e, P_e its mean router probability, E experts).
//
// How the load-balancing loss is wired. The prompt objective adds PromptTuningOptions::aux_loss_coef
// · out.aux_loss, and out.aux_loss is built by the SwitchFFN layers only where their own
// aux_loss_coef (config.json's router_aux_loss_coef, 0.01 for switch-brown) is > 0, already scaled
// by it, plus the router z-loss. To make --aux-coef the paper's α on the plain balance loss, this
// program sets every expert layer's aux_loss_coef to 1 and z_loss_coef to 0 before an "aux on" run
// (so out.aux_loss = Σ_layers E·Σ f·P, and the objective gets exactly --aux-coef times it), and both
// to 0 before an "aux off" run (no auxiliary graph at all). These are training-only terms: the
// forward output, and so every perplexity, does not depend on them.
//
// Expert load (eval::corpus_perplexity's ExpertLoad on the first --eval-windows test windows):
// per expert layer the share of routing assignments per expert, assignments dropped over capacity,
// and the mean router entropy. Summaries per layer and "overall" (the mean over expert layers):
//   CV          coefficient of variation of the shares, std/mean (0 = perfectly even)
//   max/mean    the busiest expert's share over the mean share 1/E (1 = even, E = one expert)
//   entropy     mean router entropy in nats (log E = uniform router); also ÷ log E in the JSON
//   balance     E·Σ_e f_e·P_e of each scored batch (nn::ExpertStats::aux_loss), token-weighted mean
//               over the batches — the quantity "aux on" penalises; 1 when tokens and router
//               probability are spread evenly. Measured in a second pass over the same windows.
// With a prompt the Switch layers also route the K prompt positions of every window (K of K + T
// positions), and those rows are the same in every window (causal attention: they see only
// each other). The measured load includes them. To tell them apart, the prompt rows are also run
// alone (capacity off) and the text positions' shares estimated as (all − windows × prompt rows)
// / text assignments: exact for the first expert layer, and for later ones as long as no prompt
// row was dropped over capacity upstream.
//
// Output: table 1 (condition; test ppl, CV and max/mean without → with the prompt, overall), table 2
// (per expert layer: CV, max/mean, entropy, balance, dropped; for prompted rows the text-only CV
// estimate and the prompt rows' busiest expert). --out DIR gets expert_load_<condition>.png (bars
// per expert, each layer without and with the prompt); --json PATH every number:
//   {"settings", "aux_loss_wiring", "models": {"plain"|"compressed": {"ppl", "ppl_per_domain",
//    "bytes", "load"}}, "runs": [{"condition", "model", "aux_coef", "ppl_without", "ppl_with",
//    "gap_recovered", "ppl_per_domain_with", "load_without", "load_with", "prompt_rows",
//    "text_share_estimate", "png", "seconds"}], "compression_report", "seconds", "machine"}
// where "load" = {"layers": [{"layer", "fraction", "dropped", "router_entropy", "tokens",
// "dropped_fraction", "cv", "max_over_mean", "router_entropy_normalised", "balance_loss"}],
// "overall": {"cv", "max_over_mean", "router_entropy", "router_entropy_normalised", "balance_loss",
// "dropped_fraction"}}; "gap_recovered" is null for the plain runs.
// Exit status: 0 done, 1 an error in a file or the run, 2 a bad command line.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
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
    std::string model = "models/switch-brown", brown_dir = "data/brown", compression = "sparsegpt:0.5",
                out = "runs/switch_soft_prompt", json;
    std::int64_t prompt_len = 50, steps = 300, batch = 8, seq_len = 128, eval_windows = 64, calibration_windows = 32;
    float lr = 0.03f, aux_coef = 0.01f;
    std::uint64_t seed = 0;
};

// One expert layer's balance, from its load over the scored windows.
struct LayerBalance {
    std::int64_t layer = 0;
    double cv = 0.0, max_over_mean = 0.0, entropy = 0.0, entropy_normalised = 0.0, dropped_fraction = 0.0;
    double balance_loss = NAN;
};
struct Balance {
    std::vector<LayerBalance> layers;
    LayerBalance overall;  // means over the expert layers
};

// Coefficient of variation and max/mean of shares that sum to 1 (mean 1/E).
void spread(const std::vector<double>& share, double& cv, double& max_over_mean) {
    const auto E = static_cast<double>(share.size());
    const double mean = 1.0 / E;
    double var = 0.0, top = 0.0;
    for (double s : share) {
        var += (s - mean) * (s - mean) / E;
        top = std::max(top, s);
    }
    cv = std::sqrt(var) / mean;
    max_over_mean = top / mean;
}

Balance summarize(const eval::CorpusPerplexity& p, const std::vector<double>& balance_loss) {
    check(!p.experts.empty(), "switch_soft_prompt: the evaluation reported no expert layer");
    check(balance_loss.size() == p.experts.size(), "switch_soft_prompt: ", balance_loss.size(),
          " balance values for ", p.experts.size(), " expert layers");
    Balance b;
    for (std::size_t l = 0; l < p.experts.size(); ++l) {
        const eval::ExpertLoad& e = p.experts[l];
        LayerBalance lb{.layer = e.layer, .entropy = e.router_entropy, .balance_loss = balance_loss[l]};
        spread(e.fraction, lb.cv, lb.max_over_mean);
        lb.entropy_normalised = e.router_entropy / std::log(static_cast<double>(e.fraction.size()));
        lb.dropped_fraction = e.tokens > 0 ? static_cast<double>(e.dropped) / static_cast<double>(e.tokens) : 0.0;
        b.layers.push_back(lb);
    }
    const auto n = static_cast<double>(b.layers.size());
    b.overall.layer = -1;
    b.overall.balance_loss = 0.0;
    for (const LayerBalance& lb : b.layers) {
        b.overall.cv += lb.cv / n;
        b.overall.max_over_mean += lb.max_over_mean / n;
        b.overall.entropy += lb.entropy / n;
        b.overall.entropy_normalised += lb.entropy_normalised / n;
        b.overall.dropped_fraction += lb.dropped_fraction / n;
        b.overall.balance_loss += lb.balance_loss / n;
    }
    return b;
}

// Token-weighted mean over the first max_batches batches of each expert layer's batch balance loss
// E·Σ_e f_e·P_e (nn::ExpertStats::aux_loss), under NoGrad: what corpus_perplexity's ExpertLoad does
// not keep (it has f but not P).
template <class Model>
std::vector<double> balance_loss(Model& model, data::Batches& batches, std::int64_t max_batches) {
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    std::vector<double> sum;
    std::vector<std::int64_t> tokens;
    data::Batch batch;
    batches.start_epoch(0);
    for (std::int64_t n = 0; n < max_batches && batches.next(batch); ++n) {
        tape.reset();
        const nn::ForwardOutput o = model.forward(tape, batch.ids);
        sum.resize(o.experts.size(), 0.0);
        tokens.resize(o.experts.size(), 0);
        for (std::size_t l = 0; l < o.experts.size(); ++l) {
            sum[l] += o.experts[l].aux_loss * static_cast<double>(o.experts[l].tokens);
            tokens[l] += o.experts[l].tokens;
        }
    }
    for (std::size_t l = 0; l < sum.size(); ++l) sum[l] /= static_cast<double>(std::max<std::int64_t>(tokens[l], 1));
    return sum;
}

// Sets what the expert layers add to out.aux_loss: the balance loss at weight 1 (on) or nothing
// (off); the router z-loss is left out either way (see the header).
template <class Model>
void set_balance_loss(Model& model, bool on) {
    for (auto& b : model.blocks())
        if (b.ffn.moe) {
            b.ffn.aux_loss_coef = on ? 1.0f : 0.0f;
            b.ffn.z_loss_coef = 0.0f;
        }
}

// The K prompt rows run alone through the model (positions 0..K−1, as in every prompted window),
// with no expert capacity limit: per expert layer, the share of the prompt rows' assignments each
// expert gets. SoftPrompt rows enter at the input; a learned-position model would also add its
// position rows, which this does not (the Switch types here use RoPE).
template <class Model>
std::vector<std::vector<double>> prompt_row_shares(Model& model) {
    static_assert(!Model::AttentionPolicy::learned_positions,
                  "prompt_row_shares runs the prompt rows without learned position embeddings");
    std::vector<float> capacity;
    for (auto& b : model.blocks()) {
        capacity.push_back(b.ffn.capacity_factor);
        b.ffn.capacity_factor = 0.0f;
    }
    autodiff::NoGrad no_grad;
    autodiff::Tape tape;
    const Tensor& rows = model.prompt().prompt.value();  // [K, d]
    autodiff::Var x = tape.constant(rows.reshape({1, rows.dim(0), rows.dim(1)}));
    nn::AttentionContext actx{.start_pos = 0};
    std::vector<nn::ExpertStats> stats;
    nn::FeedForwardContext fctx{.stats = &stats};
    for (std::size_t l = 0; l < model.blocks().size(); ++l) x = model.block(tape, l, x, actx, fctx);
    for (std::size_t l = 0; l < capacity.size(); ++l) model.blocks()[l].ffn.capacity_factor = capacity[l];
    std::vector<std::vector<double>> shares;
    for (const auto& s : stats) shares.push_back(s.fraction);
    return shares;
}

// The text positions' share per expert, estimated from the load over all routed positions minus
// windows × the prompt rows' assignments (prompt_row_shares). Negative counts (possible when a
// prompt row was dropped upstream and routed elsewhere) are clamped to 0 before normalising.
std::vector<double> text_shares(const eval::ExpertLoad& all, const std::vector<double>& prompt_share, std::int64_t K,
                                std::int64_t T) {
    check(all.tokens % (K + T) == 0, "switch_soft_prompt: expert layer ", all.layer, " routed ", all.tokens,
          " positions, not a multiple of the ", K + T, " per prompted window");
    const auto windows = static_cast<double>(all.tokens / (K + T));
    std::vector<double> count(all.fraction.size());
    double total = 0.0;
    for (std::size_t e = 0; e < count.size(); ++e) {
        count[e] = std::max(0.0, all.fraction[e] * static_cast<double>(all.tokens) -
                                     windows * prompt_share[e] * static_cast<double>(K));
        total += count[e];
    }
    for (double& c : count) c = total > 0.0 ? c / total : 0.0;
    return count;
}

nlohmann::json balance_json(const eval::CorpusPerplexity& p, const Balance& b) {
    nlohmann::json layers = experiment::expert_load(p);
    for (std::size_t l = 0; l < b.layers.size(); ++l) {
        const LayerBalance& lb = b.layers[l];
        layers[l]["tokens"] = p.experts[l].tokens;
        layers[l]["dropped_fraction"] = lb.dropped_fraction;
        layers[l]["cv"] = lb.cv;
        layers[l]["max_over_mean"] = lb.max_over_mean;
        layers[l]["router_entropy_normalised"] = lb.entropy_normalised;
        layers[l]["balance_loss"] = lb.balance_loss;
    }
    const LayerBalance& o = b.overall;
    return {{"layers", layers},
            {"overall", {{"cv", o.cv}, {"max_over_mean", o.max_over_mean}, {"router_entropy", o.entropy},
                         {"router_entropy_normalised", o.entropy_normalised}, {"balance_loss", o.balance_loss},
                         {"dropped_fraction", o.dropped_fraction}}}};
}

// A model without its prompt: perplexity, load and balance on the test windows.
struct Measured {
    eval::CorpusPerplexity eval;
    Balance balance;
};

// One prompt run on a model already measured without it.
struct Run {
    std::string condition, model, file_stem;
    float aux_coef = 0.0f;
    const Measured* without = nullptr;
    Measured with;
    std::vector<std::vector<double>> prompt_rows;    // per expert layer
    std::vector<std::vector<double>> text_share;     // per expert layer (estimate)
    std::vector<double> text_cv;                     // per expert layer (estimate)
    double seconds = 0.0;
};

template <class Model>
Measured measure(Model& model, experiment::BrownData& d, eval::CorpusPerplexity p) {
    const std::vector<double> bl = balance_loss(model, d.test, d.eval_batches);
    Balance b = summarize(p, bl);
    return {std::move(p), std::move(b)};
}

template <class Model>
int run(const Options& o, const compress::Recipe& recipe, Model& plain) {
    if constexpr (!Model::FFN::has_experts) {
        throw cli::UsageError(mopt::detail::concat("--model ", fs::path(o.model), " is ", Model::structure().describe(),
                                                   ", a dense model; this experiment needs a Switch (mixture-of-experts) model"));
    } else {
        const auto t0 = std::chrono::steady_clock::now();
        const nn::ModelConfig& mc = plain.config();
        const std::int64_t K = o.prompt_len, T = o.seq_len;
        usage_check(T + K <= mc.max_seq, "--seq-len ", T, " plus --prompt-len ", K, " must fit the model's context max_seq = ",
                    mc.max_seq);
        experiment::BrownData d = experiment::load_brown(fs::path(o.model) / "tokenizer.model", o.brown_dir,
                                                         {.batch = o.batch, .seq_len = T, .eval_windows = o.eval_windows,
                                                          .seed = o.seed});
        if (!o.out.empty()) fs::create_directories(o.out);

        // The models alone: plain, and compressed (calibrated on train windows).
        Measured plain_alone = measure(plain, d, eval::corpus_perplexity(plain, d.test, d.eval_batches));
        const std::int64_t bytes_plain = plain.parameter_bytes();
        std::fprintf(stderr, "switch_soft_prompt: %s, test ppl %.3f, CV %.3f (%.0f s)\n",
                     Model::structure().describe().c_str(), plain_alone.eval.ppl(), plain_alone.balance.overall.cv,
                     experiment::seconds_since(t0));
        Model compressed = io::load_model<Model>(o.model);
        const Tensor calibration = compress::calibration_windows(d.train, o.calibration_windows, o.seed);
        const compress::CompressionReport rep = compress::compress(compressed, recipe, calibration);
        Measured compressed_alone = measure(compressed, d, eval::corpus_perplexity(compressed, d.test, d.eval_batches));
        std::fprintf(stderr, "switch_soft_prompt: %s: test ppl %.3f, CV %.3f (%.0f s)\n", recipe.describe().c_str(),
                     compressed_alone.eval.ppl(), compressed_alone.balance.overall.cv, experiment::seconds_since(t0));

        const prompt::PromptConfig pc = experiment::vocab_prompt(K, d, o.seed);
        const std::string cname = experiment::short_name(recipe);
        std::vector<Run> runs;
        for (int which = 0; which < 2; ++which) {
            Model& model = which == 0 ? plain : compressed;
            for (const bool aux : {false, true}) {
                const auto t_run = std::chrono::steady_clock::now();
                Run r;
                r.model = which == 0 ? "plain" : "compressed";
                r.aux_coef = aux ? o.aux_coef : 0.0f;
                r.condition = (which == 0 ? std::string("plain") : cname) + (aux ? ", aux on" : ", aux off");
                r.file_stem = (which == 0 ? std::string("plain") : cname) + (aux ? "_aux_on" : "_aux_off");
                std::replace(r.file_stem.begin(), r.file_stem.end(), ':', '-');
                std::replace(r.file_stem.begin(), r.file_stem.end(), '+', '_');
                r.without = which == 0 ? &plain_alone : &compressed_alone;
                set_balance_loss(model, aux);
                model.init_prompt(pc);  // the same initial prompt for every run
                std::fprintf(stderr, "switch_soft_prompt: %s: tuning %lld prompt vectors for %lld steps\n",
                             r.condition.c_str(), static_cast<long long>(K), static_cast<long long>(o.steps));
                eval::CorpusPerplexity with =
                    experiment::tune_and_score(model, d, {.steps = o.steps, .lr = o.lr, .aux_loss_coef = r.aux_coef});
                r.with = measure(model, d, std::move(with));
                r.prompt_rows = prompt_row_shares(model);
                for (std::size_t l = 0; l < r.with.eval.experts.size(); ++l) {
                    r.text_share.push_back(text_shares(r.with.eval.experts[l], r.prompt_rows.at(l), K, T));
                    double cv = 0.0, mm = 0.0;
                    spread(r.text_share.back(), cv, mm);
                    r.text_cv.push_back(cv);
                }
                if (!o.out.empty())
                    experiment::write_expert_load(r.without->eval, r.with.eval, fs::path(o.out) / ("expert_load_" + r.file_stem + ".png"));
                r.seconds = experiment::seconds_since(t_run);
                std::fprintf(stderr, "switch_soft_prompt: %s: test ppl %.3f -> %.3f, CV %.3f -> %.3f (%.0f s)\n",
                             r.condition.c_str(), r.without->eval.ppl(), r.with.eval.ppl(), r.without->balance.overall.cv,
                             r.with.balance.overall.cv, r.seconds);
                runs.push_back(std::move(r));
            }
        }
        set_balance_loss(plain, false);
        set_balance_loss(compressed, false);

        // Table 1: the answer in one screen.
        const std::int64_t E = mc.num_experts;
        std::printf("\nSoft prompt (%lld vectors, %lld steps) on %s, %lld experts; Brown test, %lld windows of %lld tokens\n",
                    static_cast<long long>(K), static_cast<long long>(o.steps), Model::structure().describe().c_str(),
                    static_cast<long long>(E), static_cast<long long>(o.eval_windows), static_cast<long long>(T));
        std::printf("overall = mean over the %zu expert layers; aux on: alpha = %g on E*sum f*P\n",
                    plain_alone.balance.layers.size(), static_cast<double>(o.aux_coef));
        std::printf("  %-28s %9s %9s   %7s %7s   %8s %8s\n", "condition", "ppl w/o", "ppl with", "CV w/o", "CV with",
                    "max/mean", "max/mean");
        std::printf("  %-28s %9s %9s   %7s %7s   %8s %8s\n", "", "", "", "", "", "w/o", "with");
        for (const Run& r : runs)
            std::printf("  %-28s %9.3f %9.3f   %7.3f %7.3f   %8.3f %8.3f\n", r.condition.c_str(), r.without->eval.ppl(),
                        r.with.eval.ppl(), r.without->balance.overall.cv, r.with.balance.overall.cv,
                        r.without->balance.overall.max_over_mean, r.with.balance.overall.max_over_mean);

        // Table 2: per expert layer.
        std::printf("\nPer expert layer (entropy in nats, uniform = %.3f; balance = E*sum f*P, even = 1;\n"
                    "text CV: the text positions alone, estimated; prompt top: the prompt rows' busiest expert)\n",
                    std::log(static_cast<double>(E)));
        std::printf("  %-34s %5s %7s %8s %8s %8s %8s %8s %12s\n", "condition", "layer", "CV", "max/mean", "entropy",
                    "balance", "dropped", "text CV", "prompt top");
        const auto row = [&](const std::string& name, const LayerBalance& lb, const std::string& text_cv,
                             const std::string& prompt_top) {
            std::printf("  %-34s %5lld %7.3f %8.3f %8.3f %8.3f %7.2f%% %8s %12s\n", name.c_str(), static_cast<long long>(lb.layer),
                        lb.cv, lb.max_over_mean, lb.entropy, lb.balance_loss, 100.0 * lb.dropped_fraction, text_cv.c_str(),
                        prompt_top.c_str());
        };
        for (const auto& [name, m] : {std::pair<std::string, const Measured*>{"plain, no prompt", &plain_alone},
                                      {cname + ", no prompt", &compressed_alone}})
            for (const LayerBalance& lb : m->balance.layers) row(name, lb, "", "");
        for (const Run& r : runs)
            for (std::size_t l = 0; l < r.with.balance.layers.size(); ++l) {
                const std::vector<double>& pr = r.prompt_rows[l];
                const auto top = std::max_element(pr.begin(), pr.end());
                char cv[32], pt[32];
                std::snprintf(cv, sizeof cv, "%.3f", r.text_cv[l]);
                std::snprintf(pt, sizeof pt, "e%td %.0f%%", top - pr.begin(), 100.0 * *top);
                row(r.condition + " + prompt", r.with.balance.layers[l], cv, pt);
            }
        const double seconds = experiment::seconds_since(t0);
        std::printf("(%.0f s)\n", seconds);

        // JSON: every number, the settings and the machine.
        const auto model_json = [&](const Measured& m, std::int64_t bytes) {
            return nlohmann::json{{"ppl", m.eval.ppl()}, {"ppl_per_domain", experiment::per_domain(m.eval)},
                                  {"test_tokens", m.eval.tokens}, {"bytes", bytes}, {"load", balance_json(m.eval, m.balance)}};
        };
        nlohmann::json runs_json = nlohmann::json::array();
        for (const Run& r : runs) {
            nlohmann::json text = nlohmann::json::array(), prompt_rows = nlohmann::json::array();
            for (std::size_t l = 0; l < r.text_share.size(); ++l) {
                text.push_back({{"layer", r.with.eval.experts[l].layer}, {"fraction", r.text_share[l]}, {"cv", r.text_cv[l]}});
                prompt_rows.push_back({{"layer", r.with.eval.experts[l].layer}, {"fraction", r.prompt_rows[l]}});
            }
            runs_json.push_back(
                {{"condition", r.condition},
                 {"model", r.model},
                 {"aux_coef", r.aux_coef},
                 {"ppl_without", r.without->eval.ppl()},
                 {"ppl_with", r.with.eval.ppl()},
                 {"gap_recovered", r.model == "compressed"
                                       ? nlohmann::json(experiment::gap_recovered(plain_alone.eval.ppl(),
                                                                                  compressed_alone.eval.ppl(), r.with.eval.ppl()))
                                       : nlohmann::json()},
                 {"ppl_per_domain_with", experiment::per_domain(r.with.eval)},
                 {"load_without", balance_json(r.without->eval, r.without->balance)},
                 {"load_with", balance_json(r.with.eval, r.with.balance)},
                 {"prompt_rows", prompt_rows},
                 {"text_share_estimate", text},
                 {"png", o.out.empty() ? nlohmann::json() : nlohmann::json((fs::path(o.out) / ("expert_load_" + r.file_stem + ".png")).string())},
                 {"seconds", r.seconds}});
        }
        nlohmann::json machine = experiment::machine_json();
        machine["hardware_concurrency"] = std::thread::hardware_concurrency();
        machine["omp_max_threads"] = omp_get_max_threads();
        cli::write_json(
            o.json,
            {{"settings",
              {{"model", o.model}, {"structure", Model::structure().describe()}, {"num_experts", E},
               {"experts_per_token", mc.experts_per_token}, {"capacity_factor", mc.capacity_factor},
               {"config_router_aux_loss_coef", mc.aux_loss_coef}, {"compression", recipe.to_json()},
               {"compression_name", cname}, {"prompt_len", K}, {"prompt_init", "vocab"}, {"steps", o.steps},
               {"lr", o.lr}, {"aux_coef", o.aux_coef}, {"batch", o.batch}, {"seq_len", T},
               {"eval_windows", o.eval_windows}, {"calibration_windows", o.calibration_windows}, {"seed", o.seed},
               {"brown_dir", o.brown_dir}}},
             {"aux_loss_wiring",
              "expert layers' aux_loss_coef set to 1 and z_loss_coef to 0 for aux on (both 0 for aux off), so the "
              "prompt objective is loss + aux_coef * sum over expert layers of E*sum_e f_e*P_e"},
             {"models", {{"plain", model_json(plain_alone, bytes_plain)},
                         {"compressed", model_json(compressed_alone, rep.model_bytes_after)}}},
             {"runs", runs_json},
             {"compression_report", {{"bytes_before", rep.model_bytes_before}, {"bytes_after", rep.model_bytes_after},
                                     {"calibration_windows", rep.windows}, {"seconds", rep.seconds}}},
             {"seconds", seconds},
             {"machine", machine}});
        return 0;
    }
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("switch_soft_prompt", [&] {
        Options o;
        po::options_description opts(
            "switch_soft_prompt: does a soft prompt rebalance the experts of a Switch model? Tunes a soft prompt "
            "on the plain and the compressed model, without and with the load-balancing loss, and prints test "
            "perplexity and expert load without and with the prompt\nusage: switch_soft_prompt [options]");
        opts.add_options()
            ("help,h", "show this help")
            ("model", po::value(&o.model)->default_value(o.model), "Switch model folder (config.json, tokenizer.model)")
            ("compression", po::value(&o.compression)->default_value(o.compression),
             "recipe of the compressed runs: sparsegpt:0.5, wanda:2:4, gptq:4, rtn:3:64, int8, sparsegpt:0.5+gptq:4")
            ("prompt-len", po::value(&o.prompt_len)->default_value(o.prompt_len), "soft prompt vectors K")
            ("steps", po::value(&o.steps)->default_value(o.steps), "prompt training steps per run")
            ("lr", po::value(&o.lr)->default_value(o.lr), "prompt learning rate (AdamW)")
            ("aux-coef", po::value(&o.aux_coef)->default_value(o.aux_coef),
             "alpha of the load-balancing loss alpha * E * sum f*P in the aux-on runs")
            ("out", po::value(&o.out)->default_value(o.out), "folder for the expert-load charts ('' : none)");
        experiment::add_run_options(opts, o);
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        for (auto [flag, v] : {std::pair{"prompt-len", o.prompt_len}, {"steps", o.steps}, {"batch", o.batch},
                               {"seq-len", o.seq_len}, {"eval-windows", o.eval_windows},
                               {"calibration-windows", o.calibration_windows}})
            usage_check(v >= 1, "--", flag, " must be >= 1, got ", v);
        usage_check(o.seq_len >= 2, "--seq-len must be >= 2 (a window predicts its next tokens), got ", o.seq_len);
        usage_check(o.lr > 0.0f && std::isfinite(o.lr), "--lr must be positive, got ", o.lr);
        usage_check(o.aux_coef > 0.0f && std::isfinite(o.aux_coef), "--aux-coef must be positive (it weights the aux-on runs), got ",
                    o.aux_coef);
        const compress::Recipe recipe = experiment::parse_compression(o.compression, "--compression");
        usage_check(fs::exists(fs::path(o.model) / "config.json"), "--model ", fs::path(o.model),
                    ": no Hugging Face folder (config.json) there");
        return experiment::with_prompt_model<prompt::SoftPrompt>(o.model,
                                                                 [&](auto& model) { return run(o, recipe, model); });
    });
}
