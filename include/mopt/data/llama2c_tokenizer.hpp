#pragma once
// Llama2cTokenizer: the byte-pair tokenizer of llama2.c's tokenizer.bin files (sentencepiece BPE
// vocabularies exported with their merge scores). File: int32 max_token_length, then per token a
// float32 score, an int32 byte length and the piece's bytes.
//
// Encoding follows llama2.c: a dummy-prefix space before non-empty text; each UTF-8 character
// becomes its token, or its bytes' <0xXX> tokens when the vocabulary lacks it; then the adjacent
// pair whose concatenation is a token with the highest score is merged (leftmost on ties) until no
// pair merges. llama2.c rescans the whole sequence per merge (O(n^2)); here a heap of candidate
// pairs over a linked list gives the same merges in O(n log n), so whole corpora encode quickly.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mopt/error.hpp"

namespace mopt::data {

class Llama2cTokenizer {
public:
    static constexpr std::int32_t unk = 0, bos = 1, eos = 2;

    // `vocab_size` comes from the model's config: the file holds exactly that many tokens
    // (llama2.c's export writes nothing after them, so extra bytes mean a mismatched pair).
    static Llama2cTokenizer load(const std::filesystem::path& file, std::int64_t vocab_size) {
        const auto where = [&] { return mopt::detail::concat("llama2.c tokenizer ", file, ": "); };
        std::error_code ec;
        check(std::filesystem::is_regular_file(file, ec), where(), "no such file (or not a regular file)");
        const auto file_bytes = static_cast<std::int64_t>(std::filesystem::file_size(file, ec));
        check(!ec, where(), "cannot read its size: ", ec.message());
        check(vocab_size > 0, where(), "vocab_size = ", vocab_size, " must be positive");
        check(file_bytes >= 4, where(), "the header (max_token_length) needs 4 bytes, the file has ", file_bytes);
        std::ifstream in(file, std::ios::binary);
        check(in.good(), where(), "cannot open it for reading");

        // Streamed, with every length checked against the bytes left before it is used: a wrong
        // file (say, a model checkpoint) costs neither a large read nor a large allocation.
        std::int64_t pos = 0;
        const auto remaining = [&] { return file_bytes - pos; };
        const auto read = [&](void* dst, std::int64_t n) {
            in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
            check(in.gcount() == n, where(), "read ", in.gcount(), " of ", n, " bytes at offset ", pos,
                  ": did the file change?");
            pos += n;
        };
        Llama2cTokenizer t;
        std::int32_t max_token_length = 0;
        read(&max_token_length, 4);  // the format is little-endian, as every host we build for
        check(max_token_length > 0, where(), "max_token_length = ", max_token_length, " must be positive");
        // Every entry takes at least 8 bytes, so the file bounds what is worth reserving.
        const auto reserve = static_cast<std::size_t>(std::min(vocab_size, file_bytes / 8));
        t.pieces_.reserve(reserve);
        t.scores_.reserve(reserve);
        for (std::int64_t i = 0; i < vocab_size; ++i) {
            check(remaining() >= 8, where(), "truncated at token ", i, " of ", vocab_size,
                  ": its score and length need 8 bytes, ", remaining(), " remain");
            float score = 0;
            std::int32_t len = 0;
            read(&score, 4);
            read(&len, 4);
            check(std::isfinite(score), where(), "token ", i, " has a non-finite score ", score);
            check(len >= 0, where(), "token ", i, " has a negative length ", len);
            check(len <= max_token_length, where(), "token ", i, " has length ", len, " above max_token_length ",
                  max_token_length);
            check(len <= remaining(), where(), "truncated at token ", i, " of ", vocab_size, ": its piece needs ", len,
                  " bytes, ", remaining(), " remain");
            std::string piece(static_cast<std::size_t>(len), '\0');
            read(piece.data(), len);
            t.pieces_.push_back(std::move(piece));
            t.scores_.push_back(score);
        }
        check(remaining() == 0, where(), remaining(), " trailing bytes after token ", vocab_size - 1,
              ": does the model's vocab_size = ", vocab_size, " match this tokenizer?");

        t.ids_.reserve(t.pieces_.size());
        for (std::size_t i = 0; i < t.pieces_.size(); ++i)
            t.ids_.emplace(t.pieces_[i], static_cast<std::int32_t>(i));  // duplicates: the lowest id wins
        t.byte_value_.assign(t.pieces_.size(), -1);
        for (std::size_t i = 0; i < t.pieces_.size(); ++i) t.byte_value_[i] = parse_byte_piece(t.pieces_[i]);
        for (int b = 0; b < 256; ++b) {
            static constexpr char hex[] = "0123456789ABCDEF";
            const char piece[] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
            const auto it = t.ids_.find(std::string_view(piece, 6));
            t.byte_id_[b] = it == t.ids_.end() ? unk : it->second;  // no byte fallback in this vocabulary
        }
        return t;
    }

    [[nodiscard]] std::int64_t vocab_size() const { return static_cast<std::int64_t>(pieces_.size()); }
    [[nodiscard]] const std::string& vocab_piece(std::int32_t id) const { return pieces_.at(checked(id)); }
    [[nodiscard]] float score(std::int32_t id) const { return scores_[checked(id)]; }
    // The id of a piece, or -1.
    [[nodiscard]] std::int32_t find(std::string_view piece) const {
        const auto it = ids_.find(piece);
        return it == ids_.end() ? -1 : it->second;
    }

    // text (UTF-8) -> ids, optionally framed by BOS/EOS.
    [[nodiscard]] std::vector<std::int32_t> encode(std::string_view text, bool add_bos = true,
                                                   bool add_eos = false) const {
        std::vector<std::int32_t> out;
        if (add_bos) out.push_back(bos);
        if (!text.empty()) {
            // Symbols of a doubly linked list; `id` is the current token, merges kill the right one.
            std::vector<Symbol> sym;
            sym.reserve(text.size() + 1);
            const auto push = [&](std::int32_t id) { sym.push_back({id, static_cast<std::int32_t>(sym.size()) - 1, -1}); };
            const auto push_chars = [&](std::string_view s) {
                // A UTF-8 character: a start byte and up to three continuation bytes (10xxxxxx), grouped
                // the way llama2.c groups them, so malformed input splits the same way too.
                for (std::size_t i = 0; i < s.size();) {
                    std::size_t n = 1;
                    while (i + n < s.size() && n < 4 && (static_cast<unsigned char>(s[i + n]) & 0xC0) == 0x80) ++n;
                    const std::int32_t id = find(s.substr(i, n));
                    if (id >= 0) {
                        push(id);
                    } else {
                        for (std::size_t k = 0; k < n; ++k) push(byte_id_[static_cast<unsigned char>(s[i + k])]);
                    }
                    i += n;
                }
            };
            push_chars(" ");  // the dummy prefix
            push_chars(text);
            for (std::size_t i = 0; i + 1 < sym.size(); ++i) sym[i].next = static_cast<std::int32_t>(i + 1);

            std::priority_queue<Candidate> heap;
            std::string buf;
            const auto consider = [&](std::int32_t left) {
                if (left < 0 || sym[left].next < 0) return;
                const std::int32_t right = sym[left].next;
                buf.assign(pieces_[sym[left].id]).append(pieces_[sym[right].id]);
                const std::int32_t id = find(buf);
                if (id >= 0) heap.push({scores_[id], left, right, sym[left].id, sym[right].id, id});
            };
            for (std::int32_t i = 0; i + 1 < static_cast<std::int32_t>(sym.size()); ++i) consider(i);
            while (!heap.empty()) {
                const Candidate c = heap.top();
                heap.pop();
                Symbol& l = sym[c.left];
                // Stale unless both symbols still hold the tokens the candidate was made from, adjacent.
                if (l.id != c.left_id || l.next != c.right || sym[c.right].id != c.right_id) continue;
                Symbol& r = sym[c.right];
                l.id = c.merged;
                l.next = r.next;
                if (r.next >= 0) sym[r.next].prev = c.left;
                r.id = -1;  // dead
                consider(l.prev);
                consider(c.left);
            }
            for (std::int32_t i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
        }
        if (add_eos) out.push_back(eos);
        return out;
    }

    // ids -> text. BOS/EOS produce no text; the dummy-prefix space is stripped at the start of the
    // text and after each BOS, as sentencepiece does, so decode(encode(s)) == s.
    [[nodiscard]] std::string decode(std::span<const std::int32_t> ids) const {
        std::string out;
        std::int32_t prev = bos;
        for (const std::int32_t id : ids) {
            out += piece(prev, id);
            prev = id;
        }
        return out;
    }

    // One token's text as llama2.c's decode prints it: the leading space dropped after BOS, <0xXX>
    // byte tokens as the raw byte. BOS and EOS print nothing (llama2.c never prints them either).
    [[nodiscard]] std::string piece(std::int32_t prev, std::int32_t id) const {
        checked(id);
        if (id == bos || id == eos) return {};
        if (byte_value_[id] >= 0) return std::string(1, static_cast<char>(byte_value_[id]));
        std::string_view p = pieces_[id];
        if (prev == bos && !p.empty() && p.front() == ' ') p.remove_prefix(1);
        return std::string(p);
    }

private:
    struct Symbol {
        std::int32_t id, prev, next;
    };
    // A pair (left, right) of adjacent symbols that merges into `merged`; the best has the highest
    // score, then the leftmost position (llama2.c's strict '>' scan keeps the first maximum).
    struct Candidate {
        float score;
        std::int32_t left, right, left_id, right_id, merged;
        friend bool operator<(const Candidate& a, const Candidate& b) {
            return a.score < b.score || (a.score == b.score && a.left > b.left);
        }
    };
    // Lets the map be searched with a string_view without building a std::string.
    struct Hash {
        using is_transparent = void;
        std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
    };

    std::size_t checked(std::int32_t id) const {
        check(id >= 0 && id < static_cast<std::int64_t>(pieces_.size()), "Llama2cTokenizer: token id ", id,
              " is outside the vocabulary of ", pieces_.size());
        return static_cast<std::size_t>(id);
    }
    // "<0xXX>" (upper- or lower-case hex, as sscanf's %X accepts) -> the byte, else -1.
    static int parse_byte_piece(std::string_view p) {
        if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
        int v = 0;
        for (const char ch : p.substr(3, 2)) {
            int d = -1;
            if (ch >= '0' && ch <= '9') d = ch - '0';
            if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
            if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
            if (d < 0) return -1;
            v = v * 16 + d;
        }
        return v;
    }

    std::vector<std::string> pieces_;
    std::vector<float> scores_;
    std::unordered_map<std::string, std::int32_t, Hash, std::equal_to<>> ids_;
    std::vector<int> byte_value_;           // per id: the raw byte of a <0xXX> token, else -1
    std::int32_t byte_id_[256] = {};        // per byte: its <0xXX> token, or unk without byte fallback
};

}  // namespace mopt::data
