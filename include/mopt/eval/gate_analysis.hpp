#pragma once
// Gate analysis of a Mixture of Prompts (Dun et al., "Sweeping Heterogeneity with Smart MoPs",
// Fig. 5): the mean gate weight each domain gives each expert,
//
//   mean[d][e] = (1 / |S_d|) Σ_{i ∈ S_d} g_i[e]        S_d: the examples of domain d,
//
// where g_i is example i's gate vector (ForwardOutput::gate, [B, E] per batch). A mixture whose
// gate separates the domains shows one bright cell per row; a collapsed gate shows equal rows.
//
//   mopt::eval::GateByDomain gates(domain_names, experts);
//   for (auto& batch : test) gates.add(model.forward(tape, batch.ids).gate.value(), batch.domains);
//   gates.write_csv("gates.csv");        // domain,examples,expert_0,…,expert_{E−1}
//   gates.write_png("gates.png");        // heatmap: domains × experts, annotated
//
// Domains without examples have no mean: NaN in the matrix, empty cells in the CSV, grey cells in
// the picture.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/eval/plot.hpp"
#include "mopt/eval/png.hpp"
#include "mopt/tensor/tensor.hpp"

namespace mopt::eval {

class GateByDomain {
public:
    GateByDomain(std::vector<std::string> domains, std::int64_t experts)
        : domains_(std::move(domains)), experts_(experts),
          sum_(domains_.size(), std::vector<double>(static_cast<std::size_t>(std::max<std::int64_t>(experts, 0)), 0.0)),
          count_(domains_.size(), 0) {
        check(!domains_.empty(), "GateByDomain: no domains");
        check(experts >= 1, "GateByDomain: experts must be >= 1, got ", experts);
    }

    // gates: f32 [B, E] gate vectors; domain[b]: the domain index of example b.
    void add(const Tensor& gates, std::span<const std::int64_t> domain) {
        check(gates.dtype() == DType::f32 && gates.rank() == 2 && gates.dim(1) == experts_,
              "GateByDomain::add: gates must be f32 [batch, ", experts_, "], got ", name(gates.dtype()), " ",
              gates.shape());
        check(static_cast<std::int64_t>(domain.size()) == gates.dim(0), "GateByDomain::add: ", gates.dim(0),
              " gate vectors but ", domain.size(), " domain labels");
        for (std::int64_t b = 0; b < gates.dim(0); ++b) {
            const std::int64_t d = domain[static_cast<std::size_t>(b)];
            check(d >= 0 && d < static_cast<std::int64_t>(domains_.size()), "GateByDomain::add: domain label ", d,
                  " of example ", b, " is outside [0, ", domains_.size(), ")");
            auto& row = sum_[static_cast<std::size_t>(d)];
            for (std::int64_t e = 0; e < experts_; ++e) row[static_cast<std::size_t>(e)] += gates.at(b * experts_ + e);
            ++count_[static_cast<std::size_t>(d)];
        }
    }

    [[nodiscard]] const std::vector<std::string>& domains() const { return domains_; }
    [[nodiscard]] std::int64_t experts() const { return experts_; }
    [[nodiscard]] std::int64_t examples(std::size_t domain) const { return count_.at(domain); }

    // [domains][experts]: the mean gate weight (NaN for a domain without examples).
    [[nodiscard]] std::vector<std::vector<double>> mean() const {
        std::vector<std::vector<double>> m = sum_;
        for (std::size_t d = 0; d < m.size(); ++d)
            for (double& v : m[d])
                v = count_[d] > 0 ? v / static_cast<double>(count_[d]) : std::numeric_limits<double>::quiet_NaN();
        return m;
    }

    // domain,examples,expert_0,…: one row per domain, means with 6 significant digits.
    [[nodiscard]] std::string csv() const {
        std::string out = "domain,examples";
        for (std::int64_t e = 0; e < experts_; ++e) out += ",expert_" + std::to_string(e);
        out += "\n";
        const auto m = mean();
        for (std::size_t d = 0; d < m.size(); ++d) {
            out += csv_field(domains_[d]) + "," + std::to_string(count_[d]);
            for (double v : m[d]) {
                char buf[32] = "";
                if (std::isfinite(v)) std::snprintf(buf, sizeof buf, "%.6g", v);
                out += ",";
                out += buf;
            }
            out += "\n";
        }
        return out;
    }
    void write_csv(const std::filesystem::path& file) const {
        const std::string text = csv();
        detail::png::write_atomic(file, std::vector<std::uint8_t>(text.begin(), text.end()));
    }

    // The heatmap: domains as rows, experts as columns.
    [[nodiscard]] Heatmap heatmap(std::string title = "mean gate weight per domain") const {
        Heatmap h{.title = std::move(title), .x_label = "expert", .y_label = "domain", .row_labels = domains_,
                  .col_labels = {}, .values = mean()};
        for (std::int64_t e = 0; e < experts_; ++e) h.col_labels.push_back(std::to_string(e));
        return h;
    }
    void write_png(const std::filesystem::path& file, std::string title = "mean gate weight per domain",
                   int width = 800, int height = 500) const {
        eval::write_png(file, heatmap(std::move(title)), width, height);
    }

private:
    // Quotes a CSV field holding a comma, quote or line break (RFC 4180).
    static std::string csv_field(const std::string& s) {
        if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
        std::string q = "\"";
        for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
        return q + "\"";
    }

    std::vector<std::string> domains_;
    std::int64_t experts_;
    std::vector<std::vector<double>> sum_;
    std::vector<std::int64_t> count_;
};

}  // namespace mopt::eval
