#pragma once
// A CSV log of a training run (one row per logged step). Opening an existing log when resuming at
// step s keeps only the rows of steps <= s, so a resumed run's log reads as one uninterrupted run.
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "mopt/error.hpp"

namespace mopt::train {

class CsvLog {
public:
    CsvLog() = default;
    // columns[0] must be "step". resume_step < 0: start a new log (truncate).
    CsvLog(const std::filesystem::path& file, std::vector<std::string> columns, std::int64_t resume_step = -1)
        : file_(file), columns_(std::move(columns)) {
        check(!columns_.empty() && columns_.front() == "step", "CsvLog: the first column must be 'step'");
        std::string header;
        for (std::size_t i = 0; i < columns_.size(); ++i) header += (i ? "," : "") + columns_[i];
        std::vector<std::string> kept;
        if (resume_step >= 0 && std::filesystem::exists(file)) {
            std::ifstream in(file);
            std::string line;
            std::getline(in, line);
            check(line == header, "CsvLog: ", file.string(), " has columns '", line, "', expected '", header, "'");
            while (std::getline(in, line)) {
                if (line.empty()) continue;
                const long long step = std::stoll(line.substr(0, line.find(',')));
                if (step <= resume_step) kept.push_back(line);
            }
        }
        if (!file.parent_path().empty()) std::filesystem::create_directories(file.parent_path());
        out_.open(file, std::ios::trunc);
        check(out_.good(), "CsvLog: cannot write ", file.string());
        out_ << header << '\n';
        for (const auto& l : kept) out_ << l << '\n';
        out_.flush();
    }

    // One row; empty strings leave a cell blank (a validation column on a training-only row).
    void row(const std::vector<std::string>& cells) {
        check(cells.size() == columns_.size(), "CsvLog: row of ", cells.size(), " cells for ", columns_.size(),
              " columns in ", file_.string());
        for (std::size_t i = 0; i < cells.size(); ++i) out_ << (i ? "," : "") << cells[i];
        out_ << '\n';
        out_.flush();
    }
    template <class T>
    static std::string cell(T v) {
        std::ostringstream s;
        s.precision(7);
        s << v;
        return s.str();
    }

private:
    std::filesystem::path file_;
    std::vector<std::string> columns_;
    std::ofstream out_;
};

}  // namespace mopt::train
