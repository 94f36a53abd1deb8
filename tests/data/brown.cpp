#include "test_util.hpp"

#include <catch2/catch.hpp>

#include <mopt/data/brown.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace mopt;
namespace fs = std::filesystem;
using data::BrownDomains;

namespace {

const fs::path brown_dir = fs::path(MOPT_SOURCE_DIR) / "data" / "brown";

#define MOPT_REQUIRE_BROWN()                                                                               \
    if (!fs::is_directory(brown_dir)) {                                                                    \
        WARN("skipped: " << brown_dir.string() << " missing (scripts/fetch_brown downloads it; scripts/setup runs it)"); \
        return;                                                                                            \
    }

// Files per genre, from the Brown Corpus Manual (Francis & Kučera 1979), Table 1.
const std::map<std::string, int> manual_genre_files = {
    {"A", 44}, {"B", 27}, {"C", 17}, {"D", 17}, {"E", 36}, {"F", 48}, {"G", 75}, {"H", 30},
    {"J", 80}, {"K", 29}, {"L", 24}, {"M", 6},  {"N", 29}, {"P", 29}, {"R", 9}};

std::string read_file(const fs::path& file) {
    std::ifstream in(file, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const data::Document& doc(const data::Corpus& c, const std::string& id) {
    const auto it = std::find_if(c.docs.begin(), c.docs.end(), [&](const data::Document& d) { return d.id == id; });
    REQUIRE(it != c.docs.end());
    return *it;
}

}  // namespace

TEST_CASE("brown: tags stripped and text rebuilt with English spacing (synthetic input)", "[data][brown][detok]") {
    using data::brown_text;
    // Punctuation attaches to the left, brackets and opening quotes to the right; `` '' become ".
    REQUIRE(brown_text("\tHe/pps said/vbd ,/, ``/`` Go/vb home/nr ''/'' ./.") == "He said, \"Go home\".");
    REQUIRE(brown_text("Why/wrb ?/. Because/cs (/( 2/cd )/) ;/. yes/rb !/. no/rb :/: x/nn") ==
            "Why? Because (2); yes! no: x");
    // Contractions split off as tokens join their word; doubled sentence marks print once.
    REQUIRE(brown_text("I/ppss do/do n't/* know/vb John/np 's/$ dog/nn ;/. ;/. we/ppss 're/ber here/rb ?/. ?/.") ==
            "I don't know John's dog; we're here?");
    // An abbreviation's period is the sentence's period too.
    REQUIRE(brown_text("Ivan/np Allen/np Jr./np ./.") == "Ivan Allen Jr.");
    // Inches: the word 1/8'' and its separate '' token make 1/8".
    REQUIRE(brown_text("bars/nns 1/8''/nn ''/'' brass/nn ./.") == "bars 1/8\" brass.");
    // Brown's single quote alternates: opening, then closing.
    REQUIRE(brown_text("a/at '/' pro/jj '/' and/cc '/' con/jj '/' ./.") == "a 'pro' and 'con'.");
    // The tag follows the last slash: "//in" is the word "/", "and/or/cc" the word "and/or".
    REQUIRE(brown_text("x/nn //in y/nn and/or/cc z/nn") == "x / y and/or z");
    // Blank lines separate paragraphs; lines of one paragraph are sentences joined by a space;
    // a headline (all tokens -hl) stands on its own line.
    const std::string tagged =
        "\n\n\tFirst/od sentence/nn ./.\nSecond/od one/cd ./.\n\n\n"
        "Big/jj-hl news/nn-hl \nThird/od sentence/nn ./.\n\n\n\tLast/ap ./.\n";
    REQUIRE(brown_text(tagged) == "First sentence. Second one.\nBig news\nThird sentence.\nLast.");
    REQUIRE(brown_text("").empty());
    REQUIRE(brown_text("\n \n\t\n").empty());

    REQUIRE(data::brown_domain('a', BrownDomains::genres15) == "A");
    REQUIRE(data::brown_domain('J', BrownDomains::groups7) == "learned");
    REQUIRE(data::brown_domain('h', BrownDomains::groups7) == "learned");
    REQUIRE(data::brown_domain('r', BrownDomains::groups7) == "fiction");
    REQUIRE_THROWS_WITH(data::brown_domain('i', BrownDomains::genres15), Catch::Contains("'i'"));
    REQUIRE(data::brown_domains(BrownDomains::genres15).size() == 15);
    REQUIRE(data::brown_domains(BrownDomains::groups7) ==
            std::vector<std::string>{"press", "religion", "skills_hobbies", "popular_lore", "belles_lettres", "learned", "fiction"});
}

TEST_CASE("brown: a folder that is not the corpus is a clear error", "[data][brown][errors]") {
    const mopt::test::TempDir dir("mopt-brown-test");
    const fs::path& tmp = dir.path;
    REQUIRE_THROWS_WITH(data::read_brown(tmp / "absent"), Catch::Contains("absent") && Catch::Contains("fetch_brown"));
    std::ofstream(tmp / "ca01") << "The/at dog/nn ./.";
    std::ofstream(tmp / "cb02") << "A/at cat/nn ./.";
    std::ofstream(tmp / "README") << "not a sample";
    REQUIRE_THROWS_WITH(data::read_brown(tmp), Catch::Contains("found 2 files") && Catch::Contains("500"));
}

TEST_CASE("brown: 500 documents in 15 genres, no tags left, natural text", "[data][brown]") {
    MOPT_REQUIRE_BROWN();
    const auto c = data::read_brown(brown_dir);
    REQUIRE(c.docs.size() == 500);
    REQUIRE(c.domains == std::vector<std::string>{"A", "B", "C", "D", "E", "F", "G", "H", "J", "K", "L", "M", "N", "P", "R"});
    std::map<std::string, int> per_genre;
    for (const auto& d : c.docs) {
        ++per_genre[d.domain];
        REQUIRE(d.id.size() == 4);
        REQUIRE(d.domain == std::string(1, static_cast<char>(std::toupper(d.id[1]))));
    }
    REQUIRE(per_genre == manual_genre_files);
    REQUIRE(std::is_sorted(c.docs.begin(), c.docs.end(), [](const auto& a, const auto& b) { return a.id < b.id; }));

    // No tag survives: every '/' left is one that a word itself holds ("and/or", "1/2"), counted
    // here from the raw files by cutting each token at its last slash.
    std::int64_t raw_word_slashes = 0, text_slashes = 0, bytes = 0;
    const std::vector<std::string> tags = {"/at", "/nn", "/nns", "/in", "/jj", "/vb", "/vbd", "/vbn", "/np", "/cc",
                                           "/rb", "/cs", "/dt", "/pps", "/ppss", "/md", "/cd", "/to", "-hl", "-tl"};
    for (const auto& d : c.docs) {
        std::istringstream raw(read_file(brown_dir / d.id));
        std::string token;
        std::int64_t untagged = 0;
        while (raw >> token) {
            const auto slash = token.rfind('/');
            if (slash == std::string::npos) ++untagged;
            else raw_word_slashes += std::count(token.begin(), token.begin() + static_cast<std::ptrdiff_t>(slash), '/');
        }
        REQUIRE(untagged == 0);
        text_slashes += std::count(d.text.begin(), d.text.end(), '/');
        bytes += static_cast<std::int64_t>(d.text.size());
        std::istringstream words(d.text);
        std::string tagged_token;  // the first token that still ends in a tag
        while (tagged_token.empty() && words >> token)
            for (const auto& tag : tags)
                if (token.ends_with(tag)) tagged_token = token;
        INFO(d.id << ": token '" << tagged_token << "'");
        REQUIRE(tagged_token.empty());
        // Brown's quote marks are gone, and nothing is spaced wrongly.
        REQUIRE(!contains(d.text, "``"));
        REQUIRE(!contains(d.text, "''"));
        for (const char* bad : {" ,", " .", " ;", " ?", " !", " )", "( ", ";;", "??", "\n\n", "  ", " \n", "\n "}) {
            INFO(d.id << ": '" << bad << "'");
            REQUIRE(!contains(d.text, bad));
        }
        REQUIRE(d.text.front() != ' ');
        REQUIRE(d.text.back() != '\n');
    }
    REQUIRE(raw_word_slashes > 50);  // the corpus has such words; they must survive
    REQUIRE(text_slashes == raw_word_slashes);
    INFO("bytes of text " << bytes);
    REQUIRE((bytes > 5'000'000 && bytes < 7'000'000));  // ~1.01M words of ~5-6 bytes

    // Specific spacing cases of the first press sample (ca01) and a fiction sample (ck01).
    const std::string& ca01 = doc(c, "ca01").text;
    REQUIRE(ca01.starts_with("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
                             "election produced \"no evidence\" that any irregularities took place.\n"));
    REQUIRE(contains(ca01, "\n\"Only a relative handful of such reports was received\", the jury said, \"considering "
                           "the widespread interest in the election, the number of voters and the size of this city\".\n"));
    REQUIRE(contains(ca01, "the City Executive Committee, which had over-all charge of the election, \"deserves"));
    REQUIRE(contains(ca01, "won by Mayor-nominate Ivan Allen Jr.\n"));
    REQUIRE(contains(ca01, ".\nMerger proposed\nHowever, the jury said it believes"));  // a headline
    REQUIRE(contains(ca01, "the jury recommended that: (1) Four additional deputies"));
    REQUIRE(std::count(ca01.begin(), ca01.end(), '\n') > 20);  // paragraphs kept
    const std::string& ck01 = doc(c, "ck01").text;
    REQUIRE(contains(ck01, "Scotty had had little appetite; yet his changed appearance"));
    REQUIRE(contains(ck01, "Scotty murmured, \"No, thanks\", so softly"));
    REQUIRE(contains(ck01, "at the University Hospital -- Mr. McKinley was entitled"));
    std::int64_t inches = 0;
    for (const auto& d : c.docs) inches += contains(d.text, "1/8\" brass") ? 1 : 0;
    REQUIRE(inches == 1);
}

TEST_CASE("brown: 7 domain groups cover all 500 documents", "[data][brown]") {
    MOPT_REQUIRE_BROWN();
    const auto genres = data::read_brown(brown_dir, BrownDomains::genres15);
    const auto groups = data::read_brown(brown_dir, BrownDomains::groups7);
    REQUIRE(groups.docs.size() == 500);
    REQUIRE(groups.domains == data::brown_domains(BrownDomains::groups7));
    const auto counts = groups.docs_per_domain();
    // press A-C, religion D, skills E, lore F, belles-lettres G, learned H+J, fiction K-R.
    REQUIRE(counts == std::vector<std::int64_t>{44 + 27 + 17, 17, 36, 48, 75, 30 + 80, 29 + 24 + 6 + 29 + 29 + 9});
    std::int64_t total = 0;
    for (const auto n : counts) total += n;
    REQUIRE(total == 500);
    for (std::size_t i = 0; i < 500; ++i) {
        REQUIRE(groups.docs[i].id == genres.docs[i].id);
        REQUIRE(groups.docs[i].text == genres.docs[i].text);
        REQUIRE(groups.docs[i].domain == data::brown_domain(genres.docs[i].domain[0], BrownDomains::groups7));
    }
}

TEST_CASE("brown: split is ~80/10/10, covers every genre, deterministic by seed", "[data][brown][split]") {
    MOPT_REQUIRE_BROWN();
    const auto c = data::read_brown(brown_dir);
    const auto s = data::split_corpus(c, 2024);
    const auto n_train = static_cast<std::int64_t>(s.train.docs.size());
    const auto n_val = static_cast<std::int64_t>(s.validation.docs.size());
    const auto n_test = static_cast<std::int64_t>(s.test.docs.size());
    INFO("train " << n_train << ", validation " << n_val << ", test " << n_test);
    REQUIRE(n_train + n_val + n_test == 500);
    REQUIRE((n_val >= 45 && n_val <= 55));
    REQUIRE((n_test >= 45 && n_test <= 55));
    REQUIRE((n_train >= 390 && n_train <= 410));
    for (const auto* part : {&s.train, &s.validation, &s.test})
        for (const auto n : part->docs_per_domain()) REQUIRE(n >= 1);  // even M (6 files) and R (9)
    std::set<std::string> ids;
    for (const auto* part : {&s.train, &s.validation, &s.test})
        for (const auto& d : part->docs) REQUIRE(ids.insert(d.id).second);

    const auto again = data::split_corpus(c, 2024);
    const auto other = data::split_corpus(c, 2025);
    std::vector<std::string> a, b, o;
    for (const auto& d : s.test.docs) a.push_back(d.id);
    for (const auto& d : again.test.docs) b.push_back(d.id);
    for (const auto& d : other.test.docs) o.push_back(d.id);
    REQUIRE(a == b);
    REQUIRE(a != o);

    const auto g = data::split_corpus(data::read_brown(brown_dir, BrownDomains::groups7), 2024);
    for (const auto* part : {&g.train, &g.validation, &g.test})
        for (const auto n : part->docs_per_domain()) REQUIRE(n >= 1);
}
