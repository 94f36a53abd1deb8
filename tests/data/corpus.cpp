#include "test_util.hpp"

#include <catch2/catch.hpp>

#include <mopt/data/corpus.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace mopt;
namespace fs = std::filesystem;

namespace {

using mopt::test::TempDir;

// A corpus of `n` documents per domain, ids "<domain>-<i>".
data::Corpus synthetic(const std::vector<std::pair<std::string, int>>& sizes) {
    data::Corpus c;
    for (const auto& [domain, n] : sizes)
        for (int i = 0; i < n; ++i) c.docs.push_back({"text of " + domain + " " + std::to_string(i), domain, domain + "-" + std::to_string(i)});
    data::index_domains(c);
    return c;
}

std::vector<std::string> ids_of(const data::Corpus& c) {
    std::vector<std::string> ids;
    for (const auto& d : c.docs) ids.push_back(d.id);
    return ids;
}

}  // namespace

TEST_CASE("corpus: SplitMix64 matches the published test vector and shuffles are permutations", "[data][corpus][split]") {
    // Vigna's splitmix64.c, seed 1234567: the first five outputs.
    data::detail::SplitMix64 rng(1234567);
    REQUIRE(rng.next() == 6457827717110365317ull);
    REQUIRE(rng.next() == 3203168211198807973ull);
    REQUIRE(rng.next() == 9817491932198370423ull);
    REQUIRE(rng.next() == 4593380528125082431ull);
    REQUIRE(rng.next() == 16408922859458223821ull);

    std::vector<int> v(1000);
    for (int i = 0; i < 1000; ++i) v[i] = i;
    auto a = v, b = v, c = v;
    data::detail::shuffle(a, 7);
    data::detail::shuffle(b, 7);
    data::detail::shuffle(c, 8);
    REQUIRE(a == b);
    REQUIRE(a != c);
    REQUIRE(a != v);
    std::sort(a.begin(), a.end());
    REQUIRE(a == v);
    // below(n) is unbiased enough that each of 10 buckets gets 10% ± 1.5% of 100k draws.
    std::vector<int> hist(10, 0);
    for (int i = 0; i < 100000; ++i) ++hist[rng.below(10)];
    for (int h : hist) REQUIRE((h > 8500 && h < 11500));
}

TEST_CASE("corpus: a text file is one document named after its stem", "[data][corpus][text]") {
    TempDir dir;
    const std::string text = "First line.\n\nSecond paragraph, with UTF-8: café 日本.\n";
    const auto file = dir.write("news.txt", text);
    const auto c = data::read_text_file(file);
    REQUIRE(c.docs.size() == 1);
    REQUIRE(c.docs[0].text == text);
    REQUIRE(c.docs[0].domain == "news");
    REQUIRE(c.docs[0].id == "news.txt");
    REQUIRE(c.domains == std::vector<std::string>{"news"});
    REQUIRE(c.domain_index("news") == 0);
    REQUIRE_THROWS_WITH(c.domain_index("sports"), Catch::Contains("sports"));
    REQUIRE(c.bytes() == static_cast<std::int64_t>(text.size()));

    // A byte-order mark is dropped; read_corpus picks the plain-text reader for other extensions.
    const auto bom = dir.write("bom.md", "\xEF\xBB\xBFhello");
    REQUIRE(data::read_corpus(bom).docs.at(0).text == "hello");
}

TEST_CASE("corpus: empty, missing and non-UTF-8 files are errors naming the file", "[data][corpus][text][errors]") {
    TempDir dir;
    REQUIRE_THROWS_WITH(data::read_text_file(dir.write("empty.txt", "")), Catch::Contains("empty.txt") && Catch::Contains("empty"));
    REQUIRE_THROWS_WITH(data::read_text_file(dir.write("blank.txt", " \n\t\n")), Catch::Contains("blank.txt") && Catch::Contains("empty"));
    REQUIRE_THROWS_WITH(data::read_text_file(dir.path / "absent.txt"), Catch::Contains("absent.txt") && Catch::Contains("no such file"));
    REQUIRE_THROWS_WITH(data::read_text_file(dir.path), Catch::Contains("not a regular file"));
    // Invalid UTF-8: a lone continuation byte, a truncated sequence, an overlong '/', a surrogate.
    const std::vector<std::pair<std::string, std::string>> bad = {
        {"abc\x80", "byte 3"}, {"ab\xE6\x97", "byte 2"}, {"\xC0\xAF", "byte 0"}, {"x\xED\xA0\x80", "byte 1"}};
    int n = 0;
    for (const auto& [bytes, where] : bad) {
        const std::string name = "bad" + std::to_string(n++) + ".txt";
        INFO(name);
        REQUIRE_THROWS_WITH(data::read_text_file(dir.write(name, bytes)),
                            Catch::Contains(name) && Catch::Contains("UTF-8") && Catch::Contains(where));
    }
    // Valid 4-byte characters pass.
    REQUIRE_NOTHROW(data::read_text_file(dir.write("emoji.txt", "ok \xF0\x9F\x99\x82")));
}

TEST_CASE("corpus: a folder of .txt files, recursive and sorted, domains from sub-folders", "[data][corpus][folder]") {
    TempDir dir;
    dir.write("zeta.txt", "top level z");
    dir.write("fiction/b.txt", "fiction b");
    dir.write("fiction/a.txt", "fiction a");
    dir.write("news/2024/x.txt", "news deep x");
    dir.write("news/readme.md", "not a text file");
    dir.write("alpha.txt", "top level a");
    const auto c = data::read_text_folder(dir.path);
    REQUIRE(ids_of(c) == std::vector<std::string>{"alpha.txt", "fiction/a.txt", "fiction/b.txt", "news/2024/x.txt", "zeta.txt"});
    REQUIRE(c.docs[0].domain == "alpha");
    REQUIRE(c.docs[1].domain == "fiction");
    REQUIRE(c.docs[2].text == "fiction b");
    REQUIRE(c.docs[3].domain == "news");
    REQUIRE(c.docs[4].domain == "zeta");
    REQUIRE(c.domains == std::vector<std::string>{"alpha", "fiction", "news", "zeta"});
    REQUIRE(c.docs_per_domain() == std::vector<std::int64_t>{1, 2, 1, 1});
    REQUIRE(ids_of(data::read_corpus(dir.path)) == ids_of(c));

    TempDir none;
    none.write("notes.md", "x");
    REQUIRE_THROWS_WITH(data::read_text_folder(none.path), Catch::Contains("no .txt files"));
    REQUIRE_THROWS_WITH(data::read_text_folder(none.path / "nope"), Catch::Contains("nope") && Catch::Contains("no such folder"));
    dir.write("fiction/c.txt", "");
    REQUIRE_THROWS_WITH(data::read_text_folder(dir.path), Catch::Contains("c.txt") && Catch::Contains("empty"));
}

TEST_CASE("corpus: JSONL records with text and category", "[data][corpus][jsonl]") {
    TempDir dir;
    const auto file = dir.write("set.jsonl",
                                "{\"text\": \"first \\u00e9\\nline\", \"category\": \"news\"}\n"
                                "\n"
                                "{\"text\": \"second\", \"category\": \"fiction\", \"extra\": 3}\r\n"
                                "{\"text\": \"no category\"}\n"
                                "{\"category\": \"news\", \"text\": \"third\"}");
    const auto c = data::read_jsonl(file);
    REQUIRE(c.docs.size() == 4);
    REQUIRE(c.docs[0].text == "first \xC3\xA9\nline");
    REQUIRE(c.docs[0].domain == "news");
    REQUIRE(c.docs[0].id == "set.jsonl:1");
    REQUIRE(c.docs[1].id == "set.jsonl:3");  // line numbers count the blank line
    REQUIRE(c.docs[2].domain == "default");
    REQUIRE(c.docs[3].text == "third");
    REQUIRE(c.domains == std::vector<std::string>{"news", "fiction", "default"});
    REQUIRE(data::read_corpus(file).docs.size() == 4);
}

TEST_CASE("corpus: JSONL errors name the file and the line", "[data][corpus][jsonl][errors]") {
    TempDir dir;
    const std::string ok = "{\"text\": \"fine\"}\n";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {ok + ok + "{\"category\": \"news\"}\n", "line 3: no \"text\" field"},
        {ok + "{\"text\": \"unterminated}\n", "line 2: not valid JSON"},
        {ok + "[1, 2]\n", "line 2: expected an object"},
        {"{\"text\": 42}\n", "line 1: \"text\" must be a string"},
        {ok + "\n\n{\"text\": \"x\", \"category\": 7}\n", "line 4: \"category\" must be a string"},
        {"{\"text\": \"x\", \"category\": \"\"}\n", "line 1: \"category\" is empty"},
        {ok + "{\"text\": \"  \"}\n", "line 2: \"text\" is empty"},
        {"", "blank"},
        {"\n \n", "no records"},
    };
    int n = 0;
    for (const auto& [content, what] : cases) {
        const std::string name = "case" + std::to_string(n++) + ".jsonl";
        INFO(name << ": expecting '" << what << "'");
        REQUIRE_THROWS_WITH(data::read_jsonl(dir.write(name, content)), Catch::Contains(name) && Catch::Contains(what));
    }
}

TEST_CASE("corpus: document split is 80/10/10 within each domain, a partition, deterministic by seed", "[data][corpus][split]") {
    const auto c = synthetic({{"big", 50}, {"mid", 20}, {"ten", 10}, {"small", 7}, {"one", 1}});
    const auto s = data::split_corpus(c, 123);
    for (const auto* part : {&s.train, &s.validation, &s.test}) REQUIRE(part->domains == c.domains);

    // Sizes per domain: round(n/10) to validation and test, the rest to train.
    REQUIRE(s.train.docs_per_domain() == std::vector<std::int64_t>{40, 16, 8, 5, 1});
    REQUIRE(s.validation.docs_per_domain() == std::vector<std::int64_t>{5, 2, 1, 1, 0});
    REQUIRE(s.test.docs_per_domain() == std::vector<std::int64_t>{5, 2, 1, 1, 0});

    // A partition: every document in exactly one split, unchanged, in corpus order within it.
    std::map<std::string, int> seen;
    std::map<std::string, const data::Document*> by_id;
    for (const auto& d : c.docs) by_id[d.id] = &d;
    for (const auto* part : {&s.train, &s.validation, &s.test}) {
        std::vector<std::size_t> positions;
        for (const auto& d : part->docs) {
            ++seen[d.id];
            REQUIRE(by_id.at(d.id)->text == d.text);
            REQUIRE(by_id.at(d.id)->domain == d.domain);
            positions.push_back(static_cast<std::size_t>(by_id.at(d.id) - c.docs.data()));
        }
        REQUIRE(std::is_sorted(positions.begin(), positions.end()));
    }
    REQUIRE(seen.size() == c.docs.size());
    for (const auto& [id, k] : seen) REQUIRE(k == 1);

    // Same seed, same split; another seed, another split of the same sizes.
    const auto again = data::split_corpus(c, 123);
    REQUIRE(ids_of(again.train) == ids_of(s.train));
    REQUIRE(ids_of(again.validation) == ids_of(s.validation));
    REQUIRE(ids_of(again.test) == ids_of(s.test));
    const auto other = data::split_corpus(c, 124);
    REQUIRE(other.validation.docs_per_domain() == s.validation.docs_per_domain());
    REQUIRE(ids_of(other.validation) != ids_of(s.validation));

    // Other fractions, and bad ones.
    const auto half = data::split_corpus(c, 1, {0.5, 0.5, 0.0});
    REQUIRE(half.test.docs.empty());
    REQUIRE(half.validation.docs_per_domain()[0] == 25);
    REQUIRE_THROWS_WITH(data::split_corpus(c, 1, {0.8, 0.1, 0.2}), Catch::Contains("sum to 1"));
    REQUIRE_THROWS_WITH(data::split_corpus(c, 1, {1.1, -0.1, 0.0}), Catch::Contains("non-negative"));
    REQUIRE_THROWS_WITH(data::split_corpus(data::Corpus{}, 1), Catch::Contains("no documents"));
}
