// perplexity — how well a pretrained model (a llama2.c checkpoint, or a Hugging Face folder of any
// structure examples/model_dispatch.hpp is compiled for: dense Llama, Switch, Mixtral, GPT) predicts
// text: exp of the mean next-token negative log-likelihood.
//
// Two sources of text:
//   --text FILE     one text, BOS in front, every token predicted once; a text longer than the
//                   context is scored in sliding windows of --context positions moving by --stride.
//   --corpus C      a corpus split, scored as pre-training evaluates it (data::Batches windows of
//                   --seq-len tokens, one domain per window, eval::corpus_perplexity): overall, per
//                   domain and, for a mixture-of-experts model, with each expert layer's load.
//                   C is "brown" (the Brown corpus in --brown-dir, domains by --domains) or a text
//                   file, a folder of .txt files or a .jsonl file (data::read_corpus); --split picks
//                   the document-level train/validation/test split of data::split_corpus with
//                   --split-seed (or "all" for the whole corpus).
//
//   perplexity --model models/dense-brown --corpus brown --split test
//   perplexity --model ../shared/models/stories260K.bin --text story.txt --context 256 --stride 128
//   perplexity --model M [--tokenizer T] --text FILE [--context N] [--stride N] [--json PATH]
//   perplexity --model M [--tokenizer T] --corpus brown|PATH --split train|validation|test|all
//              [--brown-dir D] [--domains groups7|genres15] [--split-seed S] [--seq-len N] [--batch N]
//              [--pad-tail] [--json PATH]
//
// The defaults (--split-seed 1234, --domains groups7, --batch 16, --seq-len = the model's max_seq)
// are examples/pretrain's, so its models' recorded test perplexity is reproduced exactly. The batch
// size matters only for a Switch model with a capacity limit (capacity is per batch).
//
// Prints a short report ("ppl 81.45", per domain, expert load); --json PATH writes the numbers
// ({"ppl", "nll", "tokens", "per_domain", "expert_load", settings}), --json - prints them instead of
// the report (which then goes to stderr).
// Exit status: 0 done, 1 an error in a file (model, tokenizer, corpus), 2 a bad command line.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <mopt/mopt.hpp>

#include "cli.hpp"
#include "model_dispatch.hpp"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;
using cli::usage_check;

namespace {

struct Options {
    std::string model, tokenizer, text, corpus, split, brown_dir = "data/brown", domains = "groups7", json;
    std::int64_t context = 0, stride = 0, seq_len = 0, batch = 16;
    std::uint64_t split_seed = 1234;
    bool pad_tail = false;
};

// The report goes to stdout, or to stderr when the JSON does (--json -).
std::FILE* report_stream(const Options& o) { return o.json == "-" ? stderr : stdout; }

void emit_json(const Options& o, const nlohmann::json& j) {
    if (o.json == "-")
        std::cout << j.dump(2) << "\n";
    else
        cli::write_json(o.json, j);
}

// The documents to score: the corpus named by --corpus, cut to --split.
data::Corpus load_split(const Options& o) {
    data::Corpus corpus;
    if (o.corpus == "brown") {
        usage_check(fs::is_directory(o.brown_dir), "--brown-dir ", fs::path(o.brown_dir),
                    ": no such folder (scripts/fetch_brown downloads the Brown corpus there)");
        corpus = data::read_brown(o.brown_dir, o.domains == "genres15" ? data::BrownDomains::genres15
                                                                       : data::BrownDomains::groups7);
    } else {
        corpus = data::read_corpus(o.corpus);
    }
    if (o.split == "all") return corpus;
    data::CorpusSplits splits = data::split_corpus(corpus, o.split_seed);
    data::Corpus& part = o.split == "train" ? splits.train : o.split == "validation" ? splits.validation : splits.test;
    usage_check(!part.docs.empty(), "--split ", o.split, " of --corpus ", o.corpus, " holds no document (the corpus has ",
                corpus.docs.size(), " documents; a split needs about 10 per domain); use --split all to score all of them");
    return std::move(part);
}

template <class Model>
int score_corpus(const Options& o, Model& model, const data::Tokenizer& tok, const fs::path& tok_path) {
    const nn::ModelConfig& c = model.config();
    usage_check(o.seq_len <= c.max_seq, "--seq-len ", o.seq_len, " exceeds the model's context max_seq = ", c.max_seq);
    const std::int64_t T = o.seq_len > 0 ? o.seq_len : c.max_seq;
    const data::Corpus split = load_split(o);
    data::Batches batches(split, tok, {.batch_size = o.batch, .seq_len = T, .seed = 0, .pad_tail = o.pad_tail});

    const auto start = std::chrono::steady_clock::now();
    const eval::CorpusPerplexity p = eval::corpus_perplexity(model, batches);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    nlohmann::json per_domain = nlohmann::json::object(), per_domain_tokens = nlohmann::json::object();
    for (const auto& d : p.domains)
        if (d.tokens > 0) {
            per_domain[d.domain] = d.ppl();
            per_domain_tokens[d.domain] = d.tokens;
        }
    nlohmann::json j{{"ppl", p.ppl()},
                     {"nll", p.nll},
                     {"tokens", p.tokens},
                     {"per_domain", per_domain},
                     {"per_domain_tokens", per_domain_tokens},
                     {"model", o.model},
                     {"structure", Model::structure().describe()},
                     {"tokenizer", tok_path.string()},
                     {"corpus", o.corpus},
                     {"split", o.split},
                     {"split_seed", o.split_seed},
                     {"seq_len", T},
                     {"batch", o.batch},
                     {"pad_tail", o.pad_tail},
                     {"windows", batches.num_windows()},
                     {"seconds", seconds}};
    if (o.corpus == "brown") j["domains"] = o.domains;

    std::FILE* out = report_stream(o);
    std::fprintf(out, "perplexity: %s on %s, %s split (%s%lld documents): %lld tokens in %lld windows of %lld, %.1f s\n",
                 Model::structure().describe().c_str(), o.corpus.c_str(), o.split.c_str(),
                 o.corpus == "brown" ? (o.domains + ", ").c_str() : "", static_cast<long long>(split.docs.size()),
                 static_cast<long long>(p.tokens), static_cast<long long>(batches.num_windows()),
                 static_cast<long long>(T), seconds);
    std::fprintf(out, "ppl %.2f  (%.4f nats/token)\n", p.ppl(), p.nll / static_cast<double>(p.tokens));
    for (const auto& d : p.domains)
        if (d.tokens > 0)
            std::fprintf(out, "  %-16s ppl %8.2f  (%lld tokens)\n", d.domain.c_str(), d.ppl(),
                         static_cast<long long>(d.tokens));
    if (!p.experts.empty()) {
        nlohmann::json load = nlohmann::json::array();
        for (const auto& e : p.experts) {
            load.push_back({{"layer", e.layer}, {"fraction", e.fraction}, {"dropped", e.dropped},
                            {"tokens", e.tokens}, {"router_entropy", e.router_entropy}});
            std::fprintf(out, "  expert layer %lld: share", static_cast<long long>(e.layer));
            for (double f : e.fraction) std::fprintf(out, " %.3f", f);
            std::fprintf(out, "; dropped %lld of %lld; router entropy %.3f nats\n", static_cast<long long>(e.dropped),
                         static_cast<long long>(e.tokens), e.router_entropy);
        }
        j["expert_load"] = load;
    }
    emit_json(o, j);
    return 0;
}

template <class Model>
int score_text(const Options& o, Model& model, const data::Tokenizer& tok, const fs::path& tok_path) {
    const nn::ModelConfig& c = model.config();
    usage_check(o.context <= c.max_seq, "--context ", o.context, " exceeds the model's max_seq = ", c.max_seq);
    const std::int64_t window = o.context > 0 ? o.context : c.max_seq;
    usage_check(o.stride <= window, "--stride ", o.stride, " exceeds the context of ", window,
                " positions; a larger stride would skip tokens");
    const data::Corpus doc = data::read_text_file(o.text);  // UTF-8 checked, BOM dropped; empty is an error
    const std::vector<std::int32_t> ids = tok.encode(doc.docs.front().text, /*add_bos=*/false);
    usage_check(!ids.empty(), "--text ", fs::path(o.text), " is empty: nothing to score");

    const auto start = std::chrono::steady_clock::now();
    const eval::PerplexityResult r = eval::perplexity(model, ids, {.context = o.context, .stride = o.stride});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const nlohmann::json j{{"ppl", r.ppl},
                           {"nll", r.nll},
                           {"tokens", r.tokens},
                           {"context", window},
                           {"stride", o.stride > 0 ? o.stride : window},
                           {"windows", r.windows},
                           {"model", o.model},
                           {"structure", Model::structure().describe()},
                           {"tokenizer", tok_path.string()},
                           {"text", o.text},
                           {"seconds", seconds}};
    std::FILE* out = report_stream(o);
    std::fprintf(out, "perplexity: %s on %s: %lld tokens in %lld windows of %lld (stride %lld), %.3f s\n",
                 Model::structure().describe().c_str(), o.text.c_str(), static_cast<long long>(r.tokens),
                 static_cast<long long>(r.windows), static_cast<long long>(window),
                 static_cast<long long>(o.stride > 0 ? o.stride : window), seconds);
    std::fprintf(out, "ppl %.2f  (%.4f nats/token)\n", r.ppl, r.nll / static_cast<double>(r.tokens));
    emit_json(o, j);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("perplexity", [&] {
        Options o;
        po::options_description opts(
            "perplexity: score a text file or a corpus split with a pretrained model (llama2.c .bin or Hugging Face "
            "folder)\n"
            "usage: perplexity --model PATH (--text FILE | --corpus brown|PATH --split SPLIT) [options]");
        opts.add_options()("help,h", "show this help");
        examples::add_model_options(opts, o.model, o.tokenizer);
        opts.add_options()
            ("json", po::value(&o.json), "also write the result as JSON to this file ('-': print it instead of the report)");
        po::options_description text_opts("--text: one text file");
        text_opts.add_options()
            ("text", po::value(&o.text), "UTF-8 text file to score (BOS is put in front)")
            ("context", po::value(&o.context), "positions per window; default (or 0): the model's max_seq")
            ("stride", po::value(&o.stride),
             "new tokens scored per window after the first, in [1, context]; default (or 0): context (no overlap)");
        po::options_description corpus_opts("--corpus: a corpus split, per domain");
        corpus_opts.add_options()
            ("corpus", po::value(&o.corpus),
             "'brown' (the Brown corpus in --brown-dir), a text file, a folder of .txt files or a .jsonl file")
            ("split", po::value(&o.split), "train, validation, test (data::split_corpus) or all")
            ("brown-dir", po::value(&o.brown_dir)->default_value(o.brown_dir), "where scripts/fetch_brown put the corpus")
            ("domains", po::value(&o.domains)->default_value(o.domains), "Brown domains: groups7 or genres15")
            ("split-seed", po::value(&o.split_seed)->default_value(o.split_seed), "seed of the document-level split")
            ("seq-len", po::value(&o.seq_len), "positions per window; default (or 0): the model's max_seq")
            ("batch", po::value(&o.batch)->default_value(o.batch), "windows per forward pass")
            ("pad-tail", po::bool_switch(&o.pad_tail),
             "also score each domain's last, shorter window (padded); by default it is dropped, as in pre-training");
        opts.add(text_opts).add(corpus_opts);
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;

        // Which mode, and no flag of the other one (a flag that would be silently ignored is a mistake).
        const bool text = vm.count("text") > 0, corpus = vm.count("corpus") > 0;
        usage_check(!(text && corpus), "--text and --corpus are mutually exclusive: score one text file or one corpus split");
        usage_check(text || corpus, "give --text FILE or --corpus brown|PATH --split SPLIT");
        const auto given = [&](const char* flag) { return vm.count(flag) > 0 && !vm[flag].defaulted(); };
        if (text) {
            for (const char* flag : {"split", "brown-dir", "domains", "split-seed", "seq-len", "batch", "pad-tail"})
                usage_check(!given(flag), "--", flag, " applies to --corpus, not to --text (use --context and --stride there)");
            usage_check(o.context >= 0, "--context must be >= 0 (0 = the model's max_seq), got ", o.context);
            usage_check(o.stride >= 0, "--stride must be >= 0 (0 = the context), got ", o.stride);
            usage_check(fs::is_regular_file(o.text), "--text ", fs::path(o.text), ": no such file");
        } else {
            for (const char* flag : {"context", "stride"})
                usage_check(!given(flag), "--", flag, " applies to --text, not to --corpus (use --seq-len there)");
            usage_check(vm.count("split") > 0, "--corpus needs --split train, validation, test or all");
            usage_check(o.split == "train" || o.split == "validation" || o.split == "test" || o.split == "all",
                        "--split must be train, validation, test or all, got '", o.split, "'");
            if (o.corpus == "brown") {
                usage_check(o.domains == "groups7" || o.domains == "genres15",
                            "--domains must be groups7 or genres15, got '", o.domains, "'");
            } else {
                usage_check(fs::exists(o.corpus), "--corpus ", fs::path(o.corpus),
                            ": no such file or folder (or 'brown' for the Brown corpus)");
                for (const char* flag : {"brown-dir", "domains"})
                    usage_check(!given(flag), "--", flag, " applies to --corpus brown only");
            }
            usage_check(o.seq_len >= 0, "--seq-len must be >= 0 (0 = the model's max_seq), got ", o.seq_len);
            usage_check(o.batch > 0, "--batch must be positive, got ", o.batch);
        }
        examples::check_model_paths(o.model, o.tokenizer);

        return examples::with_model(o.model, [&](auto& model) {
            fs::path tok_path;
            const data::Tokenizer tok = examples::load_tokenizer(o.tokenizer, o.model, model.config().vocab_size, tok_path);
            return text ? score_text(o, model, tok, tok_path) : score_corpus(o, model, tok, tok_path);
        });
    });
}
