// generate — continue a prompt with a pretrained model (a llama2.c checkpoint or a Hugging Face
// folder), on the CPU, with a KV cache; prints the prompt followed by its continuation.
//
//   generate --model ../shared/models/stories260K.bin --prompt "Once upon a time" --steps 100 --temperature 0.8
//   generate --model M [--tokenizer T] --prompt TEXT [--steps N] [--temperature T] [--top-p P] [--seed S]
//            [--no-stop] [--json PATH]
//
// Exit status: 0 done, 1 an error in a file (model, tokenizer), 2 a bad command line.
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mopt/eval/generate.hpp>
#include <mopt/io/load_model.hpp>
#include <mopt/mopt.hpp>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

using Model = mopt::nn::Transformer<mopt::nn::Llama>;  // dense Llama: llama2.c and HF Llama checkpoints

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace mopt;

namespace {

// A command-line mistake (exit status 2), as opposed to a bad file (exit status 1).
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
template <class... Args>
void usage_check(bool cond, Args&&... args) {
    if (!cond) throw UsageError(mopt::detail::concat(std::forward<Args>(args)...));
}

// --tokenizer, or the tokenizer stored beside the model; only llama2.c's format is read for now.
fs::path resolve_tokenizer(const std::string& flag, const fs::path& model, std::int64_t vocab) {
    fs::path tok = flag;
    if (tok.empty()) {
        tok = io::tokenizer_next_to(model, vocab);
        usage_check(!tok.empty(), "--tokenizer is missing and no tokenizer was found next to ", model, " (looked for ",
                    fs::is_directory(model) ? "tokenizer.model" : "tok" + std::to_string(vocab) + ".bin, tokenizer.bin",
                    "); pass --tokenizer PATH");
    }
    usage_check(tok.extension() != ".model", "--tokenizer ", tok,
                ": SentencePiece .model tokenizers are not yet supported; pass a llama2.c tokenizer .bin");
    return tok;
}

}  // namespace

int main(int argc, char** argv) try {
    std::string model_path, tokenizer_path, prompt, json_path;
    std::int64_t steps = 256;
    float temperature = 1.0f, top_p = 0.9f;
    std::uint64_t seed = 1;
    po::options_description opts(
        "generate: continue a prompt with a pretrained model (llama2.c .bin or Hugging Face folder)\n"
        "usage: generate --model PATH --prompt TEXT [options]");
    opts.add_options()("help,h", "show this help")
        ("model", po::value(&model_path)->required(), "llama2.c checkpoint (.bin) or Hugging Face folder / config.json")
        ("tokenizer", po::value(&tokenizer_path),
         "llama2.c tokenizer (.bin); default: tok<vocab>.bin or tokenizer.bin next to a .bin model")
        ("prompt", po::value(&prompt)->required(), "text to continue")
        ("steps", po::value(&steps)->default_value(steps), "tokens to generate (fewer if the model ends the text)")
        ("temperature", po::value(&temperature)->default_value(temperature), "sampling temperature; 0 = greedy")
        ("top-p", po::value(&top_p)->default_value(top_p, "0.9"), "nucleus sampling mass in (0, 1]; 1 = off")
        ("seed", po::value(&seed)->default_value(seed), "random seed of the sampler")
        ("no-stop", "keep going past the end-of-text token (EOS, or BOS that starts a new story)")
        ("json", po::value(&json_path), "also write the text, token ids and timing as JSON to this file");
    po::variables_map vm;
    try {
        po::store(po::parse_command_line(argc, argv, opts), vm);
        if (vm.count("help")) {
            std::cout << opts << "\n";
            return 0;
        }
        po::notify(vm);
    } catch (const po::error& e) {
        throw UsageError(e.what());
    }
    usage_check(steps > 0, "--steps must be positive, got ", steps);
    usage_check(std::isfinite(temperature) && temperature >= 0.0f, "--temperature must be >= 0 (0 = greedy), got ",
                temperature);
    usage_check(std::isfinite(top_p) && top_p > 0.0f && top_p <= 1.0f, "--top-p must be in (0, 1], got ", top_p);
    usage_check(!prompt.empty(), "--prompt is empty; give some text to continue");
    usage_check(fs::exists(model_path), "--model ", fs::path(model_path), ": no such file or folder");
    usage_check(tokenizer_path.empty() || fs::exists(tokenizer_path), "--tokenizer ", fs::path(tokenizer_path),
                ": no such file");

    Model model = io::load_model<Model>(model_path);
    const nn::ModelConfig& c = model.config();
    const fs::path tok_path = resolve_tokenizer(tokenizer_path, model_path, c.vocab_size);
    const auto tok = data::Llama2cTokenizer::load(tok_path, c.vocab_size);
    std::vector<std::int32_t> ids = tok.encode(prompt);  // BOS first
    const auto P = static_cast<std::int64_t>(ids.size());
    usage_check(P <= c.max_seq, "--prompt is ", P, " tokens long but the model's context is max_seq = ", c.max_seq);
    if (P + steps - 1 > c.max_seq) {
        const std::int64_t fit = c.max_seq - P + 1;
        std::fprintf(stderr, "generate: --steps %lld reduced to %lld: the prompt (%lld tokens) and the text must fit "
                     "the model's context of %lld positions\n",
                     static_cast<long long>(steps), static_cast<long long>(fit), static_cast<long long>(P),
                     static_cast<long long>(c.max_seq));
        steps = fit;
    }

    const auto start = std::chrono::steady_clock::now();
    const std::vector<std::int32_t> cont = eval::generate(
        model, ids, {.steps = steps, .temperature = temperature, .top_p = top_p, .seed = seed,
                     .stop_at_eos = vm.count("no-stop") == 0});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::vector<std::int32_t> all = ids;
    all.insert(all.end(), cont.begin(), cont.end());
    const std::string text = tok.decode(all);
    std::cout << text << "\n";
    const double tps = seconds > 0 ? static_cast<double>(cont.size()) / seconds : 0.0;
    std::fprintf(stderr, "generate: %zu tokens in %.3f s (%.1f tokens/s; prompt %lld tokens)\n", cont.size(), seconds,
                 tps, static_cast<long long>(P));
    if (!json_path.empty()) {
        nlohmann::json j{{"model", model_path},         {"tokenizer", tok_path.string()},
                         {"prompt", prompt},            {"text", text},
                         {"continuation", text.substr(std::min(text.size(), tok.decode(ids).size()))}, {"prompt_tokens", ids},
                         {"tokens", cont},              {"steps", steps},
                         {"temperature", temperature},  {"top_p", top_p},
                         {"seed", seed},                {"seconds", seconds},
                         {"tokens_per_second", tps}};
        std::ofstream out(json_path);
        out << j.dump(2) << "\n";
        check(out.good(), "--json: could not write ", json_path);
    }
    return 0;
} catch (const UsageError& e) {
    std::fprintf(stderr, "generate: %s (see --help)\n", e.what());
    return 2;
} catch (const std::exception& e) {
    std::fprintf(stderr, "generate: %s\n", e.what());
    return 1;
}
