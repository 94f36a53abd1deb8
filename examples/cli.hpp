#pragma once
// What every example's command line shares: a usage error (exit status 2) distinct from a bad file
// or a failed run (exit status 1), Boost.Program_options parsing with --help, and JSON output.
#include <boost/program_options.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mopt/error.hpp"

namespace mopt::cli {

// A command-line mistake: exit status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
template <class... Args>
void usage_check(bool cond, Args&&... args) {
    if (!cond) throw UsageError(mopt::detail::concat(std::forward<Args>(args)...));
}

// "a,b,,c" -> {"a", "b", "", "c"} ("" -> {}): list-valued flags.
inline std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    if (s.empty()) return out;
    std::size_t start = 0;
    for (std::size_t i = 0; i <= s.size(); ++i)
        if (i == s.size() || s[i] == sep) {
            out.push_back(s.substr(start, i - start));
            start = i + 1;
        }
    return out;
}

// Parses argv; returns false after printing --help. Bad or missing flags become a UsageError.
inline bool parse(int argc, char** argv, const boost::program_options::options_description& opts,
                  boost::program_options::variables_map& vm) {
    namespace po = boost::program_options;
    try {
        po::store(po::parse_command_line(argc, argv, opts), vm);
        if (vm.count("help")) {
            std::cout << opts << "\n";
            return false;
        }
        po::notify(vm);
    } catch (const po::error& e) {
        throw UsageError(e.what());
    }
    return true;
}

// Writes `j` to `path` (pretty-printed) unless path is empty; an unwritable path is an error naming it.
inline void write_json(const std::string& path, const nlohmann::json& j) {
    if (path.empty()) return;
    const std::filesystem::path p(path);
    if (!p.parent_path().empty()) std::filesystem::create_directories(p.parent_path());
    std::ofstream out(p);
    out << j.dump(2) << "\n";
    check(out.good(), "--json: could not write ", path);
}

// Runs body() and maps exceptions to exit statuses: 2 for a usage error, 1 for anything else.
template <class Body>
int run(const char* program, Body&& body) {
    try {
        return body();
    } catch (const UsageError& e) {
        std::fprintf(stderr, "%s: %s (see --help)\n", program, e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s: %s\n", program, e.what());
        return 1;
    }
}

}  // namespace mopt::cli
