// pretrain — full-parameter pre-training of a dense or Switch (mixture-of-experts) language model on
// a corpus, with mopt's own autodiff: AdamW, warmup + cosine schedule, gradient clipping, the Switch
// load-balancing loss, periodic validation, crash-safe checkpoints with exact resume, a CSV log, a
// PNG plot of the curves, and the final model in Hugging Face format with its tokenizer.
//
//   pretrain --corpus brown --arch dense  --out runs/dense  --steps 4000
//   pretrain --corpus brown --arch switch --out runs/switch --steps 4000     (8 experts, every other layer)
//   pretrain --corpus my_texts/ --tokenizer tok.model --arch dense --out runs/mine
//
// Running the same command again resumes from the newest checkpoint in --out (the loss curve
// continues exactly as if never interrupted; --fresh starts over). Ctrl-C or SIGTERM stop after the
// current step with a checkpoint; --time-limit does the same after that many seconds.
//
// Writes under --out: tokenizer.model (trained on the training split unless --tokenizer is given),
// checkpoints/, log.csv, curves.png, model/ (config.json, model.safetensors, tokenizer.model) and
// result.json (also to --json): validation and test perplexity overall and per domain, a unigram
// model's validation perplexity for scale, expert load of a Switch model, tokens and wall time.
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>

#include "cli.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;
using cli::usage_check;

// The Backend slot: backend::Cpu, unless the including file names another first
// (examples/pretrain_gpu.cu: backend::Cuda, the only change that makes pretrain run on the GPU).
#ifndef MOPT_EXAMPLE_BACKEND
#define MOPT_EXAMPLE_BACKEND ::mopt::backend::Cpu
#endif
using DenseModel = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::None, prompt::None, MOPT_EXAMPLE_BACKEND>;
using SwitchModel = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer>, compress::None,
                                    prompt::None, MOPT_EXAMPLE_BACKEND>;
using SwitchEveryLayerModel =
    nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>, compress::None, prompt::None, MOPT_EXAMPLE_BACKEND>;

namespace {

std::atomic<bool> stop_requested{false};
extern "C" void on_signal(int) { stop_requested = true; }

struct Options {
    std::string corpus = "brown", brown_dir = "data/brown", domains = "groups7", tokenizer, arch = "dense", out,
                json, save_dtype = "bf16";
    std::int64_t vocab = 8192, d_model = 256, layers = 6, heads = 8, kv_heads = 0, ffn = 688, experts = 8;
    std::int64_t seq_len = 256, batch = 16, steps = 4000, warmup = 200, eval_every = 250, eval_batches = 20,
                 ckpt_every = 250, keep = 2, log_every = 10;
    float lr = 1e-3f, min_lr_ratio = 0.1f, weight_decay = 0.1f, clip = 1.0f, capacity_factor = 1.25f,
          aux_loss_coef = 0.01f, z_loss_coef = 0.0f, rope_theta = 10000.0f;
    std::uint64_t seed = 1, split_seed = 1234;
    double time_limit = 0.0;
    std::int64_t stop_after = 0;
    bool fresh = false, tie_embeddings = false;
};

// The options that decide what a checkpoint means: resuming with any of them changed is refused.
nlohmann::json run_identity(const Options& o, std::int64_t vocab) {
    return {{"corpus", o.corpus}, {"domains", o.domains},     {"arch", o.arch},         {"vocab", vocab},
            {"d_model", o.d_model}, {"layers", o.layers},     {"heads", o.heads},       {"kv_heads", o.kv_heads}, {"tie_embeddings", o.tie_embeddings},
            {"ffn", o.ffn},         {"experts", o.experts},   {"seq_len", o.seq_len},   {"batch", o.batch},
            {"seed", o.seed},       {"split_seed", o.split_seed}, {"capacity_factor", o.capacity_factor},
            {"aux_loss_coef", o.aux_loss_coef}, {"z_loss_coef", o.z_loss_coef}};
}

struct Data {
    data::Corpus corpus;
    data::CorpusSplits splits;
    data::Tokenizer tokenizer;
    fs::path tokenizer_file;
};

// The tokenizer: --tokenizer, the one an earlier run of this --out trained, or a new SentencePiece
// BPE model trained on the training split only (the validation and test texts stay unseen).
data::Tokenizer make_tokenizer(const Options& o, const data::Corpus& train_split, fs::path& file) {
    if (!o.tokenizer.empty()) {
        usage_check(fs::exists(o.tokenizer), "--tokenizer ", fs::path(o.tokenizer), ": no such file");
        file = o.tokenizer;
        return data::Tokenizer::load(file);
    }
    file = fs::path(o.out) / "tokenizer.model";
    if (fs::exists(file) && !o.fresh) {
        data::Tokenizer t = data::Tokenizer::load(file);
        check(t.vocab_size() == o.vocab, file.string(), " has ", t.vocab_size(), " pieces but --vocab is ", o.vocab,
              "; use --fresh to retrain it");
        return t;
    }
    std::fprintf(stderr, "pretrain: training a %lld-piece SentencePiece BPE tokenizer on %zu documents\n",
                 static_cast<long long>(o.vocab), train_split.docs.size());
    return data::SentencePieceTokenizer::train(train_split, file, {.vocab_size = o.vocab});
}

Data load_data(const Options& o) {
    data::Corpus corpus;
    if (o.corpus == "brown") {
        usage_check(o.domains == "genres15" || o.domains == "groups7", "--domains must be genres15 or groups7, got '",
                    o.domains, "'");
        corpus = data::read_brown(o.brown_dir, o.domains == "genres15" ? data::BrownDomains::genres15
                                                                       : data::BrownDomains::groups7);
    } else {
        usage_check(fs::exists(o.corpus), "--corpus ", fs::path(o.corpus),
                    ": no such file or folder (or 'brown' for the Brown corpus)");
        corpus = data::read_corpus(o.corpus);
    }
    data::CorpusSplits splits = data::split_corpus(corpus, o.split_seed);
    check(!splits.train.docs.empty() && !splits.validation.docs.empty() && !splits.test.docs.empty(), "--corpus ",
          o.corpus, ": ", corpus.docs.size(),
          " documents leave an empty training, validation or test split; give at least 10 documents");
    fs::path file;
    data::Tokenizer tok = make_tokenizer(o, splits.train, file);
    return Data{std::move(corpus), std::move(splits), std::move(tok), std::move(file)};
}

// exp of the cross-entropy of add-one-smoothed unigram frequencies of the training split on the
// validation split: the perplexity a model must beat by far to have learned anything.
double unigram_ppl(const data::TokenStreams& train, const data::TokenStreams& val) {
    std::vector<double> count(static_cast<std::size_t>(train.vocab_size), 1.0);
    double total = static_cast<double>(train.vocab_size);
    for (const auto& s : train.per_domain)
        for (std::int32_t t : s) {
            count[static_cast<std::size_t>(t)] += 1.0;
            total += 1.0;
        }
    double nll = 0.0;
    std::int64_t n = 0;
    for (const auto& s : val.per_domain)
        for (std::int32_t t : s) {
            nll -= std::log(count[static_cast<std::size_t>(t)] / total);
            ++n;
        }
    return std::exp(nll / static_cast<double>(std::max<std::int64_t>(n, 1)));
}

nlohmann::json perplexity_json(const eval::CorpusPerplexity& p) {
    nlohmann::json per_domain = nlohmann::json::object();
    for (const auto& d : p.domains)
        if (d.tokens > 0) per_domain[d.domain] = d.ppl();
    nlohmann::json j{{"ppl", p.ppl()}, {"nll", p.nll}, {"tokens", p.tokens}, {"per_domain", per_domain}};
    if (!p.experts.empty()) {
        nlohmann::json load = nlohmann::json::array();
        for (const auto& e : p.experts)
            load.push_back({{"layer", e.layer}, {"fraction", e.fraction}, {"dropped", e.dropped},
                            {"tokens", e.tokens}, {"router_entropy", e.router_entropy}});
        j["expert_load"] = load;
    }
    return j;
}

// The training and validation curves from log.csv (which holds the whole run, resumed or not).
void plot_curves(const fs::path& csv, const fs::path& png, const std::string& title) {
    std::ifstream in(csv);
    std::string line;
    std::getline(in, line);
    eval::Series train{"training loss", {}, {}}, val{"validation loss", {}, {}};
    while (std::getline(in, line)) {
        std::vector<std::string> cells;
        std::stringstream ss(line);
        for (std::string c; std::getline(ss, c, ',');) cells.push_back(c);
        if (cells.size() < 7) cells.resize(7);
        const double step = std::stod(cells[0]);
        train.x.push_back(step);
        train.y.push_back(std::stod(cells[2]));
        if (!cells[6].empty()) {
            val.x.push_back(step);
            val.y.push_back(std::stod(cells[6]));
        }
    }
    eval::LineChart chart{title, "step", "cross-entropy (nats/token)", {train}, false};
    if (!val.x.empty()) chart.series.push_back(val);
    eval::write_png(png, chart);
}

template <class Model>
int pretrain(const Options& o, Data& d) {
    const fs::path out(o.out), ckpt_dir = out / "checkpoints";
    nn::ModelConfig c{.vocab_size = d.tokenizer.vocab_size(), .d_model = o.d_model, .n_layers = o.layers,
                      .n_heads = o.heads, .n_kv_heads = o.kv_heads, .d_ff = o.ffn, .max_seq = o.seq_len,
                      .rope_theta = o.rope_theta, .tie_embeddings = o.tie_embeddings, .bos_id = d.tokenizer.bos_id(),
                      .eos_id = d.tokenizer.eos_id()};
    if constexpr (Model::FFN::has_experts) {
        c.num_experts = o.experts;
        c.capacity_factor = o.capacity_factor;
        c.aux_loss_coef = o.aux_loss_coef;
        c.z_loss_coef = o.z_loss_coef;
    }
    Model model(c, o.seed);
    std::vector<autodiff::Parameter*> all, decay, no_decay;
    model.visit_parameters([&](autodiff::Parameter& p) {
        all.push_back(&p);
        (p.value().rank() >= 2 ? decay : no_decay).push_back(&p);  // no weight decay on norm gains
    });
    train::AdamW opt_decay(decay, {.lr = o.lr, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = o.weight_decay});
    train::AdamW opt_plain(no_decay, {.lr = o.lr, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.0f});
    const train::WarmupCosine schedule{.peak_lr = o.lr, .warmup_steps = o.warmup, .total_steps = o.steps,
                                       .min_ratio = o.min_lr_ratio};
    schedule.validate();

    data::BatchOptions bo{.batch_size = o.batch, .seq_len = o.seq_len, .seed = o.seed};
    data::Batches train_batches(d.splits.train, d.tokenizer, bo);
    data::Batches val_batches(d.splits.validation, d.tokenizer, {.batch_size = o.batch, .seq_len = o.seq_len, .seed = 0});
    const double unigram = unigram_ppl(train_batches.streams(), val_batches.streams());

    const nlohmann::json identity = run_identity(o, c.vocab_size);
    std::int64_t start = 0;
    if (auto st = train::load_latest_checkpoint(ckpt_dir, all, opt_decay, opt_plain)) {
        const nlohmann::json saved = st->extra.value("run", nlohmann::json::object());
        for (const auto& [key, value] : identity.items())
            usage_check(saved.contains(key) && saved[key] == value, "--", key, " is ", value.dump(),
                        " but the run in ", ckpt_dir.string(), " was started with ",
                        saved.contains(key) ? saved[key].dump() : "no value", "; use the same flags or --fresh");
        start = st->step;
        std::fprintf(stderr, "pretrain: resuming %s from step %lld\n", ckpt_dir.string().c_str(),
                     static_cast<long long>(start));
    }
    std::fprintf(stderr,
                 "pretrain: %s, %lld parameters; %lld training tokens (%lld windows of %lld), %lld validation "
                 "tokens; unigram validation ppl %.1f\n",
                 Model::structure().describe().c_str(), static_cast<long long>(model.num_parameters()),
                 static_cast<long long>(train_batches.streams().num_tokens()),
                 static_cast<long long>(train_batches.num_windows()), static_cast<long long>(o.seq_len),
                 static_cast<long long>(val_batches.streams().num_tokens()), unigram);

    train::CsvLog log(out / "log.csv",
                      {"step", "lr", "loss", "aux_loss", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"},
                      start > 0 ? start : -1);
    train::Progress progress(o.steps, start, o.log_every);
    train_batches.seek(start);
    autodiff::Tape tape;
    data::Batch batch;
    const auto save = [&](std::int64_t step) {
        train::save_checkpoint(ckpt_dir, {.step = step, .extra = {{"run", identity}}}, all, static_cast<int>(o.keep),
                               opt_decay, opt_plain);
    };
    std::int64_t step = start;
    auto last = std::chrono::steady_clock::now();
    while (step < o.steps) {
        const float lr = schedule(step);
        opt_decay.options().lr = lr;
        opt_plain.options().lr = lr;
        tape.reset();
        train_batches.next_wrapping(batch);
        nn::ForwardOutput f = model.forward(tape, batch.ids, {.targets = &batch.targets, .logits = false});
        const float loss = f.loss.item();
        const float aux = f.aux_loss.defined() ? f.aux_loss.item() : 0.0f;
        check(std::isfinite(loss) && std::isfinite(aux), "step ", step + 1, ": the loss is ", loss, " (aux ", aux,
              ") at learning rate ", lr, "; lower --lr or lengthen --warmup — rerunning resumes from the last "
              "checkpoint in ", ckpt_dir.string());
        tape.backward(f.aux_loss.defined() ? autodiff::add(f.loss, f.aux_loss) : f.loss);
        // clip by global norm, then both AdamWs (backend::Cuda: on the GPU, weights and moments stay there)
        const double norm = train::step(model, o.clip, opt_decay, opt_plain);
        ++step;
        const auto now = std::chrono::steady_clock::now();
        const double tok_s = static_cast<double>(batch.ids.numel()) / std::chrono::duration<double>(now - last).count();
        last = now;
        progress.update(step, batch.ids.numel(), loss, "lr " + train::CsvLog::cell(lr));
        std::string val_loss, val_ppl;
        if (step % o.eval_every == 0 || step == o.steps) {
            const eval::CorpusPerplexity v = eval::corpus_perplexity(model, val_batches, o.eval_batches);
            val_loss = train::CsvLog::cell(v.nll / static_cast<double>(v.tokens));
            val_ppl = train::CsvLog::cell(v.ppl());
            progress.message("step " + std::to_string(step) + ": validation loss " + val_loss + ", ppl " + val_ppl +
                             " (unigram " + train::CsvLog::cell(unigram) + ")");
        }
        if (step % o.log_every == 0 || !val_loss.empty())
            log.row({std::to_string(step), train::CsvLog::cell(lr), train::CsvLog::cell(loss), train::CsvLog::cell(aux),
                     train::CsvLog::cell(norm), train::CsvLog::cell(tok_s), val_loss, val_ppl});
        const bool out_of_time = (o.time_limit > 0.0 && progress.seconds() >= o.time_limit) ||
                                 (o.stop_after > 0 && step - start >= o.stop_after);
        if (step % o.ckpt_every == 0 || step == o.steps || stop_requested || out_of_time) save(step);
        if ((stop_requested || out_of_time) && step < o.steps) {
            progress.message("pretrain: stopped at step " + std::to_string(step) + " (" +
                             (stop_requested ? "signal" : "--time-limit / --stop-after") + "); run the same command to resume");
            return 0;
        }
    }

    // Finished: the model in Hugging Face format with its tokenizer, the curves, the evaluation.
    plot_curves(out / "log.csv", out / "curves.png", std::string(Model::structure().describe()));
    const DType dtype = o.save_dtype == "f32" ? DType::f32 : o.save_dtype == "f16" ? DType::f16 : DType::bf16;
    model.save(out / "model", dtype);
    if (d.tokenizer.is<data::SentencePieceTokenizer>())
        fs::copy_file(d.tokenizer_file, out / "model" / "tokenizer.model", fs::copy_options::overwrite_existing);
    // Evaluate the weights as saved (rounded to the on-disk dtype), as every later experiment sees them.
    Model saved = Model::load(out / "model");
    data::Batches test_batches(d.splits.test, d.tokenizer, {.batch_size = o.batch, .seq_len = o.seq_len, .seed = 0});
    const eval::CorpusPerplexity val = eval::corpus_perplexity(saved, val_batches);
    const eval::CorpusPerplexity test = eval::corpus_perplexity(saved, test_batches);
    nlohmann::json result{{"arch", o.arch},
                          {"structure", Model::structure().describe()},
                          {"parameters", model.num_parameters()},
                          {"steps", o.steps},
                          {"tokens_seen", o.steps * o.batch * o.seq_len},
                          {"train_tokens", train_batches.streams().num_tokens()},
                          {"unigram_val_ppl", unigram},
                          {"validation", perplexity_json(val)},
                          {"test", perplexity_json(test)},
                          {"seconds_this_run", progress.seconds()},
                          {"model_dir", (out / "model").string()},
                          {"run", identity}};
    std::printf("pretrain: %s — validation ppl %.2f, test ppl %.2f (unigram %.1f)\n", o.arch.c_str(), val.ppl(),
                test.ppl(), unigram);
    for (std::size_t i = 0; i < test.domains.size(); ++i)
        if (test.domains[i].tokens > 0)
            std::printf("  %-16s validation %8.2f   test %8.2f\n", test.domains[i].domain.c_str(), val.domains[i].ppl(),
                        test.domains[i].ppl());
    cli::write_json((out / "result.json").string(), result);
    cli::write_json(o.json, result);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("pretrain", [&] {
        Options o;
        po::options_description opts(
            "pretrain: train a dense or Switch language model from scratch (resumes from --out when run again)\n"
            "usage: pretrain --out DIR [options]");
        opts.add_options()("help,h", "show this help")
            ("corpus", po::value(&o.corpus)->default_value(o.corpus),
             "'brown' (the Brown corpus in --brown-dir), a text file, a folder of .txt files, or a .jsonl file")
            ("brown-dir", po::value(&o.brown_dir)->default_value(o.brown_dir), "where scripts/fetch_brown put the corpus")
            ("domains", po::value(&o.domains)->default_value(o.domains), "Brown domains: genres15 or groups7")
            ("tokenizer", po::value(&o.tokenizer), "a tokenizer (.model or llama2.c .bin); default: train one")
            ("vocab", po::value(&o.vocab)->default_value(o.vocab), "vocabulary of the trained tokenizer")
            ("arch", po::value(&o.arch)->default_value(o.arch),
             "dense | switch (Top1 experts in every other layer) | switch-all (in every layer)")
            ("d-model", po::value(&o.d_model)->default_value(o.d_model), "hidden size")
            ("layers", po::value(&o.layers)->default_value(o.layers), "transformer blocks")
            ("heads", po::value(&o.heads)->default_value(o.heads), "attention heads")
            ("kv-heads", po::value(&o.kv_heads)->default_value(o.kv_heads), "key/value heads (0 = heads)")
            ("tie-embeddings", po::bool_switch(&o.tie_embeddings), "the output head shares the token embedding")
            ("ffn", po::value(&o.ffn)->default_value(o.ffn), "feed-forward width (of each expert)")
            ("experts", po::value(&o.experts)->default_value(o.experts), "experts per Switch layer")
            ("capacity-factor", po::value(&o.capacity_factor)->default_value(o.capacity_factor),
             "Switch expert capacity factor (0 = unlimited)")
            ("aux-loss-coef", po::value(&o.aux_loss_coef)->default_value(o.aux_loss_coef), "load-balancing loss α")
            ("z-loss-coef", po::value(&o.z_loss_coef)->default_value(o.z_loss_coef), "router z-loss coefficient")
            ("seq-len", po::value(&o.seq_len)->default_value(o.seq_len), "positions per training window")
            ("batch", po::value(&o.batch)->default_value(o.batch), "windows per step")
            ("steps", po::value(&o.steps)->default_value(o.steps), "optimizer steps in total")
            ("lr", po::value(&o.lr)->default_value(o.lr), "peak learning rate")
            ("warmup", po::value(&o.warmup)->default_value(o.warmup), "linear warmup steps")
            ("min-lr-ratio", po::value(&o.min_lr_ratio)->default_value(o.min_lr_ratio), "final lr / peak lr (cosine)")
            ("weight-decay", po::value(&o.weight_decay)->default_value(o.weight_decay), "AdamW decay of matrices")
            ("clip", po::value(&o.clip)->default_value(o.clip), "gradient clipping by global norm (0: none)")
            ("eval-every", po::value(&o.eval_every)->default_value(o.eval_every), "steps between validations")
            ("eval-batches", po::value(&o.eval_batches)->default_value(o.eval_batches),
             "validation batches per check (0 = the whole split)")
            ("ckpt-every", po::value(&o.ckpt_every)->default_value(o.ckpt_every), "steps between checkpoints")
            ("keep", po::value(&o.keep)->default_value(o.keep), "checkpoints kept")
            ("log-every", po::value(&o.log_every)->default_value(o.log_every), "steps between log rows")
            ("seed", po::value(&o.seed)->default_value(o.seed), "initialisation and batch-order seed")
            ("split-seed", po::value(&o.split_seed)->default_value(o.split_seed), "train/validation/test split seed")
            ("time-limit", po::value(&o.time_limit)->default_value(o.time_limit),
             "seconds after which to checkpoint and stop (0 = none); rerun to resume")
            ("stop-after", po::value(&o.stop_after)->default_value(o.stop_after),
             "checkpoint and stop after this many steps of this run (0 = none); rerun to resume")
            ("save-dtype", po::value(&o.save_dtype)->default_value(o.save_dtype), "final weights on disk: bf16, f16 or f32")
            ("fresh", po::bool_switch(&o.fresh), "ignore (delete) checkpoints in --out and start over")
            ("out", po::value(&o.out)->required(), "output folder")
            ("json", po::value(&o.json), "also write result.json here");
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        for (auto [v, flag] : {std::pair{o.d_model, "--d-model"}, {o.layers, "--layers"}, {o.heads, "--heads"},
                               {o.ffn, "--ffn"}, {o.seq_len, "--seq-len"}, {o.batch, "--batch"}, {o.steps, "--steps"},
                               {o.eval_every, "--eval-every"}, {o.ckpt_every, "--ckpt-every"}, {o.vocab, "--vocab"},
                               {o.log_every, "--log-every"}})
            usage_check(v > 0, flag, " must be positive, got ", v);
        usage_check(o.lr > 0.0f && std::isfinite(o.lr), "--lr must be positive, got ", o.lr);
        usage_check(o.clip >= 0.0f && std::isfinite(o.clip), "--clip must be >= 0 (0: no clipping), got ", o.clip);
        usage_check(o.warmup >= 0 && o.warmup <= o.steps, "--warmup ", o.warmup, " must lie in [0, --steps]");
        usage_check(o.save_dtype == "bf16" || o.save_dtype == "f16" || o.save_dtype == "f32",
                    "--save-dtype must be bf16, f16 or f32, got '", o.save_dtype, "'");
        usage_check(o.arch == "dense" || o.arch == "switch" || o.arch == "switch-all",
                    "--arch must be dense, switch or switch-all, got '", o.arch, "'");
        if (o.fresh) fs::remove_all(fs::path(o.out) / "checkpoints");
        fs::create_directories(o.out);
        std::signal(SIGINT, on_signal);
        std::signal(SIGTERM, on_signal);
        Data d = load_data(o);
        if (o.arch == "dense") return pretrain<DenseModel>(o, d);
        if (o.arch == "switch") return pretrain<SwitchModel>(o, d);
        return pretrain<SwitchEveryLayerModel>(o, d);
    });
}
