// compress — prune and/or quantise a pretrained model the way practitioners do, pack it so it really
// shrinks, save it, and measure what it cost: test-split perplexity on the Brown corpus before and after.
//
//   compress --model models/dense-brown --method sparsegpt --sparsity 0.5 --out out/dense-sgpt50 --json r.json
//   compress --model models/dense-brown --method nm --nm-zero 2 --nm-group 4 --out out/dense-2of4
//   compress --model models/switch-brown --method gptq --bits 4 --group 128 --out out/switch-gptq4
//   compress --model models/dense-brown --method sparsegpt --sparsity 0.5 --quantize gptq --bits 4 --out …
//
// Methods: magnitude, wanda, sparsegpt (unstructured, --sparsity R = fraction of each row zeroed);
// nm (N:M with --saliency magnitude|wanda|sparsegpt); int8 (per-row absmax, LLM.int8() vector-wise,
// --outlier-threshold for its outlier columns); rtn, gptq (--bits 2..8, --group G, --act-order).
// --quantize rtn|gptq|int8 after a pruning method combines both (Xu et al.'s 50% + int4).
// N:M convention: --nm-zero N --nm-group M ZEROES N weights in every group of M consecutive inputs
// (so "2:4" keeps 2 of 4 and "7:8" keeps 1 of 8, the Mixture-of-Prompts paper's 87.5%).
//
// Calibration: --calibration-windows N (default 128) windows of --calibration-seq-len tokens drawn
// from the Brown train split, streamed layer by layer (compress/compress_model.hpp).
// Writes the compressed model (config.json with its recipe, model.safetensors with packed tensors,
// tokenizer.model) into --out, and --json {"method", "sparsity", "bits", "bytes_before",
// "bytes_after", "ppl_before", "ppl_after", …}. Exit status: 0 done, 1 a file/run error, 2 a bad flag.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>
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
    std::string model, tokenizer, method, saliency = "sparsegpt", quantize = "none", out, json;
    std::string brown_dir = "data/brown", domains = "groups7", layers = "attention,ffn,expert";
    double sparsity = 0.5, damp = 0.01;
    int nm_zero = 2, nm_group = 4, bits = 4;
    std::int64_t group = 128, windows = 128, calib_seq_len = 0, batch = 16, eval_windows = 0;
    float outlier_threshold = 0.0f;
    bool act_order = false, no_eval = false, no_eval_before = false;
    std::uint64_t split_seed = 1234, seed = 0;
};

compress::Recipe make_recipe(const Options& o, const po::variables_map& vm) {
    const auto given = [&](const char* f) { return vm.count(f) > 0 && !vm[f].defaulted(); };
    compress::Recipe r;
    const std::string& m = o.method;
    usage_check(m == "magnitude" || m == "wanda" || m == "sparsegpt" || m == "nm" || m == "int8" || m == "rtn" ||
                    m == "gptq",
                "--method must be magnitude, wanda, sparsegpt, nm, int8, rtn or gptq, got '", m, "'");
    const bool prunes = m == "magnitude" || m == "wanda" || m == "sparsegpt" || m == "nm";
    if (prunes) {
        if (m == "nm") {
            usage_check(o.saliency == "magnitude" || o.saliency == "wanda" || o.saliency == "sparsegpt",
                        "--saliency must be magnitude, wanda or sparsegpt, got '", o.saliency, "'");
            usage_check(o.nm_group >= 2, "--nm-group must be >= 2, got ", o.nm_group);
            usage_check(o.nm_zero >= 1 && o.nm_zero < o.nm_group, "--nm-zero N must be in [1, --nm-group) (N of every M "
                        "weights are zeroed), got N = ", o.nm_zero, ", M = ", o.nm_group);
            usage_check(!given("sparsity"), "--sparsity applies to unstructured methods; --method nm takes --nm-zero and --nm-group");
            r.prune = compress::parse_saliency(o.saliency);
            r.sparsity = {.ratio = 0.0, .nm_zero = o.nm_zero, .nm_group = o.nm_group};
        } else {
            usage_check(o.sparsity >= 0.0 && o.sparsity < 1.0, "--sparsity must be in [0, 1), got ", o.sparsity);
            for (const char* f : {"nm-zero", "nm-group", "saliency"})
                usage_check(!given(f), "--", f, " applies to --method nm");
            r.prune = compress::parse_saliency(m);
            r.sparsity.ratio = o.sparsity;
        }
        usage_check(o.quantize == "none" || o.quantize == "rtn" || o.quantize == "gptq" || o.quantize == "int8",
                    "--quantize must be none, rtn, gptq or int8, got '", o.quantize, "'");
        r.quantizer = compress::parse_quantizer(o.quantize);
    } else {
        for (const char* f : {"sparsity", "nm-zero", "nm-group", "saliency", "quantize"})
            usage_check(!given(f), "--", f, " applies to pruning methods (magnitude, wanda, sparsegpt, nm)");
        r.quantizer = compress::parse_quantizer(m);
    }
    if (r.quantizer == compress::Quantizer::int8) {
        usage_check(!given("bits") || o.bits == 8, "--bits ", o.bits, " with int8: int8 is 8 bits (use rtn or gptq for fewer)");
        usage_check(o.outlier_threshold >= 0.0f, "--outlier-threshold must be >= 0, got ", o.outlier_threshold);
        r.outlier_threshold = o.outlier_threshold;
        r.quant.bits = 8;
    } else if (r.quantizer != compress::Quantizer::none) {
        usage_check(o.bits >= 2 && o.bits <= 8, "--bits must be in 2..8, got ", o.bits);
        usage_check(o.group >= 0, "--group must be >= 0 (0 = one group per row), got ", o.group);
        r.quant.bits = o.bits;
        r.quant.group = o.group;
        r.quant.act_order = o.act_order;
    } else {
        for (const char* f : {"bits", "group", "act-order", "outlier-threshold"})
            usage_check(!given(f), "--", f, " applies to quantisation (--method int8|rtn|gptq or --quantize)");
    }
    usage_check(o.damp > 0.0, "--damp must be > 0, got ", o.damp);
    r.damp = o.damp;
    r.roles.clear();
    for (const std::string& item : cli::split(o.layers, ',')) {
        try {
            r.roles.insert(nn::parse_linear_role(item));
        } catch (const Error& e) {
            throw cli::UsageError(mopt::detail::concat("--layers: ", e.what()));
        }
    }
    usage_check(!r.roles.empty(), "--layers names no layer type (attention, ffn, expert, router)");
    return r;
}

template <class Model>
int run(const Options& o, const compress::Recipe& recipe, Model& model) {
    fs::path tok_path;
    const data::Tokenizer tok = examples::load_tokenizer(o.tokenizer, o.model, model.config().vocab_size, tok_path);
    usage_check(fs::is_directory(o.brown_dir), "--brown-dir ", fs::path(o.brown_dir),
                ": no such folder (scripts/fetch_brown downloads the Brown corpus there)");
    const data::Corpus corpus = data::read_brown(o.brown_dir, o.domains == "genres15" ? data::BrownDomains::genres15
                                                                                     : data::BrownDomains::groups7);
    const data::CorpusSplits splits = data::split_corpus(corpus, o.split_seed);
    const std::int64_t T = model.config().max_seq;
    const std::int64_t calib_T = o.calib_seq_len > 0 ? o.calib_seq_len : T;
    usage_check(calib_T <= T, "--calibration-seq-len ", calib_T, " exceeds the model's max_seq = ", T);
    data::Batches test(splits.test, tok, {.batch_size = o.batch, .seq_len = T, .seed = 0});

    const auto ppl = [&](Model& m) { return eval::corpus_perplexity(m, test).ppl(); };
    const double ppl_before = o.no_eval || o.no_eval_before ? 0.0 : ppl(model);
    Tensor calibration;
    if (recipe.needs_calibration()) {
        data::Batches train(splits.train, tok, {.batch_size = o.batch, .seq_len = calib_T, .seed = 0});
        try {
            calibration = compress::calibration_windows(train, o.windows, o.seed);
        } catch (const Error& e) {
            throw cli::UsageError(mopt::detail::concat("--calibration-windows: ", e.what()));
        }
    }
    std::fprintf(stderr, "compress: %s, %s%s\n", recipe.describe().c_str(), Model::structure().describe().c_str(),
                 recipe.needs_calibration()
                     ? mopt::detail::concat(", calibrated on ", o.windows, " windows of ", calib_T, " tokens").c_str()
                     : "");
    const compress::CompressionReport rep = compress::compress(model, recipe, calibration, {.batch = 8, .verbose = true});
    const double ppl_after = o.no_eval ? 0.0 : ppl(model);

    std::map<std::string, std::int64_t> formats;
    nlohmann::json layers = nlohmann::json::array();
    for (const auto& l : rep.layers) {
        ++formats[l.format];
        layers.push_back({{"name", l.name}, {"role", nn::name(l.role)}, {"format", l.format},
                          {"bytes_before", l.bytes_before}, {"bytes_after", l.bytes_after},
                          {"sparsity", l.sparsity}, {"calibration_rows", l.calibration_rows},
                          {"fallback", l.fallback}});
    }
    nlohmann::json j{{"method", o.method},
                     {"recipe", recipe.to_json()},
                     {"description", recipe.describe()},
                     {"sparsity", recipe.prune ? (recipe.sparsity.structured()
                                                      ? double(recipe.sparsity.nm_zero) / recipe.sparsity.nm_group
                                                      : recipe.sparsity.ratio)
                                               : 0.0},
                     {"bits", recipe.quantizer == compress::Quantizer::none ? 32 : recipe.quant.bits},
                     {"bytes_before", rep.model_bytes_before},
                     {"bytes_after", rep.model_bytes_after},
                     {"ppl_before", ppl_before},
                     {"ppl_after", ppl_after},
                     {"model", o.model},
                     {"structure", Model::structure().describe()},
                     {"calibration_windows", rep.windows},
                     {"calibration_seq_len", rep.tokens_per_window},
                     {"compress_seconds", rep.seconds},
                     {"formats", formats},
                     {"layers", layers}};
    if (recipe.prune && recipe.sparsity.structured()) {
        j["nm_zero"] = recipe.sparsity.nm_zero;
        j["nm_group"] = recipe.sparsity.nm_group;
    }
    if (!o.out.empty()) {
        model.save(o.out);
        if (tok_path.extension() == ".model")
            fs::copy_file(tok_path, fs::path(o.out) / "tokenizer.model", fs::copy_options::overwrite_existing);
        j["out"] = o.out;
    }
    std::printf("%s: %.2f MB -> %.2f MB (%.2fx smaller), %.1f s", recipe.describe().c_str(),
                rep.model_bytes_before / 1e6, rep.model_bytes_after / 1e6,
                double(rep.model_bytes_before) / double(rep.model_bytes_after), rep.seconds);
    if (!o.no_eval) std::printf("; Brown test ppl %.2f -> %.2f", ppl_before, ppl_after);
    std::printf("\n");
    cli::write_json(o.json, j);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    return cli::run("compress", [&] {
        Options o;
        po::options_description opts(
            "compress: prune and/or quantise a pretrained model, pack it, save it, and report bytes and Brown "
            "test perplexity before and after\n"
            "usage: compress --model DIR --method METHOD [options] --out DIR [--json PATH]");
        opts.add_options()("help,h", "show this help");
        examples::add_model_options(opts, o.model, o.tokenizer);
        opts.add_options()
            ("method", po::value(&o.method)->required(), "magnitude, wanda, sparsegpt (unstructured pruning), nm (N:M "
             "pruning), int8 (per-row absmax), rtn or gptq (group-wise 2..8-bit)")
            ("sparsity", po::value(&o.sparsity)->default_value(o.sparsity), "unstructured: fraction of each row zeroed, in [0, 1)")
            ("nm-zero", po::value(&o.nm_zero)->default_value(o.nm_zero),
             "--method nm: N, the weights ZEROED in every group of M (2 with --nm-group 4 keeps 2 of 4; 7 of 8 keeps 1)")
            ("nm-group", po::value(&o.nm_group)->default_value(o.nm_group), "--method nm: M, consecutive inputs per group")
            ("saliency", po::value(&o.saliency)->default_value(o.saliency), "--method nm: magnitude, wanda or sparsegpt")
            ("quantize", po::value(&o.quantize)->default_value(o.quantize),
             "after a pruning method: none, rtn, gptq or int8 (e.g. --method sparsegpt --sparsity 0.5 --quantize gptq --bits 4)")
            ("bits", po::value(&o.bits)->default_value(o.bits), "rtn/gptq: bits per weight, 2..8")
            ("group", po::value(&o.group)->default_value(o.group), "rtn/gptq: inputs sharing a scale and zero (0: one per row)")
            ("act-order", po::bool_switch(&o.act_order), "gptq: quantise columns in order of decreasing Hessian diagonal")
            ("outlier-threshold", po::value(&o.outlier_threshold)->default_value(o.outlier_threshold),
             "int8: inputs whose calibration max |x| reaches this stay f32 (LLM.int8() uses 6; 0: none)")
            ("damp", po::value(&o.damp)->default_value(o.damp), "sparsegpt/gptq: Hessian dampening, fraction of its mean diagonal")
            ("layers", po::value(&o.layers)->default_value(o.layers),
             "comma-separated layer types to compress: attention, ffn, expert, router")
            ("calibration-windows", po::value(&o.windows)->default_value(o.windows), "windows of Brown train text for calibration")
            ("calibration-seq-len", po::value(&o.calib_seq_len), "tokens per calibration window; default: the model's max_seq")
            ("seed", po::value(&o.seed)->default_value(o.seed), "which calibration windows are drawn")
            ("brown-dir", po::value(&o.brown_dir)->default_value(o.brown_dir), "where scripts/fetch_brown put the corpus")
            ("domains", po::value(&o.domains)->default_value(o.domains), "Brown domains: groups7 or genres15")
            ("split-seed", po::value(&o.split_seed)->default_value(o.split_seed), "seed of the document-level split")
            ("batch", po::value(&o.batch)->default_value(o.batch), "windows per forward pass of the perplexity evaluation")
            ("no-eval", po::bool_switch(&o.no_eval), "skip the perplexity evaluation (ppl_before/after = 0)")
            ("no-eval-before", po::bool_switch(&o.no_eval_before), "skip only the evaluation before compression (ppl_before = 0)")
            ("out", po::value(&o.out), "folder for the compressed model")
            ("json", po::value(&o.json), "write the result as JSON to this file");
        po::variables_map vm;
        if (!cli::parse(argc, argv, opts, vm)) return 0;
        const compress::Recipe recipe = make_recipe(o, vm);
        usage_check(o.windows >= 1, "--calibration-windows must be >= 1, got ", o.windows);
        usage_check(o.batch >= 1, "--batch must be >= 1, got ", o.batch);
        usage_check(o.domains == "groups7" || o.domains == "genres15", "--domains must be groups7 or genres15, got '",
                    o.domains, "'");
        examples::check_model_paths(o.model, o.tokenizer);
        return examples::with_model(o.model, [&](auto& model) { return run(o, recipe, model); });
    });
}
