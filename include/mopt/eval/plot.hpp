#pragma once
// plot: training curves, expert-load bars and gate heatmaps as PNG files, with no dependency
// beyond the standard library (the encoder is png.hpp; the text is a 5x8 bitmap font below).
//
//   mopt::eval::LineChart loss{.title = "Brown, 2-layer Switch", .x_label = "step", .y_label = "loss"};
//   loss.series.push_back({"train", steps, train_loss});
//   loss.series.push_back({"valid", steps, valid_loss});
//   mopt::eval::write_png("loss.png", loss);                                   // 800x500
//
//   mopt::eval::write_png("load.png", mopt::eval::BarChart{.title = "expert load", .x_label = "expert",
//       .y_label = "fraction of tokens", .categories = {"0", "1", "2", "3"}, .groups = {{"layer 1", {}, load}}});
//
//   mopt::eval::write_png("gates.png", mopt::eval::Heatmap{.title = "gate weights", .x_label = "expert",
//       .y_label = "token", .row_labels = tokens, .col_labels = experts, .values = weights});
//
// Axes get "nice" ticks (1, 2, 2.5 or 5 times a power of ten, as in Heckbert, "Nice numbers for
// graph labels", Graphics Gems 1990), extended so the frame edges carry labels; log_y puts ticks
// on decades (or 1-2-5 within a decade). Points with a NaN or infinite coordinate (and y <= 0 on a
// log axis) are skipped, and a line breaks there rather than joining across the gap. Series get
// distinct colours (the ten "tab10" colours, then golden-angle hues) and a legend whenever there
// is more than one or the one has a label; the legend goes into the plot corner that hides the
// fewest drawn pixels. Heatmaps use a viridis-like scale (luma rises with the value, so a grey
// print keeps the order) with a colour bar; cells too small for their number go unannotated.
// Text scales with the image: 2x the font at 800x500 (round(min(width / 400, height / 250))).
//
// render() returns the image with where things landed (plot box and data ranges, bar and cell
// rectangles, legend), for tests and for callers that draw more on top; write_png() renders and
// writes atomically. Bad input (no series, empty series, x/y sizes that differ, nothing finite,
// ragged heatmap rows, label counts that do not match) throws mopt::Error naming the chart and
// the series, row or field.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "mopt/error.hpp"
#include "mopt/eval/png.hpp"

namespace mopt::eval {

struct Series {
    std::string label;
    std::vector<double> x, y;
};

struct LineChart {
    std::string title, x_label, y_label;
    std::vector<Series> series;
    bool log_y = false;
};

// Grouped bars: group g's y[c] is the height of its bar in category c. A group's x is unused
// (bars sit at their categories) and must be empty or as long as y.
struct BarChart {
    std::string title, x_label, y_label;
    std::vector<std::string> categories;
    std::vector<Series> groups;
};

// values[row][col], row 0 at the top. Labels may be left empty (then the indices are shown).
struct Heatmap {
    std::string title, x_label, y_label;
    std::vector<std::string> row_labels, col_labels;
    std::vector<std::vector<double>> values;
    bool annotate = true;  // print each value in its cell where it fits
};

// Pixels [x0, x1) x [y0, y1).
struct Rect {
    int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
    [[nodiscard]] int width() const { return x1 - x0; }
    [[nodiscard]] int height() const { return y1 - y0; }
    [[nodiscard]] bool empty() const { return x1 <= x0 || y1 <= y0; }
    [[nodiscard]] bool contains(int x, int y) const { return x >= x0 && x < x1 && y >= y0 && y < y1; }
};

// Where data land: the value x_min maps to the centre of pixel column plot.x0, x_max to plot.x1 - 1;
// y_min to row plot.y1 - 1 (bottom), y_max to plot.y0. On a log axis y_min and y_max are log10 of
// the range and px_y takes the value itself. Heatmaps: x in [0, cols], y in [0, rows].
struct Axes {
    Rect plot;
    double x_min = 0, x_max = 1, y_min = 0, y_max = 1;
    bool log_y = false;
    [[nodiscard]] double px_x(double x) const { return plot.x0 + (x - x_min) / (x_max - x_min) * (plot.width() - 1); }
    [[nodiscard]] double px_y(double y) const {
        const double v = log_y ? std::log10(y) : y;
        return (plot.y1 - 1) - (v - y_min) / (y_max - y_min) * (plot.height() - 1);
    }
};

struct Figure {
    Image image;
    Axes axes;
    Rect legend;               // empty when there is no legend
    std::vector<Rect> bars;    // bar charts: [group * categories + category]; empty where y is not finite
    std::vector<Rect> cells;   // heatmaps: [row * cols + col]
    Rect colorbar;             // heatmaps: value_min at the bottom row, value_max at the top row
    double value_min = 0, value_max = 0;
};

// Tick positions along one axis.
struct Ticks {
    std::vector<double> values;  // ascending
    double lo = 0, hi = 0;       // the axis range: the first and the last tick
    double step = 0;             // linear ticks: the spacing; log ticks: 0
};

namespace detail::plot {

// 5x8 glyphs for ASCII 32..126, drawn for mopt: one byte per row, bit 4 the leftmost column; rows
// 0-6 hold capitals and digits, row 7 the descenders of g, j, p, q, y and the comma.
inline constexpr std::array<std::array<std::uint8_t, 8>, 95> font = {{
        {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // space
        {0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00},  // !
        {0x0A, 0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00},  // "
        {0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00},  // #
        {0x04, 0x0F, 0x14, 0x0E, 0x05, 0x1E, 0x04, 0x00},  // $
        {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00},  // %
        {0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D, 0x00},  // &
        {0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00},  // '
        {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00},  // (
        {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00},  // )
        {0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00},  // *
        {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00},  // +
        {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x08},  // ,
        {0x00, 0x00, 0x00, 0x0E, 0x00, 0x00, 0x00, 0x00},  // -
        {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00},  // .
        {0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10, 0x00},  // /
        {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00},  // 0
        {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00},  // 1
        {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00},  // 2
        {0x0E, 0x11, 0x01, 0x06, 0x01, 0x11, 0x0E, 0x00},  // 3
        {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00},  // 4
        {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00},  // 5
        {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00},  // 6
        {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00},  // 7
        {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00},  // 8
        {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00},  // 9
        {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00},  // :
        {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x08, 0x00},  // ;
        {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00},  // <
        {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00},  // =
        {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00},  // >
        {0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00},  // ?
        {0x0E, 0x11, 0x17, 0x15, 0x17, 0x10, 0x0F, 0x00},  // @
        {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00},  // A
        {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00},  // B
        {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00},  // C
        {0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E, 0x00},  // D
        {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00},  // E
        {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00},  // F
        {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00},  // G
        {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00},  // H
        {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00},  // I
        {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00},  // J
        {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00},  // K
        {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00},  // L
        {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00},  // M
        {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00},  // N
        {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00},  // O
        {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00},  // P
        {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00},  // Q
        {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00},  // R
        {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00},  // S
        {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00},  // T
        {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00},  // U
        {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00},  // V
        {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00},  // W
        {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00},  // X
        {0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04, 0x00},  // Y
        {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00},  // Z
        {0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00},  // [
        {0x10, 0x10, 0x08, 0x04, 0x02, 0x01, 0x01, 0x00},  // backslash
        {0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00},  // ]
        {0x04, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00},  // ^
        {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F},  // _
        {0x08, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00},  // `
        {0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00},  // a
        {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E, 0x00},  // b
        {0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00},  // c
        {0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F, 0x00},  // d
        {0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00},  // e
        {0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00},  // f
        {0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // g
        {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00},  // h
        {0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00},  // i
        {0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x12, 0x0C},  // j
        {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00},  // k
        {0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00},  // l
        {0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11, 0x00},  // m
        {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00},  // n
        {0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00},  // o
        {0x00, 0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10},  // p
        {0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01},  // q
        {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00},  // r
        {0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E, 0x00},  // s
        {0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00},  // t
        {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00},  // u
        {0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00},  // v
        {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00},  // w
        {0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00},  // x
        {0x00, 0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E},  // y
        {0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00},  // z
        {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02, 0x00},  // {
        {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00},  // |
        {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08, 0x00},  // }
        {0x00, 0x00, 0x08, 0x15, 0x02, 0x00, 0x00, 0x00},  // ~
}};

inline constexpr Rgb background{255, 255, 255};
inline constexpr Rgb ink{25, 25, 25};          // text
inline constexpr Rgb frame_colour{70, 70, 70};  // axes box and ticks
inline constexpr Rgb grid_colour{228, 228, 228};
inline constexpr Rgb missing_colour{205, 205, 205};  // heatmap cells without a finite value
inline constexpr Rgb legend_border{170, 170, 170};

// Visits the glyph index (0..94) of each character; a UTF-8 sequence or a control character is
// one '?', so text width counts what is drawn.
template <class F>
void for_each_glyph(std::string_view text, F&& f) {
    for (std::size_t i = 0; i < text.size(); ++i) {
        const auto u = static_cast<unsigned char>(text[i]);
        if (u >= 0x80 && u < 0xC0) continue;  // UTF-8 continuation byte
        f((u >= 32 && u < 127) ? u - 32 : '?' - 32);
    }
}

inline int glyph_count(std::string_view text) {
    int n = 0;
    for_each_glyph(text, [&](int) { ++n; });
    return n;
}

// Glyphs advance by 6 columns (5 drawn, 1 space); a line is 8 rows high.
inline int text_width(std::string_view text, int scale) {
    const int n = glyph_count(text);
    return n == 0 ? 0 : (6 * n - 1) * scale;
}
inline int text_height(int scale) { return 8 * scale; }

// `text` cut (with "..") to at most max_px wide; empty when not even ".." fits.
inline std::string fit_text(const std::string& text, int max_px, int scale) {
    const int fits = (max_px / scale + 1) / 6;  // glyphs that fit: 6n - 1 columns
    if (glyph_count(text) <= fits) return text;
    if (fits < 2) return {};
    // Cut before the glyph number fits - 2 (a glyph starts at any byte but a UTF-8 continuation).
    int glyphs = 0;
    std::size_t cut = 0;
    for (; cut < text.size(); ++cut) {
        const auto u = static_cast<unsigned char>(text[cut]);
        if (u >= 0x80 && u < 0xC0) continue;
        if (glyphs == fits - 2) break;
        ++glyphs;
    }
    return text.substr(0, cut) + "..";
}

// Top-left corner at (x, y); vertical text reads bottom to top with (x, y) its bottom-left corner.
inline void draw_text(Image& img, int x, int y, std::string_view text, Rgb colour, int scale, bool vertical = false) {
    int pos = 0;
    for_each_glyph(text, [&](int g) {
        const auto& rows = font[static_cast<std::size_t>(g)];
        for (int gy = 0; gy < 8; ++gy)
            for (int gx = 0; gx < 5; ++gx) {
                if (!((rows[static_cast<std::size_t>(gy)] >> (4 - gx)) & 1)) continue;
                const int u = (pos * 6 + gx) * scale, v = gy * scale;  // along and across the text
                for (int dy = 0; dy < scale; ++dy)
                    for (int dx = 0; dx < scale; ++dx) {
                        if (vertical) img.set(x + v + dy, y - 1 - (u + dx), colour);
                        else img.set(x + u + dx, y + v + dy, colour);
                    }
            }
        ++pos;
    });
}

inline void fill_clipped(Image& img, int x0, int y0, int x1, int y1, const Rect& clip, Rgb c) {
    img.fill(std::max(x0, clip.x0), std::max(y0, clip.y0), std::min(x1, clip.x1), std::min(y1, clip.y1), c);
}

inline void stroke_rect(Image& img, const Rect& r, Rgb c) {  // one pixel outside r
    img.fill(r.x0 - 1, r.y0 - 1, r.x1 + 1, r.y0, c);
    img.fill(r.x0 - 1, r.y1, r.x1 + 1, r.y1 + 1, c);
    img.fill(r.x0 - 1, r.y0, r.x0, r.y1, c);
    img.fill(r.x1, r.y0, r.x1 + 1, r.y1, c);
}

// A segment `thickness` pixels wide (a square brush stepped along the longer axis), clipped.
inline void draw_line(Image& img, double xa, double ya, double xb, double yb, Rgb c, int thickness, const Rect& clip) {
    const int steps = static_cast<int>(std::ceil(std::max(std::abs(xb - xa), std::abs(yb - ya))));
    const int lo = -(thickness - 1) / 2, hi = thickness / 2 + 1;  // brush [lo, hi) around the point
    for (int k = 0; k <= steps; ++k) {
        const double t = steps == 0 ? 0.0 : static_cast<double>(k) / steps;
        const int x = static_cast<int>(std::lround(xa + (xb - xa) * t));
        const int y = static_cast<int>(std::lround(ya + (yb - ya) * t));
        fill_clipped(img, x + lo, y + lo, x + hi, y + hi, clip, c);
    }
}

inline void draw_disc(Image& img, double cx, double cy, double radius, Rgb c, const Rect& clip) {
    const int x0 = static_cast<int>(std::floor(cx - radius)), x1 = static_cast<int>(std::ceil(cx + radius));
    const int y0 = static_cast<int>(std::floor(cy - radius)), y1 = static_cast<int>(std::ceil(cy + radius));
    for (int y = y0; y <= y1; ++y)
        for (int x = x0; x <= x1; ++x)
            if ((x - cx) * (x - cx) + (y - cy) * (y - cy) <= radius * radius + 0.25 && clip.contains(x, y))
                img.set(x, y, c);
}

// Decimal places that show multiples of `step` exactly (step = 1, 2, 2.5 or 5 times 10^k).
inline int decimals_for(double step) {
    for (int d = 0; d < 15; ++d) {
        const double scaled = step * std::pow(10.0, d);
        if (std::abs(scaled - std::round(scaled)) <= 1e-6 * scaled) return d;
    }
    return 15;
}

inline std::string printf_string(const char* fmt, double v, int decimals) {
    char buf[64];
    std::snprintf(buf, sizeof buf, fmt, decimals, v);
    return buf;
}

// "1.5e+06" -> "1.5e6", "2e-05" -> "2e-5": shorter on a small canvas.
inline std::string tidy_exponent(std::string s) {
    const auto e = s.find('e');
    if (e == std::string::npos) return s;
    std::string mant = s.substr(0, e), exp = s.substr(e + 1);
    const bool neg = !exp.empty() && exp[0] == '-';
    if (!exp.empty() && (exp[0] == '+' || exp[0] == '-')) exp.erase(0, 1);
    while (exp.size() > 1 && exp[0] == '0') exp.erase(0, 1);
    return mant + "e" + (neg ? "-" : "") + exp;
}

// Labels for linear ticks, all with the same decimals; scientific when the numbers are large or tiny.
inline std::vector<std::string> tick_labels(const Ticks& t) {
    double max_abs = 0;
    for (double v : t.values) max_abs = std::max(max_abs, std::abs(v));
    std::vector<std::string> out;
    const bool sci = max_abs >= 1e6 || (max_abs > 0 && t.step < 1e-4);
    const int e = sci ? static_cast<int>(std::floor(std::log10(max_abs))) : 0;
    const double unit = std::pow(10.0, e);
    const int d = decimals_for(t.step / unit);
    for (double v : t.values) {
        std::string s = printf_string("%.*f", v / unit, d);
        if (s.find_first_not_of("-0.") == std::string::npos) s = "0";  // no "-0.0"
        else if (sci) s += "e" + std::to_string(e);
        out.push_back(s);
    }
    return out;
}

inline std::string log_tick_label(double v) {
    if (v >= 1e-4 && v < 1e6) return printf_string("%.*g", v, 6);
    return tidy_exponent(printf_string("%.*g", v, 3));
}

// Up to 3 significant digits, for heatmap cells.
inline std::string compact_number(double v) {
    if (v == 0) return "0";
    return tidy_exponent(printf_string("%.*g", v, 3));
}

inline double luma(Rgb c) { return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b; }

inline std::string series_name(std::size_t i, const std::string& label) {
    return label.empty() ? mopt::detail::concat("series ", i) : mopt::detail::concat("series ", i, " '", label, "'");
}

inline int text_scale(int width, int height) {
    return std::clamp(static_cast<int>(std::lround(std::min(width / 400.0, height / 250.0))), 1, 8);
}

inline void check_size(const char* what, const std::string& title, int width, int height) {
    check(width >= 160 && height >= 120 && width <= 16384 && height <= 16384, what, " '", title, "': ", width, "x",
          height, " is outside the supported size (160x120 to 16384x16384)");
}

// Common sizes, all proportional to the text scale s.
struct Metrics {
    int s, th, cw, pad, tick;
    explicit Metrics(int scale) : s(scale), th(8 * scale), cw(6 * scale), pad(4 * scale), tick(3 * scale) {}
};

// Picks the count of ticks such that their labels, side by side, leave a gap of two characters.
template <class MakeTicks>
Ticks fit_x_ticks(MakeTicks&& make, int plot_w, const Metrics& m) {
    Ticks t;
    for (int count = 12; count >= 3; --count) {
        t = make(count);
        if (t.values.size() < 2) return t;
        int widest = 0;
        for (const auto& l : tick_labels(t)) widest = std::max(widest, text_width(l, m.s));
        const double spacing = static_cast<double>(plot_w) / static_cast<double>(t.values.size() - 1);
        if (spacing >= widest + 2 * m.cw) return t;
    }
    return t;
}

struct LegendEntry {
    std::string label;
    Rgb colour;
};

enum class LegendMark { line, line_and_dot, box };

// Draws the legend into the corner of `plot` that covers the fewest non-background pixels (top
// right first on ties) and returns where it went.
inline Rect draw_legend(Image& img, const Rect& plot, std::vector<LegendEntry> entries, LegendMark mark, const Metrics& m) {
    const int row_h = m.th + 2 * m.s, sample = 4 * m.cw;
    const int max_rows = std::max(1, (plot.height() - 2 * m.pad + 2 * m.s) / row_h);
    if (static_cast<int>(entries.size()) > max_rows) {
        const auto hidden = entries.size() - static_cast<std::size_t>(max_rows - 1);
        entries.resize(static_cast<std::size_t>(max_rows - 1));
        entries.push_back({mopt::detail::concat("(", hidden, " more)"), background});
    }
    const int max_label_w = plot.width() - 2 * m.pad - (sample + 3 * m.pad);
    if (max_label_w <= 0) return {};
    int label_w = 0;
    for (auto& e : entries) {
        e.label = fit_text(e.label, max_label_w, m.s);
        label_w = std::max(label_w, text_width(e.label, m.s));
    }
    const int w = m.pad + sample + m.pad + label_w + m.pad;
    const int h = m.pad + static_cast<int>(entries.size()) * row_h - 2 * m.s + m.pad;
    const int left = plot.x0 + m.pad, right = plot.x1 - m.pad - w;
    const int top = plot.y0 + m.pad, bottom = plot.y1 - m.pad - h;
    const std::array<Rect, 4> corners = {Rect{right, top, right + w, top + h}, Rect{left, top, left + w, top + h},
                                         Rect{right, bottom, right + w, bottom + h},
                                         Rect{left, bottom, left + w, bottom + h}};
    Rect best;
    long best_cost = std::numeric_limits<long>::max();
    for (const auto& r : corners) {
        long cost = 0;
        for (int y = std::max(r.y0, 0); y < std::min(r.y1, img.height()); ++y)
            for (int x = std::max(r.x0, 0); x < std::min(r.x1, img.width()); ++x) {
                const Rgb c = img.at(x, y);
                cost += !(c == background || c == grid_colour);
            }
        if (cost < best_cost) best_cost = cost, best = r;
    }
    img.fill(best.x0, best.y0, best.x1, best.y1, background);
    stroke_rect(img, best, legend_border);
    for (std::size_t i = 0; i < entries.size(); ++i) {
        const int y = best.y0 + m.pad + static_cast<int>(i) * row_h;
        const int x = best.x0 + m.pad;
        const auto& e = entries[i];
        if (!(e.colour == background)) {
            const double mid = y + (7 * m.s) / 2.0;
            if (mark == LegendMark::box) {
                img.fill(x + sample / 4, y, x + sample * 3 / 4, y + 7 * m.s, e.colour);
            } else {
                draw_line(img, x, mid, x + sample - 1, mid, e.colour, m.s, best);
                if (mark == LegendMark::line_and_dot) draw_disc(img, x + sample / 2.0 - 0.5, mid, m.s + 1.0, e.colour, best);
            }
        }
        draw_text(img, x + sample + m.pad, y, e.label, ink, m.s);
    }
    return best;
}

inline void draw_title(Image& img, const std::string& title, const Rect& plot, const Metrics& m) {
    if (title.empty()) return;
    const std::string t = fit_text(title, img.width() - 2 * m.pad, m.s);
    const int w = text_width(t, m.s);
    const int x = std::clamp(plot.x0 + (plot.width() - w) / 2, m.pad, std::max(m.pad, img.width() - m.pad - w));
    draw_text(img, x, m.pad, t, ink, m.s);
}

inline void draw_x_label(Image& img, const std::string& label, const Rect& plot, const Metrics& m) {
    if (label.empty()) return;
    const std::string t = fit_text(label, img.width() - 2 * m.pad, m.s);
    const int w = text_width(t, m.s);
    const int x = std::clamp(plot.x0 + (plot.width() - w) / 2, m.pad, std::max(m.pad, img.width() - m.pad - w));
    draw_text(img, x, img.height() - m.pad - m.th, t, ink, m.s);
}

inline void draw_y_label(Image& img, const std::string& label, const Rect& plot, const Metrics& m) {
    if (label.empty()) return;
    const std::string t = fit_text(label, img.height() - 2 * m.pad, m.s);
    const int w = text_width(t, m.s);
    const int y = std::clamp(plot.y0 + (plot.height() + w) / 2, std::min(w + m.pad, img.height() - m.pad),
                             img.height() - m.pad);
    draw_text(img, m.pad, y, t, ink, m.s, true);
}

// Y ticks on the left of `plot`, with grid lines across it; `labels[i]` at `pixel[i]`.
inline void draw_y_ticks(Image& img, const Rect& plot, const std::vector<double>& pixel,
                         const std::vector<std::string>& labels, const Metrics& m, bool grid) {
    for (std::size_t i = 0; i < pixel.size(); ++i) {
        const int y = static_cast<int>(std::lround(pixel[i]));
        if (grid) img.fill(plot.x0, y, plot.x1, y + 1, grid_colour);
        img.fill(plot.x0 - 1 - m.tick, y, plot.x0 - 1, y + 1, frame_colour);
        const int w = text_width(labels[i], m.s);
        draw_text(img, plot.x0 - 1 - m.tick - m.pad / 2 - w, y - (7 * m.s) / 2, labels[i], ink, m.s);
    }
}

// Total space the y-axis needs left of the plot box.
inline int left_margin(const std::vector<std::string>& labels, bool has_y_label, const Metrics& m) {
    int widest = 0;
    for (const auto& l : labels) widest = std::max(widest, text_width(l, m.s));
    return m.pad + (has_y_label ? m.th + m.pad : 0) + widest + m.pad / 2 + m.tick + 1;
}

inline int top_margin(const std::string& title, const Metrics& m) {
    return m.pad + (title.empty() ? 0 : m.th + m.pad) + m.pad;
}

inline int bottom_margin(bool has_x_label, const Metrics& m) {
    return 1 + m.tick + m.pad / 2 + m.th + (has_x_label ? m.pad : 0) + (has_x_label ? m.th : 0) + m.pad;
}

inline void check_plot_fits(const char* what, const std::string& title, const Rect& plot, int width, int height) {
    check(plot.width() >= 24 && plot.height() >= 24, what, " '", title, "': ", width, "x", height,
          " leaves no room to plot after the labels (plot box ", plot.width(), "x", plot.height(), ")");
}

}  // namespace detail::plot

// "Nice" ticks covering [lo, hi]: a step of 1, 2, 2.5 or 5 times a power of ten, the smallest that
// needs at most max_count ticks, the range extended outwards to multiples of the step (an end
// within 1e-9 steps of a multiple counts as on it, so 0.30000000000000004 ends at 0.3). A range of
// zero width is widened by 10% of the value (or by 1 around zero).
inline Ticks nice_ticks(double lo, double hi, int max_count = 8) {
    check(std::isfinite(lo) && std::isfinite(hi) && lo <= hi, "nice_ticks: range [", lo, ", ", hi,
          "] must be finite and ordered");
    // Two ticks cannot always cover a range across zero on a grid through zero.
    check(max_count >= 3, "nice_ticks: max_count ", max_count, " must be at least 3");
    if (hi - lo <= 1e-12 * std::max(std::abs(lo), std::abs(hi))) {
        const double d = lo == 0 ? 1.0 : 0.1 * std::abs(lo);
        lo -= d;
        hi += d;
    }
    const double raw = (hi - lo) / (max_count - 1);
    double unit = std::pow(10.0, std::floor(std::log10(raw)));
    for (;;) {
        for (double mult : {1.0, 2.0, 2.5, 5.0}) {
            const double step = mult * unit;
            // The tolerance keeps 0.30000000000000004 from becoming one more tick.
            const double first = std::floor(lo / step + 1e-9), last = std::ceil(hi / step - 1e-9);
            if (last - first + 1 > max_count) continue;
            Ticks t;
            t.step = step;
            for (double k = first; k <= last; ++k) t.values.push_back(std::abs(k) < 0.5 ? 0.0 : k * step);
            t.lo = t.values.front();
            t.hi = t.values.back();
            return t;
        }
        unit *= 10;
    }
}

// Ticks for a log axis over [lo, hi] (both > 0): every k-th decade when the range spans two
// decades or more, else 1-2-5 (or 1..9) times powers of ten; extended outwards to ticks.
inline Ticks log_ticks(double lo, double hi, int max_count = 8) {
    check(std::isfinite(lo) && std::isfinite(hi) && lo > 0 && lo <= hi, "log_ticks: range [", lo, ", ", hi,
          "] must be positive, finite and ordered");
    check(max_count >= 3, "log_ticks: max_count ", max_count, " must be at least 3");
    if (hi / lo < 1 + 1e-9) lo /= 2, hi *= 2;
    const double a = std::floor(std::log10(lo) + 1e-9), b = std::ceil(std::log10(hi) - 1e-9);
    Ticks t;
    if (b - a >= 2) {
        const double k = std::ceil((b - a + 1) / max_count);
        const double first = std::floor(a / k) * k, last = std::ceil(b / k) * k;
        for (double e = first; e <= last + 0.5; e += k) t.values.push_back(std::pow(10.0, e));
    } else {
        // All m * 10^e of one mantissa set from the last at or below lo to the first at or above hi.
        auto covering = [&](std::initializer_list<double> mants) {
            std::vector<double> all, out;
            for (double e = a - 1; e <= b + 1; ++e)
                for (double mt : mants) all.push_back(mt * std::pow(10.0, e));
            std::size_t i0 = 0, i1 = all.size() - 1;
            while (i0 + 1 < all.size() && all[i0 + 1] <= lo * (1 + 1e-9)) ++i0;
            while (i1 > 0 && all[i1 - 1] >= hi * (1 - 1e-9)) --i1;
            return std::vector<double>(all.begin() + static_cast<std::ptrdiff_t>(i0),
                                       all.begin() + static_cast<std::ptrdiff_t>(i1) + 1);
        };
        t.values = covering({1, 2, 5});
        if (t.values.size() < 4) {
            auto dense = covering({1, 2, 3, 4, 5, 6, 7, 8, 9});
            if (static_cast<int>(dense.size()) <= max_count) t.values = std::move(dense);
        }
    }
    t.lo = t.values.front();
    t.hi = t.values.back();
    return t;
}

// Colour of series i: the ten tab10 colours, then hues a golden angle apart.
inline Rgb series_colour(std::size_t i) {
    static constexpr std::array<Rgb, 10> tab10 = {{{31, 119, 180},
                                                   {255, 127, 14},
                                                   {44, 160, 44},
                                                   {214, 39, 40},
                                                   {148, 103, 189},
                                                   {140, 86, 75},
                                                   {227, 119, 194},
                                                   {127, 127, 127},
                                                   {188, 189, 34},
                                                   {23, 190, 207}}};
    if (i < tab10.size()) return tab10[i];
    const double h = std::fmod(static_cast<double>(i) * 137.50776405, 360.0) / 60.0, s = 0.7, v = 0.75;
    const double c = v * s, x = c * (1 - std::abs(std::fmod(h, 2.0) - 1)), m = v - c;
    double r = 0, g = 0, b = 0;
    switch (static_cast<int>(h)) {
        case 0: r = c, g = x; break;
        case 1: r = x, g = c; break;
        case 2: g = c, b = x; break;
        case 3: g = x, b = c; break;
        case 4: r = x, b = c; break;
        default: r = c, b = x; break;
    }
    auto byte = [&](double u) { return static_cast<std::uint8_t>(std::lround((u + m) * 255)); };
    return {byte(r), byte(g), byte(b)};
}

// A viridis-like sequential scale, t in [0, 1] (clamped): nine anchors of matplotlib's viridis
// joined linearly. Luma (0.299 R + 0.587 G + 0.114 B) rises with t (by 185 from 0 to 1), up to the
// rounding of each channel to a byte (at most 0.5 of luma).
inline Rgb colormap(double t) {
    static constexpr std::array<Rgb, 9> anchors = {{{68, 1, 84},
                                                    {72, 40, 120},
                                                    {62, 73, 137},
                                                    {49, 104, 142},
                                                    {38, 130, 142},
                                                    {31, 158, 137},
                                                    {53, 183, 121},
                                                    {110, 206, 88},
                                                    {253, 231, 37}}};
    t = std::isfinite(t) ? std::clamp(t, 0.0, 1.0) : 0.0;
    const double p = t * (anchors.size() - 1);
    const auto i = std::min(static_cast<std::size_t>(p), anchors.size() - 2);
    const double f = p - static_cast<double>(i);
    auto mix = [&](std::uint8_t a, std::uint8_t b) { return static_cast<std::uint8_t>(std::lround(a + (b - a) * f)); };
    return {mix(anchors[i].r, anchors[i + 1].r), mix(anchors[i].g, anchors[i + 1].g),
            mix(anchors[i].b, anchors[i + 1].b)};
}

// A line chart of each series in the order of its points. Series with at most 30 finite points
// (and lone points between gaps) also get a dot at each point.
inline Figure render(const LineChart& chart, int width = 800, int height = 500) {
    namespace dp = detail::plot;
    const auto& title = chart.title;
    dp::check_size("line chart", title, width, height);
    check(!chart.series.empty(), "line chart '", title, "': no series to plot");
    auto usable = [&](double x, double y) { return std::isfinite(x) && std::isfinite(y) && (!chart.log_y || y > 0); };
    double x_lo = std::numeric_limits<double>::infinity(), x_hi = -x_lo, y_lo = x_lo, y_hi = -x_lo;
    for (std::size_t i = 0; i < chart.series.size(); ++i) {
        const auto& s = chart.series[i];
        check(!s.x.empty() || !s.y.empty(), "line chart '", title, "': ", dp::series_name(i, s.label), " is empty");
        check(s.x.size() == s.y.size(), "line chart '", title, "': ", dp::series_name(i, s.label), " has ",
              s.x.size(), " x values but ", s.y.size(), " y values");
        for (std::size_t k = 0; k < s.x.size(); ++k)
            if (usable(s.x[k], s.y[k])) {
                x_lo = std::min(x_lo, s.x[k]), x_hi = std::max(x_hi, s.x[k]);
                y_lo = std::min(y_lo, s.y[k]), y_hi = std::max(y_hi, s.y[k]);
            }
    }
    check(x_lo <= x_hi, "line chart '", title, "': no point has finite x and y",
          chart.log_y ? " (with log_y, y must also be > 0)" : "");

    const dp::Metrics m(dp::text_scale(width, height));
    const int top = dp::top_margin(title, m), bottom = dp::bottom_margin(!chart.x_label.empty(), m);
    const int plot_h = height - top - bottom;
    const int max_y_ticks = std::clamp(plot_h / (3 * m.th), 3, 10);
    const Ticks yt = chart.log_y ? log_ticks(y_lo, y_hi, max_y_ticks) : nice_ticks(y_lo, y_hi, max_y_ticks);
    std::vector<std::string> y_labels;
    if (chart.log_y)
        for (double v : yt.values) y_labels.push_back(dp::log_tick_label(v));
    else
        y_labels = dp::tick_labels(yt);
    const int left = dp::left_margin(y_labels, !chart.y_label.empty(), m);
    // The right margin holds half of the last x label; that label depends on the plot width, so
    // settle the two in two rounds.
    int right = m.pad + 3 * m.cw;
    Ticks xt;
    for (int round = 0; round < 2; ++round) {
        xt = dp::fit_x_ticks([&](int n) { return nice_ticks(x_lo, x_hi, n); }, width - left - right, m);
        right = m.pad + std::max(m.cw, dp::text_width(dp::tick_labels(xt).back(), m.s) / 2);
    }
    Figure fig;
    fig.axes.plot = {left, top, width - right, height - bottom};
    dp::check_plot_fits("line chart", title, fig.axes.plot, width, height);
    fig.axes.x_min = xt.lo, fig.axes.x_max = xt.hi;
    fig.axes.log_y = chart.log_y;
    fig.axes.y_min = chart.log_y ? std::log10(yt.lo) : yt.lo;
    fig.axes.y_max = chart.log_y ? std::log10(yt.hi) : yt.hi;
    const Axes& ax = fig.axes;
    const Rect& plot = ax.plot;
    fig.image = Image(width, height, dp::background);
    Image& img = fig.image;

    // Grid, ticks and labels first, so data draw over the grid.
    std::vector<double> ypix;
    for (double v : yt.values) ypix.push_back(ax.px_y(v));
    dp::draw_y_ticks(img, plot, ypix, y_labels, m, true);
    const auto x_labels = dp::tick_labels(xt);
    for (std::size_t i = 0; i < xt.values.size(); ++i) {
        const int x = static_cast<int>(std::lround(ax.px_x(xt.values[i])));
        img.fill(x, plot.y0, x + 1, plot.y1, dp::grid_colour);
        img.fill(x, plot.y1 + 1, x + 1, plot.y1 + 1 + m.tick, dp::frame_colour);
        dp::draw_text(img, x - dp::text_width(x_labels[i], m.s) / 2, plot.y1 + 1 + m.tick + m.pad / 2, x_labels[i],
                      dp::ink, m.s);
    }
    dp::stroke_rect(img, plot, dp::frame_colour);
    dp::draw_title(img, title, plot, m);
    dp::draw_x_label(img, chart.x_label, plot, m);
    dp::draw_y_label(img, chart.y_label, plot, m);

    std::vector<dp::LegendEntry> legend;
    bool any_dots = false;
    for (std::size_t i = 0; i < chart.series.size(); ++i) {
        const auto& s = chart.series[i];
        const Rgb c = series_colour(i);
        std::size_t finite = 0;
        for (std::size_t k = 0; k < s.x.size(); ++k) finite += usable(s.x[k], s.y[k]);
        const bool dots = finite <= 30;
        any_dots |= dots;
        const double r = m.s + 1.0;
        for (std::size_t k = 0; k < s.x.size(); ++k) {
            if (!usable(s.x[k], s.y[k])) continue;
            const double px = ax.px_x(s.x[k]), py = ax.px_y(s.y[k]);
            const bool next = k + 1 < s.x.size() && usable(s.x[k + 1], s.y[k + 1]);
            const bool prev = k > 0 && usable(s.x[k - 1], s.y[k - 1]);
            if (next) dp::draw_line(img, px, py, ax.px_x(s.x[k + 1]), ax.px_y(s.y[k + 1]), c, m.s, plot);
            if (dots || (!next && !prev)) dp::draw_disc(img, px, py, r, c, plot);
        }
        legend.push_back({s.label.empty() ? mopt::detail::concat("series ", i) : s.label, c});
    }
    if (chart.series.size() > 1 || !chart.series[0].label.empty())
        fig.legend = dp::draw_legend(img, plot, legend, any_dots ? dp::LegendMark::line_and_dot : dp::LegendMark::line, m);
    return fig;
}

// Grouped bars: within each category one bar per group, side by side, from 0 to the value.
inline Figure render(const BarChart& chart, int width = 800, int height = 500) {
    namespace dp = detail::plot;
    const auto& title = chart.title;
    dp::check_size("bar chart", title, width, height);
    check(!chart.categories.empty(), "bar chart '", title, "': no categories");
    check(!chart.groups.empty(), "bar chart '", title, "': no groups to plot");
    const std::size_t n_cat = chart.categories.size(), n_group = chart.groups.size();
    double lo = 0, hi = 0;
    std::size_t finite = 0;
    for (std::size_t g = 0; g < n_group; ++g) {
        const auto& s = chart.groups[g];
        check(!s.y.empty(), "bar chart '", title, "': group ", g, s.label.empty() ? "" : " '", s.label,
              s.label.empty() ? "" : "'", " is empty");
        check(s.y.size() == n_cat, "bar chart '", title, "': group ", g, s.label.empty() ? "" : " '", s.label,
              s.label.empty() ? "" : "'", " has ", s.y.size(), " values for ", n_cat, " categories");
        check(s.x.empty() || s.x.size() == s.y.size(), "bar chart '", title, "': group ", g,
              s.label.empty() ? "" : " '", s.label, s.label.empty() ? "" : "'", " has ", s.x.size(), " x values but ",
              s.y.size(), " y values (x is unused; leave it empty)");
        for (double v : s.y)
            if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v), ++finite;
    }
    check(finite > 0, "bar chart '", title, "': no finite value to plot");

    const dp::Metrics m(dp::text_scale(width, height));
    const int top = dp::top_margin(title, m), bottom = dp::bottom_margin(!chart.x_label.empty(), m);
    const int plot_h = height - top - bottom;
    const Ticks yt = nice_ticks(lo, hi, std::clamp(plot_h / (3 * m.th), 3, 10));
    const auto y_labels = dp::tick_labels(yt);
    const int left = dp::left_margin(y_labels, !chart.y_label.empty(), m);
    const int right = m.pad + m.cw;
    Figure fig;
    fig.axes.plot = {left, top, width - right, height - bottom};
    dp::check_plot_fits("bar chart", title, fig.axes.plot, width, height);
    fig.axes.x_min = 0, fig.axes.x_max = static_cast<double>(n_cat);
    fig.axes.y_min = yt.lo, fig.axes.y_max = yt.hi;
    const Axes& ax = fig.axes;
    const Rect& plot = ax.plot;
    fig.image = Image(width, height, dp::background);
    Image& img = fig.image;

    std::vector<double> ypix;
    for (double v : yt.values) ypix.push_back(ax.px_y(v));
    dp::draw_y_ticks(img, plot, ypix, y_labels, m, true);

    // Category c owns [c, c+1) of the x range; its bars fill the middle 80%.
    const double slot = static_cast<double>(plot.width()) / static_cast<double>(n_cat);
    const double bar_w = 0.8 * slot / static_cast<double>(n_group);
    const int base = static_cast<int>(std::lround(ax.px_y(std::clamp(0.0, yt.lo, yt.hi))));
    fig.bars.resize(n_group * n_cat);
    for (std::size_t g = 0; g < n_group; ++g)
        for (std::size_t c = 0; c < n_cat; ++c) {
            const double v = chart.groups[g].y[c];
            if (!std::isfinite(v)) continue;
            const double x0 = plot.x0 + slot * (static_cast<double>(c) + 0.1) + bar_w * static_cast<double>(g);
            int xa = static_cast<int>(std::lround(x0)), xb = static_cast<int>(std::lround(x0 + bar_w));
            if (xb <= xa) xb = xa + 1;
            const int yv = static_cast<int>(std::lround(ax.px_y(v)));
            Rect r{xa, std::min(yv, base), xb, std::max(yv, base) + 1};
            r = {std::max(r.x0, plot.x0), std::max(r.y0, plot.y0), std::min(r.x1, plot.x1), std::min(r.y1, plot.y1)};
            img.fill(r.x0, r.y0, r.x1, r.y1, series_colour(g));
            fig.bars[g * n_cat + c] = r;
        }
    if (yt.lo < 0 && yt.hi > 0) img.fill(plot.x0, base, plot.x1, base + 1, dp::frame_colour);

    // Category labels: every k-th where they would collide, cut to the room they have.
    int widest = 0;
    for (const auto& l : chart.categories) widest = std::max(widest, dp::text_width(l, m.s));
    const auto every = static_cast<std::size_t>(std::max(1.0, std::ceil((std::min(widest, 12 * m.cw) + m.cw) / slot)));
    for (std::size_t c = 0; c < n_cat; c += every) {
        const std::string l = dp::fit_text(chart.categories[c], static_cast<int>(slot * static_cast<double>(every)) - m.cw, m.s);
        const int x = static_cast<int>(std::lround(plot.x0 + slot * (static_cast<double>(c) + 0.5)));
        img.fill(x, plot.y1 + 1, x + 1, plot.y1 + 1 + m.tick, dp::frame_colour);
        dp::draw_text(img, x - dp::text_width(l, m.s) / 2, plot.y1 + 1 + m.tick + m.pad / 2, l, dp::ink, m.s);
    }
    dp::stroke_rect(img, plot, dp::frame_colour);
    dp::draw_title(img, title, plot, m);
    dp::draw_x_label(img, chart.x_label, plot, m);
    dp::draw_y_label(img, chart.y_label, plot, m);
    if (n_group > 1 || !chart.groups[0].label.empty()) {
        std::vector<dp::LegendEntry> legend;
        for (std::size_t g = 0; g < n_group; ++g)
            legend.push_back({chart.groups[g].label.empty() ? mopt::detail::concat("group ", g) : chart.groups[g].label,
                              series_colour(g)});
        fig.legend = dp::draw_legend(img, plot, legend, dp::LegendMark::box, m);
    }
    return fig;
}

// Cells coloured by value on one scale from the smallest to the largest finite value (cells
// without a finite value are grey), a colour bar on the right, values printed where they fit.
inline Figure render(const Heatmap& map, int width = 800, int height = 500) {
    namespace dp = detail::plot;
    const auto& title = map.title;
    dp::check_size("heatmap", title, width, height);
    check(!map.values.empty() && !map.values[0].empty(), "heatmap '", title, "': no values (", map.values.size(),
          " rows)");
    const std::size_t rows = map.values.size(), cols = map.values[0].size();
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (std::size_t r = 0; r < rows; ++r) {
        check(map.values[r].size() == cols, "heatmap '", title, "': row ", r, " has ", map.values[r].size(),
              " values but row 0 has ", cols);
        for (double v : map.values[r])
            if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
    }
    check(lo <= hi, "heatmap '", title, "': no finite value to plot");
    check(map.row_labels.empty() || map.row_labels.size() == rows, "heatmap '", title, "': ", map.row_labels.size(),
          " row_labels for ", rows, " rows");
    check(map.col_labels.empty() || map.col_labels.size() == cols, "heatmap '", title, "': ", map.col_labels.size(),
          " col_labels for ", cols, " columns");
    auto row_label = [&](std::size_t r) { return map.row_labels.empty() ? std::to_string(r) : map.row_labels[r]; };
    auto col_label = [&](std::size_t c) { return map.col_labels.empty() ? std::to_string(c) : map.col_labels[c]; };

    const dp::Metrics m(dp::text_scale(width, height));
    const int top = dp::top_margin(title, m), bottom = dp::bottom_margin(!map.x_label.empty(), m);
    const int plot_h = height - top - bottom;
    // Colour-bar ticks: nice values inside [lo, hi] (the bar spans exactly the data); the ends
    // themselves when no nice value falls inside, or when all values are equal.
    std::vector<double> bar_ticks;
    std::vector<std::string> bar_labels;
    if (hi > lo) {
        Ticks bt = nice_ticks(lo, hi, std::clamp(plot_h / (3 * m.th), 3, 8));
        std::erase_if(bt.values, [&](double v) { return v < lo - 1e-9 * (hi - lo) || v > hi + 1e-9 * (hi - lo); });
        bar_ticks = bt.values;
        if (!bar_ticks.empty()) bar_labels = dp::tick_labels(bt);
    }
    if (bar_ticks.empty()) {
        bar_ticks = hi > lo ? std::vector<double>{lo, hi} : std::vector<double>{lo};
        for (double v : bar_ticks) bar_labels.push_back(dp::compact_number(v));
    }
    int bar_label_w = 0;
    for (const auto& l : bar_labels) bar_label_w = std::max(bar_label_w, dp::text_width(l, m.s));
    const int bar_w = 3 * m.cw;
    const int right = 3 * m.pad + bar_w + 1 + m.tick + m.pad / 2 + bar_label_w + m.pad;

    std::vector<std::string> y_labels;
    for (std::size_t r = 0; r < rows; ++r) y_labels.push_back(dp::fit_text(row_label(r), 16 * m.cw, m.s));
    const int left = dp::left_margin(y_labels, !map.y_label.empty(), m);
    Figure fig;
    fig.axes.plot = {left, top, width - right, height - bottom};
    dp::check_plot_fits("heatmap", title, fig.axes.plot, width, height);
    fig.axes.x_min = 0, fig.axes.x_max = static_cast<double>(cols);
    fig.axes.y_min = 0, fig.axes.y_max = static_cast<double>(rows);
    fig.value_min = lo, fig.value_max = hi;
    const Rect& plot = fig.axes.plot;
    fig.image = Image(width, height, dp::background);
    Image& img = fig.image;

    auto edge_x = [&](std::size_t c) {
        return plot.x0 + static_cast<int>(std::lround(static_cast<double>(c) * plot.width() / static_cast<double>(cols)));
    };
    auto edge_y = [&](std::size_t r) {
        return plot.y0 + static_cast<int>(std::lround(static_cast<double>(r) * plot.height() / static_cast<double>(rows)));
    };
    auto colour_of = [&](double v) { return hi > lo ? colormap((v - lo) / (hi - lo)) : colormap(0.5); };
    fig.cells.resize(rows * cols);
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c) {
            const Rect cell{edge_x(c), edge_y(r), edge_x(c + 1), edge_y(r + 1)};
            fig.cells[r * cols + c] = cell;
            const double v = map.values[r][c];
            const Rgb fill = std::isfinite(v) ? colour_of(v) : dp::missing_colour;
            img.fill(cell.x0, cell.y0, cell.x1, cell.y1, fill);
            if (!map.annotate || !std::isfinite(v)) continue;
            const std::string text = dp::compact_number(v);
            for (int s = m.s; s >= 1; --s) {  // the largest scale that fits, down to the font's own size
                const int tw = dp::text_width(text, s), th = 7 * s;
                if (tw > cell.width() - 2 * s || th > cell.height() - 2 * s) continue;
                dp::draw_text(img, cell.x0 + (cell.width() - tw) / 2, cell.y0 + (cell.height() - th) / 2, text,
                              dp::luma(fill) < 128 ? Rgb{255, 255, 255} : dp::ink, s);
                break;
            }
        }
    dp::stroke_rect(img, plot, dp::frame_colour);

    // Row labels: every k-th where rows are shorter than the text.
    const double cell_h = static_cast<double>(plot.height()) / static_cast<double>(rows);
    const auto row_every = static_cast<std::size_t>(std::max(1.0, std::ceil((m.th + m.s) / cell_h)));
    for (std::size_t r = 0; r < rows; r += row_every) {
        const int y = (edge_y(r) + edge_y(r + 1)) / 2;
        const auto& l = y_labels[r];
        img.fill(plot.x0 - 1 - m.tick, y, plot.x0 - 1, y + 1, dp::frame_colour);
        dp::draw_text(img, plot.x0 - 1 - m.tick - m.pad / 2 - dp::text_width(l, m.s), y - (7 * m.s) / 2, l, dp::ink,
                      m.s);
    }
    const double cell_w = static_cast<double>(plot.width()) / static_cast<double>(cols);
    int widest = 0;
    for (std::size_t c = 0; c < cols; ++c) widest = std::max(widest, dp::text_width(col_label(c), m.s));
    const auto col_every = static_cast<std::size_t>(std::max(1.0, std::ceil((std::min(widest, 12 * m.cw) + m.cw) / cell_w)));
    for (std::size_t c = 0; c < cols; c += col_every) {
        const int x = (edge_x(c) + edge_x(c + 1)) / 2;
        const std::string l = dp::fit_text(col_label(c), static_cast<int>(cell_w * static_cast<double>(col_every)) - m.cw, m.s);
        img.fill(x, plot.y1 + 1, x + 1, plot.y1 + 1 + m.tick, dp::frame_colour);
        dp::draw_text(img, x - dp::text_width(l, m.s) / 2, plot.y1 + 1 + m.tick + m.pad / 2, l, dp::ink, m.s);
    }

    // Colour bar, value lo at the bottom row and hi at the top row.
    fig.colorbar = {plot.x1 + 3 * m.pad, plot.y0, plot.x1 + 3 * m.pad + bar_w, plot.y1};
    const Rect& bar = fig.colorbar;
    for (int y = bar.y0; y < bar.y1; ++y) {
        const double t = bar.height() > 1 ? static_cast<double>(bar.y1 - 1 - y) / (bar.height() - 1) : 0.5;
        img.fill(bar.x0, y, bar.x1, y + 1, hi > lo ? colormap(t) : colormap(0.5));
    }
    dp::stroke_rect(img, bar, dp::frame_colour);
    for (std::size_t i = 0; i < bar_ticks.size(); ++i) {
        const double t = hi > lo ? (bar_ticks[i] - lo) / (hi - lo) : 0.5;
        const int y = static_cast<int>(std::lround(bar.y1 - 1 - t * (bar.height() - 1)));
        img.fill(bar.x1 + 1, y, bar.x1 + 1 + m.tick, y + 1, dp::frame_colour);
        dp::draw_text(img, bar.x1 + 1 + m.tick + m.pad / 2, y - (7 * m.s) / 2, bar_labels[i], dp::ink, m.s);
    }
    dp::draw_title(img, title, plot, m);
    dp::draw_x_label(img, map.x_label, plot, m);
    dp::draw_y_label(img, map.y_label, plot, m);
    return fig;
}

namespace detail::plot {
template <class Chart>
void write_chart(const std::filesystem::path& file, const Chart& chart, int width, int height) {
    Figure fig;
    try {
        fig = render(chart, width, height);
    } catch (const Error& e) {
        throw Error(mopt::detail::concat("write_png '", file.string(), "': ", e.what()));
    }
    std::vector<std::pair<std::string, std::string>> text = {{"Software", "mopt"}};
    if (!chart.title.empty()) text.emplace_back("Title", chart.title);
    eval::write_png(file, fig.image, PngDeflate::fixed_huffman, text);
}
}  // namespace detail::plot

// Renders and writes the chart as PNG, atomically (temporary file beside it, then rename).
inline void write_png(const std::filesystem::path& file, const LineChart& chart, int width = 800, int height = 500) {
    detail::plot::write_chart(file, chart, width, height);
}
inline void write_png(const std::filesystem::path& file, const BarChart& chart, int width = 800, int height = 500) {
    detail::plot::write_chart(file, chart, width, height);
}
inline void write_png(const std::filesystem::path& file, const Heatmap& chart, int width = 800, int height = 500) {
    detail::plot::write_chart(file, chart, width, height);
}

}  // namespace mopt::eval
