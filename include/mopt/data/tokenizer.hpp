#pragma once
// Tokenizer: one type for the tokenizers mopt reads — a SentencePiece `.model` or a llama2.c
// `tokenizer.bin` — so that corpora, batches and examples need not know which one they hold.
//
// The contract (concept TextTokenizer), which Tokenizer and SentencePieceTokenizer meet:
//   encode(text, add_bos) -> std::vector<std::int32_t>   text (UTF-8) -> ids, BOS first if asked
//   decode(ids)           -> std::string                  control ids print nothing
//   vocab_size()          -> std::int64_t                 every id is in [0, vocab_size)
//   bos_id(), eos_id()    -> std::int32_t
// Encoding is const and keeps no state, so one tokenizer may encode from several threads at once.
//
// Type erasure is a std::variant: two alternatives, no virtual calls, and a caller that needs the
// concrete tokenizer gets it with get_if<T>().
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "mopt/data/llama2c_tokenizer.hpp"
#include "mopt/data/sentencepiece_tokenizer.hpp"
#include "mopt/error.hpp"

namespace mopt::data {

template <class T>
concept TextTokenizer = requires(const T& t, std::string_view text, std::span<const std::int32_t> ids) {
    { t.encode(text, true) } -> std::same_as<std::vector<std::int32_t>>;
    { t.decode(ids) } -> std::same_as<std::string>;
    { t.vocab_size() } -> std::convertible_to<std::int64_t>;
    { t.bos_id() } -> std::convertible_to<std::int32_t>;
    { t.eos_id() } -> std::convertible_to<std::int32_t>;
};

namespace detail {

// The number of tokens in a llama2.c tokenizer file (its format does not store it: llama2.c takes
// it from the model's config). Walks the entries without reading pieces; on a malformed entry it
// returns that entry's index + 1, so that Llama2cTokenizer::load reaches it and reports exactly
// what is wrong there.
[[nodiscard]] inline std::int64_t llama2c_token_count(const std::filesystem::path& file) {
    std::error_code ec;
    check(std::filesystem::is_regular_file(file, ec), "llama2.c tokenizer ", file, ": no such file (or not a regular file)");
    const auto size = static_cast<std::int64_t>(std::filesystem::file_size(file, ec));
    check(!ec, "llama2.c tokenizer ", file, ": cannot read its size: ", ec.message());
    if (size < 4) return 1;  // load reports the short header
    std::ifstream in(file, std::ios::binary);
    check(in.good(), "llama2.c tokenizer ", file, ": cannot open it for reading");
    std::int64_t pos = 4, count = 0;
    while (pos < size) {
        if (size - pos < 8) return count + 1;
        std::int32_t len = 0;
        in.seekg(pos + 4);
        in.read(reinterpret_cast<char*>(&len), 4);
        check(in.gcount() == 4, "llama2.c tokenizer ", file, ": read failed at offset ", pos + 4);
        if (len < 0 || len > size - pos - 8) return count + 1;
        pos += 8 + len;
        ++count;
    }
    check(count > 0, "llama2.c tokenizer ", file, ": no tokens after the 4-byte header");
    return count;
}

}  // namespace detail

class Tokenizer {
public:
    Tokenizer(SentencePieceTokenizer t) : impl_(std::move(t)) {}  // NOLINT: implicit by design
    Tokenizer(Llama2cTokenizer t) : impl_(std::move(t)) {}        // NOLINT

    // By extension: `.model` is SentencePiece, `.bin` a llama2.c tokenizer (its vocabulary size is
    // its token count). Anything else is an error naming the path.
    static Tokenizer load(const std::filesystem::path& file) {
        const auto ext = file.extension();
        if (ext == ".model") return SentencePieceTokenizer::load(file);
        if (ext == ".bin") return Llama2cTokenizer::load(file, detail::llama2c_token_count(file));
        throw Error(mopt::detail::concat("Tokenizer::load: ", file, " has extension '", ext.string(),
                                         "'; expected .model (SentencePiece) or .bin (llama2.c tokenizer)"));
    }

    [[nodiscard]] std::vector<std::int32_t> encode(std::string_view text, bool add_bos = true) const {
        return std::visit([&](const auto& t) { return t.encode(text, add_bos); }, impl_);
    }
    [[nodiscard]] std::string decode(std::span<const std::int32_t> ids) const {
        return std::visit([&](const auto& t) { return t.decode(ids); }, impl_);
    }
    [[nodiscard]] std::int64_t vocab_size() const {
        return std::visit([](const auto& t) { return static_cast<std::int64_t>(t.vocab_size()); }, impl_);
    }
    // Both formats use the llama2.c/Llama ids (SentencePieceTokenizer::load insists on them).
    [[nodiscard]] std::int32_t bos_id() const { return is<Llama2cTokenizer>() ? Llama2cTokenizer::bos : SentencePieceTokenizer::bos; }
    [[nodiscard]] std::int32_t eos_id() const { return is<Llama2cTokenizer>() ? Llama2cTokenizer::eos : SentencePieceTokenizer::eos; }
    // "sentencepiece" or "llama2c", for logs and file names.
    [[nodiscard]] std::string_view kind() const { return is<Llama2cTokenizer>() ? "llama2c" : "sentencepiece"; }

    template <class T>
    [[nodiscard]] bool is() const {
        return std::holds_alternative<T>(impl_);
    }
    template <class T>
    [[nodiscard]] const T* get_if() const {
        return std::get_if<T>(&impl_);
    }

private:
    std::variant<SentencePieceTokenizer, Llama2cTokenizer> impl_;
};

static_assert(TextTokenizer<Tokenizer>);
static_assert(TextTokenizer<SentencePieceTokenizer>);

}  // namespace mopt::data
