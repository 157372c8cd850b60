// Index layouts of the VLM vision towers of issue 20, as pure functions: the pixel rows Qwen's ViT
// consumes (temporal pairs, merge-window order), the patch coordinates that drive its 2-D rotary, the
// Qwen2.5-VL attention windows, and Idefics3 / SmolVLM's pixel shuffle.
//
// References: tests/vlm_numpy.py (qwen_patchify, patch_coords, window_ids, pixel_shuffle), checked
// against transformers; docs/families.md §2-§5.
#pragma once
#include <cstdint>
#include <vector>

namespace x2l {

// Pixel rows of one temporal patch for Qwen's ViT. frames: [temporal, 3, H, W] normalized pixels
// (H, W multiples of patch * merge; an image passes the same frame `temporal` times). rows:
// [(H/patch) * (W/patch), 3 * temporal * patch * patch], features ordered (channel, frame, y, x), rows
// ordered by merge window (merge x merge patches the merger fuses are consecutive), then (row, col)
// inside the window. Throws std::invalid_argument on a size that is not a multiple of patch * merge.
void qwen_patch_rows(const float* frames, int temporal, int height, int width, int patch, int merge, float* rows);

// Patch (row, col) of each of qwen_patch_rows' rows for an h x w patch grid (row-major over merge
// windows, then inside the window): the positions of the ViT's 2-D rotary, rows [2, h*w].
void qwen_patch_coords(int h, int w, int merge, int32_t* row, int32_t* col);

// Qwen2.5-VL window attention for one temporal patch of an h x w patch grid. The merged grid
// (h/merge x w/merge cells) is tiled from its top-left corner into window_cells x window_cells windows
// (window_cells = window_size / (patch * merge); the last row/column may be partial).
struct WindowLayout {
    std::vector<int32_t> window_of_token;  // [h*w], in qwen_patch_rows order: window id, row-major over windows
    std::vector<int32_t> unit_order;       // [h*w / merge^2]: merge units (groups of merge^2 rows) window by window
    std::vector<int32_t> window_tokens;    // tokens per window in that order (empty windows left out)
};
WindowLayout qwen_windows(int h, int w, int merge, int window_cells);

// Pixel shuffle (space to depth) of a square token grid: x [side*side, c] (raster order) ->
// y [(side/scale)^2, c*scale^2]; output token (i, j) concatenates input tokens (i*scale + dy, j*scale + dx)
// over dy then dx: y[i*g + j][(dy*scale + dx)*c + k] = x[(i*scale + dy)*side + j*scale + dx][k].
// Throws std::invalid_argument when side is not a multiple of scale.
void pixel_shuffle(const float* x, int side, int64_t c, int scale, float* y);

}  // namespace x2l
