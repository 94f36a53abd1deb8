#pragma once
// Corpus: documents of text, each tagged with a domain (a genre, a source, a category), and the
// readers that make one from a text file, a folder of text files or a JSONL file; and the
// document-level train/validation/test split.
//
// Everything here is deterministic: folders are read in sorted path order, domains are numbered in
// order of first appearance, and the split draws from its own seeded generator (SplitMix64 with a
// Fisher-Yates shuffle), not from std::shuffle or <random>'s distributions, whose outputs differ
// between standard libraries. The same files and seed give the same split on every machine.
//
// Text must be valid UTF-8 (the tokenizers assume it); a reader names the file and the byte where
// it is not. A UTF-8 byte-order mark at the start of a file is dropped.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/error.hpp"

namespace mopt::data {

struct Document {
    std::string text;
    std::string domain;  // one of Corpus::domains
    std::string id;      // where it came from: a relative path, "file:line", a Brown file name
};

struct Corpus {
    std::vector<Document> docs;
    std::vector<std::string> domains;  // distinct domains; a document's domain index is its place here

    // The index of `domain` in `domains`; an unknown domain is an error naming it.
    [[nodiscard]] std::int32_t domain_index(std::string_view domain) const {
        const auto it = std::find(domains.begin(), domains.end(), domain);
        check(it != domains.end(), "Corpus: unknown domain '", domain, "' (", domains.size(), " domains)");
        return static_cast<std::int32_t>(it - domains.begin());
    }
    // Number of documents per domain, in the order of `domains`.
    [[nodiscard]] std::vector<std::int64_t> docs_per_domain() const {
        std::vector<std::int64_t> n(domains.size(), 0);
        for (const Document& d : docs) ++n[static_cast<std::size_t>(domain_index(d.domain))];
        return n;
    }
    [[nodiscard]] std::int64_t bytes() const {
        std::int64_t n = 0;
        for (const Document& d : docs) n += static_cast<std::int64_t>(d.text.size());
        return n;
    }
};

namespace detail {

// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator whose output is fixed by the standard's
// integer arithmetic alone, so shuffles are the same with every compiler and library.
class SplitMix64 {
public:
    explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
    std::uint64_t next() {
        std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    // Uniform in [0, n), n > 0, without modulo bias (rejection of the short last stripe).
    std::uint64_t below(std::uint64_t n) {
        const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
        std::uint64_t x = 0;
        do x = next();
        while (x >= limit);
        return x % n;
    }

private:
    std::uint64_t state_;
};

// Fisher-Yates with SplitMix64: the same permutation for the same seed everywhere.
template <class T>
void shuffle(std::vector<T>& v, std::uint64_t seed) {
    SplitMix64 rng(seed);
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<std::size_t>(rng.below(i))]);
}

// Mixes two values into one seed (so per-domain and per-epoch streams do not overlap).
[[nodiscard]] inline std::uint64_t mix_seed(std::uint64_t a, std::uint64_t b) {
    SplitMix64 rng(a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull));
    rng.next();
    return rng.next();
}

// Throws unless `text` is valid UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
inline void check_utf8(std::string_view text, std::string_view where) {
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    const std::size_t n = text.size();
    for (std::size_t i = 0; i < n;) {
        const unsigned c = s[i];
        std::size_t len = 0;
        std::uint32_t cp = 0, min = 0;
        if (c < 0x80) {
            ++i;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        }
        bool ok = len > 0 && i + len <= n;
        for (std::size_t k = 1; ok && k < len; ++k) {
            ok = (s[i + k] & 0xC0) == 0x80;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        ok = ok && cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
        if (!ok) {
            static constexpr char hex[] = "0123456789ABCDEF";
            const char byte[] = {'0', 'x', hex[c >> 4], hex[c & 15], '\0'};
            throw Error(mopt::detail::concat(where, ": not valid UTF-8 at byte ", i, " (", byte,
                                             "); convert the text to UTF-8"));
        }
        i += len;
    }
}

// The whole file as a string (BOM dropped, UTF-8 checked); a missing or empty file is an error.
[[nodiscard]] inline std::string read_text(const std::filesystem::path& file, std::string_view what) {
    std::error_code ec;
    check(std::filesystem::is_regular_file(file, ec), what, " ", file, ": no such file (or not a regular file)");
    std::ifstream in(file, std::ios::binary);
    check(in.good(), what, " ", file, ": cannot open it for reading");
    std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    check(!in.bad(), what, " ", file, ": read failed");
    if (text.starts_with("\xEF\xBB\xBF")) text.erase(0, 3);
    check_utf8(text, mopt::detail::concat(what, " ", file));
    return text;
}

[[nodiscard]] inline bool blank(std::string_view s) {
    return s.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

}  // namespace detail

// Sets `corpus.domains` to the documents' distinct domains in order of first appearance.
inline void index_domains(Corpus& corpus) {
    corpus.domains.clear();
    for (const Document& d : corpus.docs)
        if (std::find(corpus.domains.begin(), corpus.domains.end(), d.domain) == corpus.domains.end())
            corpus.domains.push_back(d.domain);
}

// One text file as one document; its domain is the file's stem ("news.txt" -> "news").
inline Corpus read_text_file(const std::filesystem::path& file) {
    Corpus c;
    std::string text = detail::read_text(file, "text file");
    check(!detail::blank(text), "text file ", file, ": empty (no text to train or evaluate on)");
    c.docs.push_back({std::move(text), file.stem().string(), file.filename().string()});
    index_domains(c);
    return c;
}

// Every .txt file under `folder` (recursively), one document each, in sorted path order. A file in a
// sub-folder takes the sub-folder's name (its first path component under `folder`) as its domain —
// so corpus/news/*.txt and corpus/fiction/*.txt make two domains — and a file directly in `folder`
// takes its stem, as read_text_file does. The id is the path relative to `folder`.
inline Corpus read_text_folder(const std::filesystem::path& folder) {
    namespace fs = std::filesystem;
    std::error_code ec;
    check(fs::is_directory(folder, ec), "text folder ", folder, ": no such folder");
    std::vector<fs::path> files;
    for (auto it = fs::recursive_directory_iterator(folder, fs::directory_options::follow_directory_symlink, ec);
         !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (it->is_regular_file() && it->path().extension() == ".txt") files.push_back(it->path());
    }
    check(!ec, "text folder ", folder, ": cannot list it: ", ec.message());
    check(!files.empty(), "text folder ", folder, ": no .txt files in it (or its sub-folders)");
    std::sort(files.begin(), files.end());
    Corpus c;
    for (const fs::path& file : files) {
        std::string text = detail::read_text(file, "text file");
        check(!detail::blank(text), "text file ", file, ": empty (remove it or give it text)");
        const fs::path rel = file.lexically_relative(folder);
        const std::string domain = std::next(rel.begin()) == rel.end() ? rel.stem().string() : rel.begin()->string();
        c.docs.push_back({std::move(text), domain, rel.generic_string()});
    }
    index_domains(c);
    return c;
}

// JSON Lines: one object per line, {"text": "...", "category": "..."}; "category" is optional
// (domain "default"). Blank lines are skipped. Every problem names the file and the 1-based line.
inline Corpus read_jsonl(const std::filesystem::path& file) {
    const std::string content = detail::read_text(file, "JSONL file");
    Corpus c;
    std::size_t line_no = 0;
    for (std::size_t pos = 0; pos < content.size();) {
        std::size_t end = content.find('\n', pos);
        if (end == std::string::npos) end = content.size();
        const std::string_view line(content.data() + pos, end - pos);
        pos = end + 1;
        ++line_no;
        if (detail::blank(line)) continue;
        const auto where = [&] { return mopt::detail::concat("JSONL file ", file, " line ", line_no, ": "); };
        nlohmann::json rec;
        try {
            rec = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
            throw Error(mopt::detail::concat(where(), "not valid JSON: ", e.what()));
        }
        check(rec.is_object(), where(), "expected an object {\"text\": ..., \"category\": ...}, got ", rec.type_name());
        const auto text = rec.find("text");
        check(text != rec.end(), where(), "no \"text\" field");
        check(text->is_string(), where(), "\"text\" must be a string, got ", text->type_name());
        std::string domain = "default";
        if (const auto cat = rec.find("category"); cat != rec.end()) {
            check(cat->is_string(), where(), "\"category\" must be a string, got ", cat->type_name());
            domain = cat->get<std::string>();
            check(!domain.empty(), where(), "\"category\" is empty");
        }
        std::string body = text->get<std::string>();
        check(!detail::blank(body), where(), "\"text\" is empty");
        c.docs.push_back({std::move(body), std::move(domain), mopt::detail::concat(file.filename().string(), ":", line_no)});
    }
    check(!c.docs.empty(), "JSONL file ", file, ": no records (the file is blank)");
    index_domains(c);
    return c;
}

// Picks the reader by what `path` is: a folder (its .txt files), a .jsonl file, or any other file
// as plain text.
inline Corpus read_corpus(const std::filesystem::path& path) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) return read_text_folder(path);
    if (path.extension() == ".jsonl") return read_jsonl(path);
    return read_text_file(path);
}

// Fractions of each domain's documents that go to each split (they must sum to 1).
struct SplitFractions {
    double train = 0.8, validation = 0.1, test = 0.1;
};

// Three corpora with the parent's `domains` list, so a domain index means the same in all three
// (a split may hold no document of a small domain).
struct CorpusSplits {
    Corpus train, validation, test;
};

// Document-level split: a document goes whole to one split. Each domain is split on its own (its
// documents shuffled with a seed drawn from `seed` and the domain's index; round(n * fraction) go
// to validation and test, the rest to train), so every domain with at least 10 documents appears
// in every split and the domain mix is the same in all three. Documents keep the corpus order
// within a split.
inline CorpusSplits split_corpus(const Corpus& corpus, std::uint64_t seed, SplitFractions f = {}) {
    check(!corpus.docs.empty(), "split_corpus: the corpus has no documents");
    check(f.train >= 0 && f.validation >= 0 && f.test >= 0 && std::abs(f.train + f.validation + f.test - 1.0) < 1e-9,
          "split_corpus: fractions train ", f.train, ", validation ", f.validation, ", test ", f.test,
          " must be non-negative and sum to 1");
    std::vector<std::vector<std::size_t>> by_domain(corpus.domains.size());
    for (std::size_t i = 0; i < corpus.docs.size(); ++i)
        by_domain[static_cast<std::size_t>(corpus.domain_index(corpus.docs[i].domain))].push_back(i);
    std::vector<int> where(corpus.docs.size(), 0);  // 0 train, 1 validation, 2 test
    for (std::size_t d = 0; d < by_domain.size(); ++d) {
        std::vector<std::size_t>& idx = by_domain[d];
        detail::shuffle(idx, detail::mix_seed(seed, d));
        const auto n = static_cast<double>(idx.size());
        const auto n_val = static_cast<std::size_t>(std::llround(n * f.validation));
        const auto n_test = std::min(static_cast<std::size_t>(std::llround(n * f.test)), idx.size() - n_val);
        for (std::size_t k = 0; k < n_val; ++k) where[idx[k]] = 1;
        for (std::size_t k = n_val; k < n_val + n_test; ++k) where[idx[k]] = 2;
    }
    CorpusSplits s;
    for (Corpus* c : {&s.train, &s.validation, &s.test}) c->domains = corpus.domains;
    for (std::size_t i = 0; i < corpus.docs.size(); ++i) {
        Corpus& dst = where[i] == 0 ? s.train : where[i] == 1 ? s.validation : s.test;
        dst.docs.push_back(corpus.docs[i]);
    }
    return s;
}

}  // namespace mopt::data
