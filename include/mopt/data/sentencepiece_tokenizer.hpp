#pragma once
// SentencePieceTokenizer: a SentencePiece model (Kudo & Richardson 2018) trained here, on the
// corpus, through the library's C++ API, and saved as a `.model` file.
//
// Training settings are chosen so that decode(encode(s)) == s for every valid UTF-8 string without
// U+2581 ('▁', SentencePiece's own space mark, which decodes as a space):
//   - normalization_rule_name=identity, remove_extra_whitespaces=false: no NFKC rewriting, no
//     collapsing of spaces, newlines kept;
//   - byte_fallback=true, character_coverage=1.0: a character outside the vocabulary becomes its
//     UTF-8 bytes (<0x..> pieces), never <unk>.
// Ids: unk 0, bos 1, eos 2, no pad — the llama2.c/Llama convention, so models trained here share
// their control ids with the llama2.c tokenizers.
//
// Determinism: SentencePiece's BPE trainer gives different merges for different thread counts, so
// num_threads is a fixed option (not the machine's core count), and the global random seed is set
// before training. Same corpus + options => byte-identical model file on every machine.
//
// The trainer reads sentences, one line each: documents are cut at newlines, blank lines dropped,
// lines longer than max_sentence_length bytes cut at a space (the trainer would drop them).
// Training is not reentrant: SentencePiece's seed and log level are process-wide.
//
// encode() takes a whole document, as Llama's tokenizer does: only its first word gets the dummy
// prefix '▁', a newline is the byte piece <0x0A>, and a word after a newline is cut as a
// word-internal piece (on Brown this costs ~1.5% more tokens than encoding line by line, but line
// by line could not decode back to the same text).
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "mopt/data/corpus.hpp"
#include "mopt/error.hpp"

namespace mopt::data {

struct SentencePieceOptions {
    std::int64_t vocab_size = 4096;  // including the 3 control pieces and the 256 byte pieces
    std::string model_type = "bpe";  // or "unigram"
    std::uint32_t seed = 42;
    int num_threads = 4;             // part of the result (see above): keep it fixed across machines
    std::int64_t max_sentence_length = 16384;  // bytes per training line
    bool quiet = true;               // silence the trainer's progress log
};

class SentencePieceTokenizer {
public:
    static constexpr std::int32_t unk = 0, bos = 1, eos = 2;

    // Trains on `texts` (documents; see the header for how they become training lines), writes the
    // model to `model_file` atomically (temporary file beside it, then rename) and loads it.
    static SentencePieceTokenizer train(std::span<const std::string> texts, const std::filesystem::path& model_file,
                                        const SentencePieceOptions& opt = {}) {
        const auto where = [&] { return mopt::detail::concat("SentencePiece training for ", model_file, ": "); };
        check(opt.vocab_size >= 3 + 256 + 1, where(), "vocab_size = ", opt.vocab_size,
              " is too small: it must hold 3 control pieces, 256 byte pieces and the corpus's characters");
        check(opt.vocab_size <= (std::int64_t{1} << 31) - 1, where(), "vocab_size = ", opt.vocab_size, " too large");
        check(opt.model_type == "bpe" || opt.model_type == "unigram", where(), "model_type '", opt.model_type,
              "' is not bpe or unigram");
        check(opt.num_threads >= 1, where(), "num_threads = ", opt.num_threads, " must be positive");
        check(opt.max_sentence_length >= 16, where(), "max_sentence_length = ", opt.max_sentence_length,
              " must be at least 16 bytes");
        // SentencePiece reserves seed 2^32 - 1 for "seed from std::random_device".
        check(opt.seed != 0xFFFFFFFFu, where(), "seed 4294967295 is reserved by SentencePiece (means: random)");

        Lines lines(texts, static_cast<std::size_t>(opt.max_sentence_length));
        check(!lines.done(), where(), "no text to train on (", texts.size(), " documents, all blank)");

        const std::string args = mopt::detail::concat(
            "--model_type=", opt.model_type, " --vocab_size=", opt.vocab_size,
            " --character_coverage=1.0 --byte_fallback=true",
            " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1",
            " --normalization_rule_name=identity --remove_extra_whitespaces=false",
            " --input_sentence_size=0 --shuffle_input_sentence=false",
            " --max_sentence_length=", opt.max_sentence_length, " --num_threads=", opt.num_threads,
            opt.quiet ? " --minloglevel=2" : "");
        sentencepiece::SetRandomGeneratorSeed(opt.seed);
        std::string proto;
        const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &proto);
        check(status.ok(), where(), status.ToString());
        check(!proto.empty(), where(), "the trainer returned no model");
        write_atomically(model_file, proto);
        return load(model_file);
    }
    static SentencePieceTokenizer train(const Corpus& corpus, const std::filesystem::path& model_file,
                                        const SentencePieceOptions& opt = {}) {
        std::vector<std::string> texts;
        texts.reserve(corpus.docs.size());
        for (const Document& d : corpus.docs) texts.push_back(d.text);
        return train(texts, model_file, opt);
    }

    // Loads a `.model` file; a missing or corrupt file is an error naming it.
    static SentencePieceTokenizer load(const std::filesystem::path& model_file) {
        const auto where = [&] { return mopt::detail::concat("SentencePiece model ", model_file, ": "); };
        std::error_code ec;
        check(std::filesystem::is_regular_file(model_file, ec), where(), "no such file (or not a regular file)");
        std::ifstream in(model_file, std::ios::binary);
        check(in.good(), where(), "cannot open it for reading");
        const std::string bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
        check(!in.bad(), where(), "read failed");
        check(!bytes.empty(), where(), "the file is empty");
        auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
        const auto status = sp->LoadFromSerializedProto(bytes);
        check(status.ok(), where(), "not a valid SentencePiece model (", status.ToString(), ")");
        SentencePieceTokenizer t;
        t.sp_ = std::move(sp);
        const int n = t.sp_->GetPieceSize();
        check(n > 3, where(), "the vocabulary has only ", n, " pieces");
        // Batches and models rely on these ids; a model trained elsewhere with other ids is refused.
        check(t.sp_->unk_id() == unk && t.sp_->bos_id() == bos && t.sp_->eos_id() == eos, where(),
              "control ids unk/bos/eos are ", t.sp_->unk_id(), "/", t.sp_->bos_id(), "/", t.sp_->eos_id(),
              ", expected 0/1/2 (train with --unk_id=0 --bos_id=1 --eos_id=2)");
        t.file_ = model_file;
        return t;
    }

    [[nodiscard]] std::int64_t vocab_size() const { return sp_->GetPieceSize(); }
    [[nodiscard]] std::int32_t bos_id() const { return bos; }
    [[nodiscard]] std::int32_t eos_id() const { return eos; }
    [[nodiscard]] const std::filesystem::path& file() const { return file_; }
    [[nodiscard]] std::string vocab_piece(std::int32_t id) const { return sp_->IdToPiece(checked(id)); }

    // text (UTF-8) -> ids, optionally after BOS.
    [[nodiscard]] std::vector<std::int32_t> encode(std::string_view text, bool add_bos = true) const {
        std::vector<int> ids;
        const auto status = sp_->Encode(text, &ids);
        check(status.ok(), "SentencePiece model ", file_, ": cannot encode a text of ", text.size(),
              " bytes: ", status.ToString());
        std::vector<std::int32_t> out;
        out.reserve(ids.size() + (add_bos ? 1 : 0));
        if (add_bos) out.push_back(bos);
        out.insert(out.end(), ids.begin(), ids.end());
        return out;
    }

    // ids -> text; control ids (unk excepted) produce no text.
    [[nodiscard]] std::string decode(std::span<const std::int32_t> ids) const {
        std::vector<int> v(ids.size());
        for (std::size_t i = 0; i < ids.size(); ++i) v[i] = checked(ids[i]);
        std::string text;
        const auto status = sp_->Decode(v, &text);
        check(status.ok(), "SentencePiece model ", file_, ": cannot decode: ", status.ToString());
        return text;
    }

private:
    SentencePieceTokenizer() = default;  // only train() and load() make one: never without a model

    // The documents' lines, one at a time, as the trainer pulls them.
    class Lines : public sentencepiece::SentenceIterator {
    public:
        Lines(std::span<const std::string> texts, std::size_t max_len) : texts_(texts), max_len_(max_len) { advance(); }
        bool done() const override { return doc_ >= texts_.size(); }
        void Next() override { advance(); }
        const std::string& value() const override { return line_; }
        sentencepiece::util::Status status() const override { return {}; }

    private:
        // Moves to the next non-blank piece of text: up to a newline or max_len bytes, cut at the
        // last space before the limit (or a UTF-8 character boundary when there is none).
        void advance() {
            while (doc_ < texts_.size()) {
                const std::string& t = texts_[doc_];
                if (pos_ >= t.size()) {
                    ++doc_;
                    pos_ = 0;
                    continue;
                }
                std::size_t end = t.find('\n', pos_);
                if (end == std::string::npos) end = t.size();
                std::size_t next = end + 1;
                if (end - pos_ > max_len_) {
                    end = t.rfind(' ', pos_ + max_len_);
                    if (end == std::string::npos || end <= pos_) {
                        end = pos_ + max_len_;
                        while (end > pos_ && (static_cast<unsigned char>(t[end]) & 0xC0) == 0x80) --end;
                    }
                    next = end;
                }
                line_.assign(t, pos_, end - pos_);
                pos_ = next;
                if (!detail::blank(line_)) return;
            }
        }
        std::span<const std::string> texts_;
        std::size_t max_len_, doc_ = 0, pos_ = 0;
        std::string line_;
    };

    int checked(std::int32_t id) const {
        check(id >= 0 && id < sp_->GetPieceSize(), "SentencePiece model ", file_, ": token id ", id,
              " is outside the vocabulary of ", sp_->GetPieceSize());
        return id;
    }

    static void write_atomically(const std::filesystem::path& file, const std::string& bytes) {
        std::random_device rd;
        const auto dir = file.parent_path().empty() ? std::filesystem::path(".") : file.parent_path();
        std::error_code ec;
        std::filesystem::create_directories(dir, ec);
        check(!ec, "SentencePiece model ", file, ": cannot create its folder: ", ec.message());
        const auto tmp = dir / mopt::detail::concat(".", file.filename().string(), ".tmp-", rd(), "-", rd());
        {
            std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
            check(out.good(), "SentencePiece model ", file, ": cannot create ", tmp);
            out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
            out.close();
            if (out.fail()) {
                std::filesystem::remove(tmp, ec);
                throw Error(mopt::detail::concat("SentencePiece model ", file, ": writing ", tmp, " failed (disk full?)"));
            }
        }
        std::filesystem::rename(tmp, file, ec);
        if (ec) {
            std::error_code ignore;
            std::filesystem::remove(tmp, ignore);
            throw Error(mopt::detail::concat("SentencePiece model ", file, ": cannot move ", tmp, " into place: ",
                                             ec.message()));
        }
    }

    // Shared and const: a loaded model never changes, so copies of a tokenizer share it.
    std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
    std::filesystem::path file_;
};

}  // namespace mopt::data
