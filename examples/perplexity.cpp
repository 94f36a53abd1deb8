// perplexity — how well a pretrained model (a llama2.c checkpoint or a Hugging Face folder) predicts
// a text file: exp of the mean next-token negative log-likelihood, every token predicted once, long
// texts in sliding windows of --context positions moving by --stride tokens.
//
//   perplexity --model ../shared/models/stories260K.bin --text story.txt --context 256 --stride 128
//   perplexity --model M [--tokenizer T] --text FILE [--context N] [--stride N] [--json PATH]
//
// Prints {"ppl": …, "nll": …, "tokens": …} (and the settings) as one JSON line; --json writes it to a file.
// Exit status: 0 done, 1 an error in a file (model, tokenizer), 2 a bad command line.
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mopt/eval/perplexity.hpp>
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
    std::string model_path, tokenizer_path, text_path, json_path;
    std::int64_t context = 0, stride = 0;
    po::options_description opts(
        "perplexity: score a text file with a pretrained model (llama2.c .bin or Hugging Face folder)\n"
        "usage: perplexity --model PATH --text FILE [options]");
    opts.add_options()("help,h", "show this help")
        ("model", po::value(&model_path)->required(), "llama2.c checkpoint (.bin) or Hugging Face folder / config.json")
        ("tokenizer", po::value(&tokenizer_path),
         "llama2.c tokenizer (.bin); default: tok<vocab>.bin or tokenizer.bin next to a .bin model")
        ("text", po::value(&text_path)->required(), "UTF-8 text file to score (BOS is put in front)")
        ("context", po::value(&context)->default_value(context), "positions per window; 0 = the model's max_seq")
        ("stride", po::value(&stride)->default_value(stride),
         "new tokens scored per window after the first, in [1, context]; 0 = context (no overlap)")
        ("json", po::value(&json_path), "also write the result as JSON to this file");
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
    usage_check(context >= 0, "--context must be >= 0 (0 = the model's max_seq), got ", context);
    usage_check(stride >= 0, "--stride must be >= 0 (0 = the context), got ", stride);
    usage_check(fs::exists(model_path), "--model ", fs::path(model_path), ": no such file or folder");
    usage_check(tokenizer_path.empty() || fs::exists(tokenizer_path), "--tokenizer ", fs::path(tokenizer_path),
                ": no such file");
    usage_check(fs::is_regular_file(text_path), "--text ", fs::path(text_path), ": no such file");

    Model model = io::load_model<Model>(model_path);
    const nn::ModelConfig& c = model.config();
    usage_check(context <= c.max_seq, "--context ", context, " exceeds the model's max_seq = ", c.max_seq);
    const std::int64_t window = context > 0 ? context : c.max_seq;
    usage_check(stride <= window, "--stride ", stride, " exceeds the context of ", window,
                " positions; a larger stride would skip tokens");
    const fs::path tok_path = resolve_tokenizer(tokenizer_path, model_path, c.vocab_size);
    const auto tok = data::Llama2cTokenizer::load(tok_path, c.vocab_size);

    std::ifstream in(text_path, std::ios::binary);
    const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    check(!in.bad(), "--text ", fs::path(text_path), ": reading failed");
    const std::vector<std::int32_t> ids = tok.encode(text, /*add_bos=*/false);
    usage_check(!ids.empty(), "--text ", fs::path(text_path), " is empty: nothing to score");

    const auto start = std::chrono::steady_clock::now();
    const eval::PerplexityResult r = eval::perplexity(model, ids, {.context = context, .stride = stride});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const nlohmann::json j{{"ppl", r.ppl},
                           {"nll", r.nll},
                           {"tokens", r.tokens},
                           {"context", window},
                           {"stride", stride > 0 ? stride : window},
                           {"windows", r.windows},
                           {"model", model_path},
                           {"text", text_path},
                           {"seconds", seconds}};
    std::cout << j.dump() << "\n";
    std::fprintf(stderr, "perplexity: %lld tokens of %s in %lld windows, %.3f s: ppl %.4f\n",
                 static_cast<long long>(r.tokens), text_path.c_str(), static_cast<long long>(r.windows), seconds, r.ppl);
    if (!json_path.empty()) {
        std::ofstream out(json_path);
        out << j.dump(2) << "\n";
        check(out.good(), "--json: could not write ", json_path);
    }
    return 0;
} catch (const UsageError& e) {
    std::fprintf(stderr, "perplexity: %s (see --help)\n", e.what());
    return 2;
} catch (const std::exception& e) {
    std::fprintf(stderr, "perplexity: %s\n", e.what());
    return 1;
}
