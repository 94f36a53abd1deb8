// prompt_tune — learn a prompt for a frozen pretrained model (dense or Switch, compressed or not) on
// the Brown corpus, and measure what it buys: test perplexity before (the model alone) and after
// (the model with the learned prompt), overall and per domain (the Brown genre groups).
//
//   prompt_tune --model models/dense-brown --policy soft --prompt-len 20 --steps 500
//   prompt_tune --model models/switch-brown --policy injected --inject-layer 2
//   prompt_tune --model models/dense-brown --policy mop --experts 7 --gate-pretrain-steps 100
//   prompt_tune --model models/dense-brown --policy mop --federated --clients 100 --active 10 --rounds 50
//   prompt_tune --model compressed/ --prompt runs/prompt/prompt        (transfer: evaluate a prompt
//                                                                       learned on another model)
//
// Policies (mopt/prompt/): soft = SoftPrompt (K vectors before the input, Lester et al.),
// injected = InjectedPrompt (K vectors entering at layer L_int; no backward below it), mop =
// MixtureOfPrompts (E experts of K/E prompts at L_int, weighted by a gate; Dun et al., Alg. 1).
// --prompt-len counts ALL prompt vectors; with --experts E each expert holds K/E of them.
//
// Centralised (default): train/prompt_tuning.hpp — AdamW with linear warmup and cosine decay,
// validation perplexity every --eval-every steps, the best prompt kept; optional gate pretraining
// (MoP) on the domain labels with expert e <-> domain e. Checkpoints go to --out/run; running the
// same command again resumes (--fresh starts over); Ctrl-C checkpoints and stops.
// Federated (--federated): train/federated.hpp — the skewed non-i.i.d. split of Dun et al. (App. A)
// of the training windows over --clients clients, --rounds rounds of --active clients doing
// --local-steps steps each, FedAvg; gate pretraining takes the first ceil(G / local steps) rounds.
//
// Data: the Brown corpus (--brown-dir), domains --domains (groups7 by default), split by documents
// with --split-seed 1234 — examples/pretrain's split, so the test split is the one the base models'
// recorded perplexities use. Windows of --seq-len text tokens (default: the model's max_seq minus
// the prompt's positions, so prompt + text fit its context); "before" is measured on the same windows.
//
// Writes under --out: prompt/ (io::save_prompt: PEFT's adapter files for soft/injected, mopt's
// layout for MoP), run/ (log.csv, checkpoints), result.json; --json PATH writes the result there too:
//   {"ppl_before", "ppl_after", "ppl_per_domain": {domain: ppl}, "ppl_per_domain_before", "steps",
//    "trainable_params", "policy", "prompt_len", "inject_layer", "experts", "best_val_ppl", ...}
// Exit status: 0 done (or stopped by a signal, resumable), 1 an error in a file or the run, 2 a bad
// command line.
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <type_traits>
#include <vector>

#include <mopt/mopt.hpp>
#include <mopt/train/federated.hpp>
#include <mopt/train/prompt_tuning.hpp>

#include "cli.hpp"
#include "experiment.hpp"
#include "model_dispatch.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;
using cli::usage_check;
using namespace mopt::experiment;

namespace {

std::atomic<bool> stop_requested{false};
extern "C" void on_signal(int) { stop_requested = true; }

struct Options {
    std::string model, tokenizer, policy = "soft", init = "vocab", init_text, prompt_dir, brown_dir = "data/brown",
                                   domains = "groups7", out = "runs/prompt", json;
    std::int64_t prompt_len = 20, inject_layer = -1, experts = 0, gate_dim = 64, top_k = 0, steps = 500, batch = 8,
                 seq_len = 0, warmup = 50, eval_every = 100, eval_batches = 20, gate_pretrain_steps = 0,
                 clients = 100, active = 10, rounds = 50, local_steps = 10, skew = 15, ckpt_every = 100, log_every = 10;
    float lr = 1e-2f, min_lr_ratio = 0.1f, weight_decay = 0.0f, clip = 1.0f, aux_loss_coef = 0.0f;
    std::uint64_t seed = 1, split_seed = 1234;
    bool federated = false, unweighted = false, fresh = false;
};


template <class Model>
int tune(const Options& o, Model& model, const data::CorpusSplits& splits) {
    using Policy = typename Model::Prompt;
    constexpr bool is_mop = std::is_same_v<Policy, prompt::MixtureOfPrompts>;
    const nn::ModelConfig& mc = model.config();
    const auto start_time = std::chrono::steady_clock::now();
    fs::path tok_path;
    const data::Tokenizer tok = examples::load_tokenizer(o.tokenizer, o.model, mc.vocab_size, tok_path);

    // The prompt's numbers (defaults that depend on the model and the data are filled in here).
    const auto D = static_cast<std::int64_t>(splits.train.domains.size());
    prompt::PromptConfig pc;
    pc.experts = is_mop ? (o.experts > 0 ? o.experts : D) : 1;
    usage_check(is_mop || o.experts <= 1, "--experts ", o.experts, " applies to --policy mop only");
    pc.length = o.prompt_len > 0 ? o.prompt_len : 4 * pc.experts;
    pc.inject_layer = o.inject_layer >= 0 ? o.inject_layer : (std::is_same_v<Policy, prompt::SoftPrompt> ? 0 : mc.n_layers / 3);
    usage_check(pc.inject_layer < mc.n_layers, "--inject-layer ", pc.inject_layer, " must be below the model's ",
                mc.n_layers, " layers");
    usage_check(pc.length % pc.experts == 0, "--prompt-len ", pc.length, " must be a multiple of --experts ", pc.experts,
                " (each expert holds K/E prompts)");
    pc.gate_dim = o.gate_dim;
    pc.top_k = o.top_k;
    pc.seed = o.seed;
    pc.init = o.init == "uniform" ? prompt::PromptInit::uniform
              : o.init == "text"  ? prompt::PromptInit::text
                                  : prompt::PromptInit::vocab;
    if (pc.init == prompt::PromptInit::text) {
        pc.init_ids = tok.encode(o.init_text, /*add_bos=*/false);
        usage_check(!pc.init_ids.empty(), "--init-text encodes to no tokens");
    }
    const std::int64_t positions = pc.length + pc.input_prompt;
    const std::int64_t T = o.seq_len > 0 ? o.seq_len : mc.max_seq - positions;
    usage_check(T >= 2 && T + positions <= mc.max_seq, "--seq-len ", T, " plus the prompt's ", positions,
                " positions must fit the model's context max_seq = ", mc.max_seq);

    data::Batches train(splits.train, tok, {.batch_size = o.batch, .seq_len = T, .seed = o.seed});
    data::Batches val(splits.validation, tok, {.batch_size = o.batch, .seq_len = T, .seed = 0});
    data::Batches test(splits.test, tok, {.batch_size = o.batch, .seq_len = T, .seed = 0});
    if (pc.init == prompt::PromptInit::vocab) pc.frequent_ids = data::ids_by_frequency(train.streams());

    // Before: the model alone (no prompt is built yet, so forward runs the model by itself).
    std::fprintf(stderr, "prompt_tune: %s + %s; test split %lld tokens in windows of %lld\n",
                 Model::structure().describe().c_str(), Policy::name, static_cast<long long>(test.streams().num_tokens()),
                 static_cast<long long>(T));
    const eval::CorpusPerplexity before = eval::corpus_perplexity(model, test);
    std::fprintf(stderr, "prompt_tune: test ppl without a prompt %.3f\n", before.ppl());

    model.init_prompt(pc);
    if (!o.prompt_dir.empty()) {
        io::load_prompt(model.prompt(), o.prompt_dir);
        std::fprintf(stderr, "prompt_tune: loaded the prompt in %s\n", o.prompt_dir.c_str());
    }
    if constexpr (is_mop) {
        fs::create_directories(fs::path(o.out));
        write_gate_map(model, test, o.out, "gates_before", "mean gate weight per domain (test split, untrained)");
    }
    // Gate pretraining: expert e <-> domain e (one-to-one when E = D; else domain d -> expert d mod E).
    std::vector<std::int32_t> expert_of_domain;
    for (std::int64_t d = 0; d < D; ++d) expert_of_domain.push_back(static_cast<std::int32_t>(d % pc.experts));
    if (o.gate_pretrain_steps > 0 && pc.experts != D)
        std::fprintf(stderr, "prompt_tune: %lld experts for %lld domains: gate pretraining maps domain d to expert d mod %lld\n",
                     static_cast<long long>(pc.experts), static_cast<long long>(D), static_cast<long long>(pc.experts));

    nlohmann::json result{{"model", o.model},
                          {"structure", Model::structure().describe()},
                          {"policy", o.policy},
                          {"prompt_len", pc.length},
                          {"inject_layer", pc.inject_layer},
                          {"experts", pc.experts},
                          {"init", prompt::name(pc.init)},
                          {"seq_len", T},
                          {"batch", o.batch},
                          {"lr", o.lr},
                          {"domains", o.domains},
                          {"split_seed", o.split_seed},
                          {"ppl_before", before.ppl()},
                          {"ppl_per_domain_before", per_domain(before)},
                          {"prompt_loaded_from", o.prompt_dir.empty() ? nlohmann::json() : nlohmann::json(o.prompt_dir)}};
    const fs::path out(o.out);
    if (!o.federated) {
        const std::int64_t steps = o.steps;
        train::PromptTuningOptions to{.steps = steps,
                                      .gate_pretrain_steps = o.gate_pretrain_steps,
                                      .lr = o.lr,
                                      .warmup = std::min(o.warmup, steps),
                                      .min_lr_ratio = o.min_lr_ratio,
                                      .weight_decay = o.weight_decay,
                                      .clip = o.clip,
                                      .aux_loss_coef = o.aux_loss_coef,
                                      .expert_of_domain = expert_of_domain,
                                      .eval_every = o.eval_every,
                                      .eval_batches = o.eval_batches,
                                      .run_dir = out / "run",
                                      .ckpt_every = o.ckpt_every,
                                      .log_every = o.log_every,
                                      .stop = &stop_requested};
        to.identity = {{"model", fs::absolute(o.model).lexically_normal().string()}, {"policy", o.policy},
                       {"prompt_len", pc.length}, {"inject_layer", pc.inject_layer}, {"experts", pc.experts},
                       {"init", prompt::name(pc.init)}, {"batch", o.batch}, {"seq_len", T}, {"seed", o.seed},
                       {"split_seed", o.split_seed}, {"domains", o.domains}, {"steps", steps}, {"lr", o.lr},
                       {"gate_pretrain_steps", o.gate_pretrain_steps}, {"prompt", o.prompt_dir}};
        if (steps + o.gate_pretrain_steps > 0) {
            const train::PromptTuningResult r = train::tune_prompt(model, train, &val, to);
            if (!r.finished) {
                std::fprintf(stderr, "prompt_tune: stopped at step %lld; run the same command to resume\n",
                             static_cast<long long>(r.steps_done));
                return 0;
            }
            result["steps"] = steps;
            result["gate_pretrain_steps"] = o.gate_pretrain_steps;
            result["best_step"] = r.best_step;
            result["best_val_ppl"] = r.best_step >= 0 ? nlohmann::json(r.best_val_ppl) : nlohmann::json();
            result["resumed_from"] = r.resumed_from;
            result["trainable_params"] = r.trainable_params;
        } else {
            result["steps"] = 0;
            result["trainable_params"] = train::count_values(train::prompt_parameters(model));
        }
    } else {
        const data::FederatedSplit split = data::skewed_split(train, {.clients = o.clients, .skew = o.skew, .seed = o.seed});
        const train::FederatedOptions fo{.clients = o.clients, .active = o.active, .rounds = o.rounds,
                                         .weighted = !o.unweighted, .seed = o.seed};
        const train::PromptClientOptions co{
            .local_steps = o.local_steps, .batch_size = o.batch, .lr = o.lr, .clip = o.clip,
            .aux_loss_coef = o.aux_loss_coef,
            .gate_rounds = (o.gate_pretrain_steps + o.local_steps - 1) / o.local_steps,
            .expert_of_domain = expert_of_domain, .seed = o.seed};
        const std::int64_t eval_every_rounds = std::max<std::int64_t>(1, o.eval_every / o.local_steps);
        const train::FederatedResult r =
            train::tune_prompt_federated(model, train, &val, split, fo, co, eval_every_rounds, o.eval_batches);
        nlohmann::json rounds = nlohmann::json::array();
        for (const auto& fr : r.rounds)
            rounds.push_back({{"round", fr.round}, {"client_loss", fr.client_loss},
                              {"val_ppl", std::isnan(fr.val_ppl) ? nlohmann::json() : nlohmann::json(fr.val_ppl)}});
        std::int64_t smallest = split.samples_of(0), largest = smallest;
        for (std::int64_t c = 0; c < split.clients(); ++c) {
            smallest = std::min(smallest, split.samples_of(c));
            largest = std::max(largest, split.samples_of(c));
        }
        result["steps"] = r.local_steps_total;
        result["federated"] = {{"clients", o.clients}, {"active", o.active}, {"rounds", o.rounds},
                               {"local_steps", o.local_steps}, {"skew", o.skew}, {"weighted", !o.unweighted},
                               {"gate_rounds", co.gate_rounds}, {"client_windows_min", smallest},
                               {"client_windows_max", largest}, {"history", rounds}};
        result["best_round"] = r.best_round;
        result["best_val_ppl"] = r.best_round >= 0 ? nlohmann::json(r.best_val_ppl) : nlohmann::json();
        result["trainable_params"] = r.trainable_params;
    }

    // After: the model with the learned (best) prompt, on the same test windows.
    const eval::CorpusPerplexity after = eval::corpus_perplexity(model, test);
    io::save_prompt(model.prompt(), out / "prompt");
    if constexpr (is_mop) {
        write_gate_map(model, test, out, "gates", "mean gate weight per domain (test split, trained)");
        result["gates_csv"] = (out / "gates.csv").string();
    }
    if (!after.experts.empty()) write_expert_load(before, after, out / "expert_load.png");
    result["ppl_after"] = after.ppl();
    result["ppl_per_domain"] = per_domain(after);
    result["test_tokens"] = after.tokens;
    if (!after.experts.empty()) {
        result["expert_load_before"] = expert_load(before);
        result["expert_load_after"] = expert_load(after);
    }
    result["prompt_dir"] = (out / "prompt").string();
    result["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
    std::printf("prompt_tune: %s, %s K=%lld L_int=%lld E=%lld, %lld trainable values: test ppl %.3f -> %.3f\n",
                Model::structure().describe().c_str(), Policy::name, static_cast<long long>(pc.length),
                static_cast<long long>(pc.inject_layer), static_cast<long long>(pc.experts),
                static_cast<long long>(result["trainable_params"].get<std::int64_t>()), before.ppl(), after.ppl());
    for (std::size_t i = 0; i < after.domains.size(); ++i)
        if (after.domains[i].tokens > 0)
            std::printf("  %-16s %8.3f -> %8.3f\n", after.domains[i].domain.c_str(), before.domains[i].ppl(),
                        after.domains[i].ppl());
    cli::write_json((out / "result.json").string(), result);
    cli::write_json(o.json, result);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("prompt_tune", [&] {
        Options o;
        po::options_description opts(
            "prompt_tune: learn a prompt for a frozen pretrained model on the Brown corpus and report test perplexity "
            "before and after\nusage: prompt_tune --model PATH [options]");
        opts.add_options()("help,h", "show this help");
        examples::add_model_options(opts, o.model, o.tokenizer);
        opts.add_options()
            ("policy", po::value(&o.policy)->default_value(o.policy), "soft | injected | mop (Mixture of Prompts)")
            ("prompt-len", po::value(&o.prompt_len), "K: all prompt vectors (default 20; mop: 4 per expert)")
            ("inject-layer", po::value(&o.inject_layer), "L_int (default: 0 for soft, n_layers/3 for injected and mop)")
            ("experts", po::value(&o.experts), "mop: E experts of K/E prompts (default: one per domain)")
            ("gate-dim", po::value(&o.gate_dim)->default_value(o.gate_dim), "mop: hidden width d_g of the gate")
            ("top-k", po::value(&o.top_k)->default_value(o.top_k), "mop: keep the top-k gate values at evaluation (0: all)")
            ("init", po::value(&o.init)->default_value(o.init),
             "uniform (±0.5) | vocab (embeddings of frequent tokens) | text (--init-text's embeddings)")
            ("init-text", po::value(&o.init_text), "the text of --init text")
            ("prompt", po::value(&o.prompt_dir),
             "start from the prompt in this folder (io::save_prompt's files; e.g. from another model: transfer); "
             "without --steps only evaluates it")
            ("steps", po::value(&o.steps), "training steps (default 500; 0 with --prompt)")
            ("lr", po::value(&o.lr)->default_value(o.lr), "peak learning rate of the prompt")
            ("min-lr-ratio", po::value(&o.min_lr_ratio)->default_value(o.min_lr_ratio), "final lr / peak lr (cosine)")
            ("warmup", po::value(&o.warmup)->default_value(o.warmup), "linear warmup steps (capped at --steps)")
            ("weight-decay", po::value(&o.weight_decay)->default_value(o.weight_decay), "AdamW decay of the prompt")
            ("clip", po::value(&o.clip)->default_value(o.clip), "gradient clipping by global norm (0: none)")
            ("aux-loss-coef", po::value(&o.aux_loss_coef)->default_value(o.aux_loss_coef),
             "weight of a Switch model's load-balancing loss in the objective")
            ("batch", po::value(&o.batch)->default_value(o.batch), "windows per step")
            ("seq-len", po::value(&o.seq_len), "text tokens per window (default: max_seq minus the prompt)")
            ("eval-every", po::value(&o.eval_every)->default_value(o.eval_every), "steps between validations")
            ("eval-batches", po::value(&o.eval_batches)->default_value(o.eval_batches),
             "validation batches per check (0: the whole split)")
            ("gate-pretrain-steps", po::value(&o.gate_pretrain_steps)->default_value(o.gate_pretrain_steps),
             "mop: steps of gate pretraining on the domain labels before joint training")
            ("federated", po::bool_switch(&o.federated), "simulate federated training (FedAvg over clients)")
            ("clients", po::value(&o.clients)->default_value(o.clients), "federated: N clients")
            ("active", po::value(&o.active)->default_value(o.active), "federated: clients per round")
            ("rounds", po::value(&o.rounds)->default_value(o.rounds), "federated: rounds")
            ("local-steps", po::value(&o.local_steps)->default_value(o.local_steps), "federated: local steps per round")
            ("skew", po::value(&o.skew)->default_value(o.skew), "federated: big partition / each other partition")
            ("unweighted", po::bool_switch(&o.unweighted), "federated: FedAvg with equal client weights")
            ("brown-dir", po::value(&o.brown_dir)->default_value(o.brown_dir), "where scripts/fetch_brown put the corpus")
            ("domains", po::value(&o.domains)->default_value(o.domains), "Brown domains: groups7 or genres15")
            ("seed", po::value(&o.seed)->default_value(o.seed), "prompt init, batch order and client seed")
            ("split-seed", po::value(&o.split_seed)->default_value(o.split_seed), "train/validation/test split seed")
            ("ckpt-every", po::value(&o.ckpt_every)->default_value(o.ckpt_every), "steps between checkpoints")
            ("log-every", po::value(&o.log_every)->default_value(o.log_every), "steps between log rows")
            ("fresh", po::bool_switch(&o.fresh), "delete --out/run and start over instead of resuming")
            ("out", po::value(&o.out)->default_value(o.out), "output folder")
            ("json", po::value(&o.json), "also write result.json here");
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        if (!vm.count("steps")) o.steps = o.prompt_dir.empty() ? 500 : 0;
        usage_check(o.policy == "soft" || o.policy == "injected" || o.policy == "mop",
                    "--policy must be soft, injected or mop, got '", o.policy, "'");
        usage_check(o.init == "uniform" || o.init == "vocab" || o.init == "text",
                    "--init must be uniform, vocab or text, got '", o.init, "'");
        usage_check(o.init != "text" || !o.init_text.empty(), "--init text needs --init-text STR");
        usage_check(o.init == "text" || o.init_text.empty(), "--init-text applies to --init text only");
        usage_check(o.domains == "groups7" || o.domains == "genres15", "--domains must be groups7 or genres15, got '",
                    o.domains, "'");
        usage_check(!vm.count("prompt-len") || o.prompt_len > 0, "--prompt-len must be positive, got ", o.prompt_len);
        if (!vm.count("prompt-len")) o.prompt_len = o.policy == "mop" ? 0 : 20;  // mop: 4 per expert
        usage_check(!vm.count("inject-layer") || o.inject_layer >= 0, "--inject-layer must be >= 0, got ", o.inject_layer);
        usage_check(o.policy != "soft" || o.inject_layer <= 0, "--policy soft prompts the input; --inject-layer ",
                    o.inject_layer, " needs --policy injected or mop");
        usage_check(!vm.count("experts") || o.experts >= 1, "--experts must be positive, got ", o.experts);
        usage_check(o.policy == "mop" || o.gate_pretrain_steps == 0, "--gate-pretrain-steps needs --policy mop");
        usage_check(o.policy == "mop" || o.top_k == 0, "--top-k needs --policy mop");
        usage_check(o.steps >= 0 && o.gate_pretrain_steps >= 0, "--steps and --gate-pretrain-steps must be >= 0");
        for (auto [v, flag] : {std::pair{o.batch, "--batch"}, {o.eval_every, "--eval-every"}, {o.gate_dim, "--gate-dim"},
                               {o.clients, "--clients"}, {o.active, "--active"}, {o.rounds, "--rounds"},
                               {o.local_steps, "--local-steps"}, {o.skew, "--skew"}, {o.ckpt_every, "--ckpt-every"},
                               {o.log_every, "--log-every"}})
            usage_check(v > 0, flag, " must be positive, got ", v);
        usage_check(o.seq_len >= 0, "--seq-len must be >= 0 (0: the model's max_seq minus the prompt), got ", o.seq_len);
        usage_check(o.eval_batches >= 0, "--eval-batches must be >= 0, got ", o.eval_batches);
        usage_check(o.lr > 0.0f && std::isfinite(o.lr), "--lr must be positive, got ", o.lr);
        usage_check(o.warmup >= 0, "--warmup must be >= 0, got ", o.warmup);
        usage_check(o.active <= o.clients, "--active ", o.active, " exceeds --clients ", o.clients);
        if (!o.federated)
            for (const char* flag : {"clients", "active", "rounds", "local-steps", "skew", "unweighted"})
                usage_check(!vm.count(flag) || vm[flag].defaulted(), "--", flag, " applies to --federated only");
        usage_check(o.prompt_dir.empty() || fs::is_directory(o.prompt_dir), "--prompt ", fs::path(o.prompt_dir),
                    ": no such folder");
        usage_check(fs::is_directory(o.brown_dir), "--brown-dir ", fs::path(o.brown_dir),
                    ": no such folder (scripts/fetch_brown downloads the Brown corpus there)");
        examples::check_model_paths(o.model, o.tokenizer);

        if (o.fresh) fs::remove_all(fs::path(o.out) / "run");
        fs::create_directories(o.out);
        std::signal(SIGINT, on_signal);
        std::signal(SIGTERM, on_signal);
        const data::Corpus corpus = data::read_brown(
            o.brown_dir, o.domains == "genres15" ? data::BrownDomains::genres15 : data::BrownDomains::groups7);
        const data::CorpusSplits splits = data::split_corpus(corpus, o.split_seed);
        const auto go = [&](auto& model) { return tune(o, model, splits); };
        if (o.policy == "soft") return with_prompt_model<prompt::SoftPrompt>(o.model, go);
        if (o.policy == "injected") return with_prompt_model<prompt::InjectedPrompt>(o.model, go);
        return with_prompt_model<prompt::MixtureOfPrompts>(o.model, go);
    });
}
