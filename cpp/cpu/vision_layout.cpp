#include "cpu/vision_layout.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace x2l {

namespace {

void check_grid(int h, int w, int merge) {
    if (merge < 1 || h < merge || w < merge || h % merge || w % merge) {
        throw std::invalid_argument("patch grid " + std::to_string(h) + "x" + std::to_string(w) +
                                    " is not a positive multiple of the merge size " + std::to_string(merge));
    }
}

}  // namespace

void qwen_patch_coords(int h, int w, int merge, int32_t* row, int32_t* col) {
    check_grid(h, w, merge);
    int64_t k = 0;
    for (int by = 0; by < h; by += merge) {
        for (int bx = 0; bx < w; bx += merge) {
            for (int dy = 0; dy < merge; ++dy) {
                for (int dx = 0; dx < merge; ++dx, ++k) {
                    row[k] = by + dy;
                    col[k] = bx + dx;
                }
            }
        }
    }
}

void qwen_patch_rows(const float* frames, int temporal, int height, int width, int patch, int merge, float* rows) {
    if (temporal < 1 || patch < 1 || height % (patch * merge) || width % (patch * merge) || height <= 0 || width <= 0) {
        throw std::invalid_argument("frame size " + std::to_string(height) + "x" + std::to_string(width) +
                                    " is not a positive multiple of patch * merge = " + std::to_string(patch * merge));
    }
    const int h = height / patch, w = width / patch;
    std::vector<int32_t> r(static_cast<size_t>(h) * w), c(r.size());
    qwen_patch_coords(h, w, merge, r.data(), c.data());
    const int64_t plane = static_cast<int64_t>(height) * width;
    const int64_t row_len = 3LL * temporal * patch * patch;
    for (size_t k = 0; k < r.size(); ++k) {
        float* out = rows + static_cast<int64_t>(k) * row_len;  // [3, temporal, patch, patch]
        for (int ch = 0; ch < 3; ++ch) {
            for (int f = 0; f < temporal; ++f) {
                const float* src = frames + (static_cast<int64_t>(f) * 3 + ch) * plane;
                for (int y = 0; y < patch; ++y) {
                    const float* line = src + static_cast<int64_t>(r[k] * patch + y) * width + c[k] * patch;
                    std::memcpy(out, line, sizeof(float) * patch);
                    out += patch;
                }
            }
        }
    }
}

WindowLayout qwen_windows(int h, int w, int merge, int window_cells) {
    check_grid(h, w, merge);
    if (window_cells < 1) throw std::invalid_argument("window_cells must be >= 1");
    const int gh = h / merge, gw = w / merge;                    // merged cells
    const int nwh = (gh + window_cells - 1) / window_cells;     // windows per column
    const int nww = (gw + window_cells - 1) / window_cells;     // windows per row
    const int unit = merge * merge;
    WindowLayout out;
    out.window_of_token.resize(static_cast<size_t>(h) * w);
    for (int cy = 0; cy < gh; ++cy) {
        for (int cx = 0; cx < gw; ++cx) {
            const int win = (cy / window_cells) * nww + cx / window_cells;
            const int64_t first = (static_cast<int64_t>(cy) * gw + cx) * unit;  // qwen_patch_rows order
            for (int u = 0; u < unit; ++u) out.window_of_token[first + u] = win;
        }
    }
    for (int wy = 0; wy < nwh; ++wy) {
        for (int wx = 0; wx < nww; ++wx) {
            int count = 0;
            for (int cy = wy * window_cells; cy < gh && cy < (wy + 1) * window_cells; ++cy) {
                for (int cx = wx * window_cells; cx < gw && cx < (wx + 1) * window_cells; ++cx, ++count) {
                    out.unit_order.push_back(cy * gw + cx);
                }
            }
            if (count) out.window_tokens.push_back(count * unit);
        }
    }
    return out;
}

void pixel_shuffle(const float* x, int side, int64_t c, int scale, float* y) {
    if (scale < 1 || side < scale || side % scale) {
        throw std::invalid_argument("pixel shuffle: grid side " + std::to_string(side) + " is not a multiple of scale " +
                                    std::to_string(scale));
    }
    const int g = side / scale;
    for (int i = 0; i < g; ++i) {
        for (int j = 0; j < g; ++j) {
            float* out = y + (static_cast<int64_t>(i) * g + j) * c * scale * scale;
            for (int dy = 0; dy < scale; ++dy) {
                for (int dx = 0; dx < scale; ++dx, out += c) {
                    const int64_t src = static_cast<int64_t>(i * scale + dy) * side + j * scale + dx;
                    std::memcpy(out, x + src * c, sizeof(float) * c);
                }
            }
        }
    }
}

}  // namespace x2l
