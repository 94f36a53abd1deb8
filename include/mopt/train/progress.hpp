#pragma once
// A progress line for training loops: step, loss, tokens/s and ETA. On a terminal it redraws one
// line (\r); in a log file (CI, nohup) it prints a line every `every` steps instead.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <unistd.h>

namespace mopt::train {

class Progress {
public:
    // total: steps of the run; first: the step it starts at (non-zero when resuming).
    Progress(std::int64_t total, std::int64_t first = 0, std::int64_t every = 50, std::FILE* out = stderr)
        : total_(total), first_(first), every_(every > 0 ? every : 1), out_(out),
          tty_(::isatty(::fileno(out)) != 0), start_(Clock::now()) {}

    // After step `step` (1-based count of updates done) that consumed `tokens` tokens.
    void update(std::int64_t step, std::int64_t tokens, double loss, const std::string& note = {}) {
        tokens_ += tokens;
        const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
        const double done = static_cast<double>(step - first_);
        const double tok_s = seconds > 0.0 ? static_cast<double>(tokens_) / seconds : 0.0;
        const double eta = done > 0.0 ? seconds / done * static_cast<double>(total_ - step) : 0.0;
        if (!tty_ && step % every_ != 0 && step != total_) return;
        constexpr int width = 24;
        const int filled = total_ > 0 ? static_cast<int>(width * step / total_) : width;
        std::string bar(static_cast<std::size_t>(filled), '#');
        bar.resize(width, '.');
        std::fprintf(out_, "%s[%s] %lld/%lld loss %.4f  %s tok/s  ETA %s%s%s%s", tty_ ? "\r" : "", bar.c_str(),
                     static_cast<long long>(step), static_cast<long long>(total_), loss, si(tok_s).c_str(),
                     clock_text(eta).c_str(), note.empty() ? "" : "  ", note.c_str(), tty_ ? "\033[K" : "\n");
        if (tty_ && step == total_) std::fputc('\n', out_);
        std::fflush(out_);
    }
    // A line that must not be overwritten (a validation result).
    void message(const std::string& text) {
        std::fprintf(out_, "%s%s\n", tty_ ? "\r\033[K" : "", text.c_str());
        std::fflush(out_);
    }
    [[nodiscard]] double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

    static std::string clock_text(double s) {
        const auto t = static_cast<long long>(s + 0.5);
        char buf[32];
        if (t >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", t / 3600, t / 60 % 60);
        else std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
        return buf;
    }
    static std::string si(double v) {
        char buf[32];
        if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
        else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
        else std::snprintf(buf, sizeof buf, "%.0f", v);
        return buf;
    }

private:
    using Clock = std::chrono::steady_clock;
    std::int64_t total_, first_, every_;
    std::FILE* out_;
    bool tty_;
    Clock::time_point start_;
    std::int64_t tokens_ = 0;
};

}  // namespace mopt::train
