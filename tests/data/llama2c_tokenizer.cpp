#include <catch2/catch.hpp>
#include <mopt/mopt.hpp>

#include <cstring>
#include <limits>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace mopt;
namespace fs = std::filesystem;
using data::Llama2cTokenizer;

namespace {

const fs::path tok512 = test::tok512();

#define MOPT_REQUIRE_TOK512() \
    if (!test::have_files({tok512})) return

std::vector<char> read_bytes(const fs::path& file) {
    std::ifstream in(file, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const fs::path& file, const std::vector<char>& bytes) {
    std::ofstream out(file, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

using mopt::test::TempDir;

// A deliberately simple reference, written from the README alone: its own parser, linear search for
// pieces, and a full rescan of the sequence for every merge.
struct NaiveBpe {
    std::vector<std::string> pieces;
    std::vector<float> scores;
    std::vector<std::size_t> offsets;  // where each token's score starts in the file

    explicit NaiveBpe(const std::vector<char>& file, int vocab) {
        std::size_t pos = 4;
        for (int i = 0; i < vocab; ++i) {
            offsets.push_back(pos);
            float s = 0;
            std::int32_t len = 0;
            std::memcpy(&s, &file[pos], 4);
            std::memcpy(&len, &file[pos + 4], 4);
            pos += 8;
            pieces.emplace_back(&file[pos], static_cast<std::size_t>(len));
            scores.push_back(s);
            pos += static_cast<std::size_t>(len);
        }
    }
    int lookup(const std::string& s) const {
        for (std::size_t i = 0; i < pieces.size(); ++i)
            if (pieces[i] == s) return static_cast<int>(i);
        return -1;
    }
    std::vector<std::int32_t> encode(const std::string& text) const {
        std::vector<std::int32_t> ids;
        if (text.empty()) return ids;
        const std::string s = " " + text;
        std::size_t i = 0;
        while (i < s.size()) {
            std::size_t n = 1;
            while (i + n < s.size() && n < 4 && (static_cast<unsigned char>(s[i + n]) >> 6) == 2) ++n;
            const int id = lookup(s.substr(i, n));
            if (id >= 0) {
                ids.push_back(id);
            } else {
                for (std::size_t k = 0; k < n; ++k) ids.push_back(static_cast<unsigned char>(s[i + k]) + 3);
            }
            i += n;
        }
        while (true) {
            int best = -1;
            float best_score = 0;
            std::size_t at = 0;
            for (std::size_t k = 0; k + 1 < ids.size(); ++k) {
                const int id = lookup(pieces[ids[k]] + pieces[ids[k + 1]]);
                if (id >= 0 && (best < 0 || scores[id] > best_score)) {
                    best = id;
                    best_score = scores[id];
                    at = k;
                }
            }
            if (best < 0) break;
            ids[at] = best;
            ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(at) + 1);
        }
        return ids;
    }
};

std::vector<std::string> sample_texts() {
    std::vector<std::string> texts = {
        "Once upon a time",
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
        "Tom said, \"Let's go to the park!\" and they ran.",
        "He had 3 apples and 12 bananas: 15 fruits in all (1, 2, 3...).",
        "What?! Yes; no - maybe... [ok] {fine} <tag> @home #1 $5 100% a&b * + = / \\ | ~ ` ^ _",
        "café",
        "naïve façade, smörgåsbord, señor",
        "日本語 and emoji 🙂 mixed in",
        "  double  spaces   and trailing ",
        "\ttabs\nand\nnewlines\r\n",
        "a",
        " ",
        "x y z",
        "The end.",
        "mississippi banana bandana",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    };
    // Seeded random strings over letters, spaces, punctuation, and multi-byte characters.
    const std::vector<std::string> alphabet = {"a", "e", "t", "h", "o", " ", " ", ",", ".", "!", "1", "7",
                                               "é", "ñ", "€", "𝄞", "Q", "z", "'", "\n"};
    std::mt19937 rng(42);
    for (int t = 0; t < 6; ++t) {
        std::string s;
        const int len = 5 + static_cast<int>(rng() % 60);
        for (int i = 0; i < len; ++i) s += alphabet[rng() % alphabet.size()];
        texts.push_back(s);
    }
    return texts;
}

}  // namespace

TEST_CASE("llama2c tokenizer: tok512 loads and decode(encode(s)) == s", "[data][llama2c][tokenizer]") {
    MOPT_REQUIRE_TOK512();
    const auto tok = Llama2cTokenizer::load(tok512, 512);
    REQUIRE(tok.vocab_size() == 512);
    for (const std::string& text : sample_texts()) {
        INFO("text: '" << text << "'");
        const auto ids = tok.encode(text);
        REQUIRE(!ids.empty());
        REQUIRE(ids.front() == Llama2cTokenizer::bos);
        REQUIRE(tok.decode(ids) == text);
        const auto plain = tok.encode(text, false, false);
        REQUIRE(tok.decode(plain) == text);
        const auto framed = tok.encode(text, true, true);
        REQUIRE(framed.back() == Llama2cTokenizer::eos);
        REQUIRE(tok.decode(framed) == text);
        for (const auto id : framed) REQUIRE((id >= 0 && id < 512));
    }
    REQUIRE(tok.encode("") == std::vector<std::int32_t>{Llama2cTokenizer::bos});
    REQUIRE(tok.encode("", false, false).empty());
    REQUIRE(tok.decode(std::vector<std::int32_t>{}).empty());
}

TEST_CASE("llama2c tokenizer: merges, byte fallback and pieces", "[data][llama2c][tokenizer]") {
    MOPT_REQUIRE_TOK512();
    const auto tok = Llama2cTokenizer::load(tok512, 512);
    const std::string text = "Once upon a time";
    const auto ids = tok.encode(text);
    REQUIRE(ids.front() == Llama2cTokenizer::bos);
    REQUIRE(ids.size() - 1 < text.size());  // merges happened
    std::string joined;
    for (std::size_t i = 1; i < ids.size(); ++i) {
        // Each id stands for its vocabulary piece; printed after BOS the dummy space goes.
        joined += tok.vocab_piece(ids[i]);
        const std::string expect = i == 1 ? tok.vocab_piece(ids[i]).substr(1) : tok.vocab_piece(ids[i]);
        REQUIRE(tok.piece(ids[i - 1], ids[i]) == expect);
    }
    REQUIRE(joined == " " + text);
    REQUIRE(tok.vocab_piece(ids[1]).front() == ' ');

    // "é" is in the vocabulary; "日" is not and falls back to its three UTF-8 bytes at id byte+3.
    const auto e = tok.encode("é", false);
    REQUIRE(e.size() <= 2);
    REQUIRE(tok.decode(e) == "é");
    const auto ri = tok.encode("日", false);
    REQUIRE(ri.size() == 4);
    REQUIRE(ri[0] == tok.find(" "));
    REQUIRE(ri[1] == 0xE6 + 3);
    REQUIRE(ri[2] == 0x97 + 3);
    REQUIRE(ri[3] == 0xA5 + 3);
    REQUIRE(tok.piece(ri[0], ri[1]) == "\xE6");
    REQUIRE(tok.vocab_piece(ri[1]) == "<0xE6>");

    // Control tokens print nothing; bad ids are errors, not crashes.
    REQUIRE(tok.piece(5, Llama2cTokenizer::bos).empty());
    REQUIRE(tok.piece(5, Llama2cTokenizer::eos).empty());
    REQUIRE_THROWS_WITH(tok.piece(1, 512), Catch::Contains("512"));
    REQUIRE_THROWS_WITH(tok.decode(std::vector<std::int32_t>{7, -1}), Catch::Contains("-1"));
}

TEST_CASE("llama2c tokenizer: encode matches a naive O(n^2) reference", "[data][llama2c][tokenizer]") {
    MOPT_REQUIRE_TOK512();
    const auto tok = Llama2cTokenizer::load(tok512, 512);
    const NaiveBpe naive(read_bytes(tok512), 512);
    int compared = 0;
    for (const std::string& text : sample_texts()) {
        INFO("text: '" << text << "'");
        REQUIRE(tok.encode(text, false, false) == naive.encode(text));
        ++compared;
    }
    REQUIRE(compared >= 20);
    // A longer text, where the heap's stale entries and ties matter most.
    std::string story;
    for (int i = 0; i < 20; ++i) story += "Lily and Ben saw a big, big dog. The dog said \"woof woof\"! ";
    REQUIRE(tok.encode(story, false) == naive.encode(story));
}

TEST_CASE("llama2c tokenizer: bad files give errors naming the file", "[data][llama2c][tokenizer]") {
    MOPT_REQUIRE_TOK512();
    TempDir dir;
    const auto bytes = read_bytes(tok512);
    const NaiveBpe layout(bytes, 512);  // token offsets
    int n = 0;
    const auto expect_error = [&](const std::vector<char>& b, std::int64_t vocab, const std::string& what) {
        const std::string name = "tok-" + std::to_string(n++) + ".bin";
        write_bytes(dir.path / name, b);
        INFO("case " << name << ": expecting '" << what << "'");
        REQUIRE_THROWS_WITH(Llama2cTokenizer::load(dir.path / name, vocab),
                            Catch::Contains(name) && Catch::Contains(what));
    };
    const auto truncated = [&](std::size_t size) { return std::vector<char>(bytes.begin(), bytes.begin() + size); };
    const auto put_i32 = [](std::vector<char>& b, std::size_t at, std::int32_t v) { std::memcpy(&b[at], &v, 4); };

    REQUIRE_THROWS_WITH(Llama2cTokenizer::load(dir.path / "absent.bin", 512),
                        Catch::Contains("absent.bin") && Catch::Contains("no such file"));
    expect_error({}, 512, "header");
    expect_error(truncated(2), 512, "header");
    expect_error(truncated(bytes.size() - 1), 512, "truncated at token 511");
    expect_error(truncated(layout.offsets[300] + 3), 512, "truncated at token 300");
    expect_error(truncated(layout.offsets[300] + 8), 512, "truncated at token 300");
    expect_error(bytes, 1'000'000'000, "truncated at token 512 of 1000000000");
    expect_error(bytes, 0, "vocab_size = 0");
    expect_error(bytes, 600, "truncated at token");
    expect_error(bytes, 100, "trailing bytes");
    {
        auto b = bytes;
        put_i32(b, layout.offsets[7] + 4, -5);
        expect_error(b, 512, "token 7 has a negative length -5");
    }
    {
        auto b = bytes;
        put_i32(b, 0, 1'000'000);                            // max_token_length
        put_i32(b, layout.offsets[511] + 4, 500'000);        // past the end of the file
        expect_error(b, 512, "truncated at token 511");
    }
    {
        auto b = bytes;
        put_i32(b, layout.offsets[42] + 4, 100);  // longer than max_token_length (7)
        expect_error(b, 512, "token 42 has length 100");
    }
    {
        auto b = bytes;
        put_i32(b, 0, 0);
        expect_error(b, 512, "max_token_length");
    }
    {
        auto b = bytes;
        const float nan = std::numeric_limits<float>::quiet_NaN();
        std::memcpy(&b[layout.offsets[9]], &nan, 4);
        expect_error(b, 512, "token 9 has a non-finite score");
    }
    REQUIRE_NOTHROW(Llama2cTokenizer::load(tok512, 512));
}
