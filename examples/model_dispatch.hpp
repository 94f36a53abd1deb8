#pragma once
// What the evaluation examples (generate, perplexity) share: a checkpoint loaded into the compiled
// model type its config.json describes, and the tokenizer that goes with it.
//
// A model's structure is its C++ type, so a program that reads "any" checkpoint must be compiled for
// every structure it accepts and pick one at run time. with_model reads config.json (through
// io::read_hf_config), finds the first type below that computes the same function (the family's name
// is only a label, as load_hf sees it) and calls f(model) with a Model& of that type:
//
//   DenseLlama          nn::Transformer<nn::Llama, …, compress::Any>    LlamaForCausalLM, MoptForCausalLM
//   SwitchEveryOther    Llama + SwitchFFN<Top1, EveryOtherLayer>        MoptForCausalLM (models/switch-brown)
//   SwitchEveryLayer    Llama + SwitchFFN<Top1, EveryLayer>             MoptForCausalLM
//   Mixtral             Llama + SwitchFFN<TopK, EveryLayer>             MixtralForCausalLM
//   Gpt                 nn::Transformer<nn::GPT>                        MoptForCausalLM
//
// A llama2.c checkpoint (*.bin) is always DenseLlama (the format has no other structure). f is
// instantiated for every type, so it must compile (and return the same type) for all of them.
#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>

#include <mopt/mopt.hpp>

#include "cli.hpp"

namespace mopt::examples {

// The Backend slot of every type below: backend::Cpu, unless the including file names another
// first (examples/prompt_tune_gpu.cu: backend::Cuda, the only change that makes prompt_tune run
// on the GPU).
#ifndef MOPT_EXAMPLE_BACKEND
#define MOPT_EXAMPLE_BACKEND ::mopt::backend::Cpu
#endif
using ExampleBackend = MOPT_EXAMPLE_BACKEND;

// compress::Any: each type also loads a compressed checkpoint (examples/compress writes them) and
// can be compressed by a recipe given at run time.
using DenseLlama = nn::Transformer<nn::Llama, nn::Llama::FFN, compress::Any, prompt::None, ExampleBackend>;
using SwitchEveryOther = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryOtherLayer>, compress::Any,
                                         prompt::None, ExampleBackend>;
using SwitchEveryLayer =
    nn::Transformer<nn::Llama, nn::SwitchFFN<nn::Top1, nn::EveryLayer>, compress::Any, prompt::None, ExampleBackend>;
// Top-2 routing and the GPT family run on the CPU only (the GPU kernels take RMSNorm, RoPE, SwiGLU, top-1).
using Mixtral = nn::Transformer<nn::Llama, nn::SwitchFFN<nn::TopK, nn::EveryLayer>, compress::Any>;
using Gpt = nn::Transformer<nn::GPT, nn::GPT::FFN, compress::Any>;

namespace detail {

// The config.json of a Hugging Face checkpoint path (the folder or the file itself), or an empty
// path for anything else (a llama2.c .bin, a missing path: io::load_model names those).
inline std::filesystem::path config_json_of(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(path, ec)) return path / "config.json";
    if (fs::is_regular_file(path, ec) && path.filename() == "config.json") return path;
    return {};
}

template <class Model>
bool computes(const nn::Structure& s) {
    return io::detail::hf::same_computation(s, Model::structure());
}

}  // namespace detail

// Loads the checkpoint at `path` into the matching type and returns f(model); a structure none of
// the types computes is a mopt::Error naming the file, the structure and the structures supported.
template <class F>
auto with_model(const std::filesystem::path& path, F&& f) -> decltype(f(std::declval<DenseLlama&>())) {
    const std::filesystem::path config = detail::config_json_of(path);
    if (config.empty()) {  // llama2.c, or a path load_model reports
        DenseLlama model = io::load_model<DenseLlama>(path);
        return f(model);
    }
    const io::HfConfig hf = io::read_hf_config(config);
    const auto run = [&]<class Model>(std::type_identity<Model>) {
        Model model = io::load_model<Model>(path);
        return f(model);
    };
    if (detail::computes<DenseLlama>(hf.structure)) return run(std::type_identity<DenseLlama>{});
    if (detail::computes<SwitchEveryOther>(hf.structure)) return run(std::type_identity<SwitchEveryOther>{});
    if (detail::computes<SwitchEveryLayer>(hf.structure)) return run(std::type_identity<SwitchEveryLayer>{});
    if constexpr (!ExampleBackend::is_cuda) {
        if (detail::computes<Mixtral>(hf.structure)) return run(std::type_identity<Mixtral>{});
        if (detail::computes<Gpt>(hf.structure)) return run(std::type_identity<Gpt>{});
    }
    if constexpr (ExampleBackend::is_cuda)
        throw Error(mopt::detail::concat("config '", config.string(), "': ", hf.architecture, " is ",
                                         hf.structure.describe(), ", a structure the ", ExampleBackend::name,
                                         " backend does not run; it runs ", DenseLlama::structure().describe(), ", ",
                                         SwitchEveryOther::structure().describe(), " and ",
                                         SwitchEveryLayer::structure().describe()));
    throw Error(mopt::detail::concat(
        "config '", config.string(), "': ", hf.architecture, " is ", hf.structure.describe(),
        ", a structure this program is not compiled for; it runs ", DenseLlama::structure().describe(), ", ",
        SwitchEveryOther::structure().describe(), ", ", SwitchEveryLayer::structure().describe(), ", ",
        Mixtral::structure().describe(), " and ", Gpt::structure().describe()));
}

// The tokenizer for a model of `vocab_size` tokens at `model_path`: `flag` (--tokenizer) when given,
// else the one stored beside the model (tokenizer.model in a Hugging Face folder, tok<vocab>.bin or
// tokenizer.bin next to a llama2.c .bin). `file` receives the path read. A missing tokenizer, or one
// whose vocabulary is not the model's, is an error naming both: a usage error (exit 2) when the
// user chose the file, a file error (exit 1) when the model's own folder holds the wrong one.
inline data::Tokenizer load_tokenizer(const std::string& flag, const std::filesystem::path& model_path,
                                      std::int64_t vocab_size, std::filesystem::path& file) {
    namespace fs = std::filesystem;
    std::error_code ec;
    file = flag;
    if (file.empty()) {
        file = io::tokenizer_next_to(model_path, vocab_size);
        const fs::path dir = fs::is_directory(model_path, ec) ? model_path : model_path.parent_path();
        cli::usage_check(!file.empty(), "--tokenizer is missing and no tokenizer was found next to ", model_path,
                         " (looked for ",
                         model_path.extension() == ".bin"
                             ? (dir / ("tok" + std::to_string(vocab_size) + ".bin")).string() + " and " +
                                   (dir / "tokenizer.bin").string()
                             : (dir / "tokenizer.model").string(),
                         "); pass --tokenizer PATH");
    } else {
        cli::usage_check(fs::is_regular_file(file, ec), "--tokenizer ", file, ": no such file");
    }
    data::Tokenizer tok = data::Tokenizer::load(file);
    if (tok.vocab_size() != vocab_size) {
        const std::string msg = mopt::detail::concat(
            flag.empty() ? "the tokenizer " : "--tokenizer ", file, " has a vocabulary of ", tok.vocab_size(),
            " tokens but the model ", model_path, " has vocab_size ", vocab_size,
            "; use the tokenizer the model was trained with");
        if (flag.empty()) throw Error(msg);
        throw cli::UsageError(msg);
    }
    return tok;
}

// The --model and --tokenizer flags every example that runs a pretrained model takes.
inline void add_model_options(boost::program_options::options_description& opts, std::string& model,
                              std::string& tokenizer) {
    namespace po = boost::program_options;
    opts.add_options()
        ("model", po::value(&model)->required(),
         "llama2.c checkpoint (.bin) or Hugging Face folder / config.json (dense Llama, Switch, Mixtral or GPT)")
        ("tokenizer", po::value(&tokenizer),
         "SentencePiece .model or llama2.c tokenizer .bin; default: tokenizer.model in a model folder, "
         "tok<vocab>.bin or tokenizer.bin next to a .bin model");
}
// Usage errors for a --model or --tokenizer path that does not exist.
inline void check_model_paths(const std::string& model, const std::string& tokenizer) {
    namespace fs = std::filesystem;
    cli::usage_check(fs::exists(model), "--model ", fs::path(model), ": no such file or folder");
    cli::usage_check(tokenizer.empty() || fs::is_regular_file(tokenizer), "--tokenizer ", fs::path(tokenizer),
                     ": no such file");
}

}  // namespace mopt::examples
