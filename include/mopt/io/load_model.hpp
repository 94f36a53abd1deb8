#pragma once
// load_model: one entry point for the checkpoints mopt reads, chosen by what the path is —
//   a llama2.c checkpoint "*.bin"                    -> import_llama2c<Model>(path)
//   a Hugging Face folder, or its config.json        -> load_hf<Model>(folder)
// Anything else is a mopt::Error naming the path. tokenizer_next_to finds the tokenizer file that
// usually comes with a checkpoint.
#include <cstdint>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/io/hf_checkpoint.hpp"
#include "mopt/io/llama2c_import.hpp"

namespace mopt::io {

template <class Model>
Model load_model(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    check(fs::exists(path, ec), "load_model: ", path, " does not exist");
    if (fs::is_regular_file(path, ec) && path.extension() == ".bin") return import_llama2c<Model>(path);
    const bool is_dir = fs::is_directory(path, ec);
    if (is_dir || (fs::is_regular_file(path, ec) && path.filename() == "config.json")) {
        const fs::path dir = is_dir ? path : path.parent_path();
        return load_hf<Model>(dir.empty() ? fs::path(".") : dir);
    }
    throw Error(mopt::detail::concat("load_model: ", path,
                                     " is neither a llama2.c checkpoint (*.bin) nor a Hugging Face checkpoint "
                                     "(a folder with config.json, or the config.json itself)"));
}

// The tokenizer stored beside a checkpoint, or an empty path when there is none:
//   llama2.c "x.bin"  -> tok{vocab_size}.bin (llama2.c's name for a custom vocabulary, e.g. tok512.bin),
//                        else tokenizer.bin (its default Llama 2 tokenizer) in the same folder;
//   Hugging Face dir  -> tokenizer.model (SentencePiece) in the folder.
inline std::filesystem::path tokenizer_next_to(const std::filesystem::path& model, std::int64_t vocab_size) {
    namespace fs = std::filesystem;
    std::error_code ec;
    const bool is_dir = fs::is_directory(model, ec);
    const fs::path dir = is_dir ? model : model.parent_path();
    std::vector<fs::path> candidates;
    if (!is_dir && model.extension() == ".bin") {
        candidates.push_back(dir / ("tok" + std::to_string(vocab_size) + ".bin"));
        candidates.push_back(dir / "tokenizer.bin");
    } else {
        candidates.push_back(dir / "tokenizer.model");
    }
    for (const fs::path& p : candidates)
        if (fs::is_regular_file(p, ec)) return p;
    return {};
}

}  // namespace mopt::io
