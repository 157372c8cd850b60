// The tiered KV store of one prefilled input ("video index"): an uncompressed sink, and for every
// chunk its L-KVs (low compression, host tier) and H-KVs (high compression, quantized, device
// tier), plus cheap retrieval signatures computed before compression. Saved indexes are
// reloaded (in memory, or with the L tier memory-mapped), so a video is indexed once and queried later.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/kv_cache.h"

namespace x2l {

struct ChunkKV {
    int64_t tok_begin = 0, tok_end = 0;  // raw input tokens of the chunk (indices into the input)
    int32_t pos_begin = 0, pos_end = 0;  // positions those tokens had
    int n_frames = 1;                    // frames (video) or sub-blocks (text) in the chunk
    // Shared: a snapshot of a prefill in progress (X2LPrefill::snapshot) holds the same rows.
    std::shared_ptr<KVSegment> low, high;
    std::vector<float> key_sig;  // [n_layer, n_head_kv, n, head_dim] distinctive pre-RoPE L keys (select.h)
    std::vector<float> emb_sig;  // [n_frames, n_embd] mean input embedding per frame
    // [n_rows, n_embd] f16: the chunk's most distinctive input rows (the maxsim scorer, select.h);
    // empty in indexes saved by formats 3 and 4.
    std::vector<uint16_t> row_sig;
    // [n_layer, n_head_kv, low entries] position of every L row: the training-free compressor keeps
    // different tokens per layer and head, while low->pos() holds one position per entry (those of
    // layer 0, head 0). Empty when every head keeps the same tokens (beacon).
    std::vector<int32_t> low_pos;
    int32_t low_row_pos(int layer, int head, int64_t e) const {
        return low_pos.empty() ? low->pos(e)
                               : low_pos[(static_cast<size_t>(layer) * low->n_head_kv() + head) * low->size() + e];
    }
};

// The training-free compressors' names (X2LOptions::compressor, high_compressor; an index records them).
inline bool is_training_free_rule(const std::string& r) {
    return r == "snapkv" || r == "kvzip" || r == "keydiff" || r == "hybrid";
}

struct TierBytes {
    size_t sink = 0, low = 0, high = 0, signatures = 0;
};

class VideoIndex {
  public:
    VideoIndex(int n_layer, int n_head_kv, int head_dim, int n_embd);
    ~VideoIndex();
    VideoIndex(const VideoIndex&) = delete;
    VideoIndex& operator=(const VideoIndex&) = delete;

    int n_layer, n_head_kv, head_dim, n_embd;
    int ratio_low = 2, ratio_high = 32;
    bool pin_ends = false;
    bool two_pass = true;
    std::string compressor = "snapkv";
    // Beacon indexes number cache entries densely (Video-XL): a mixed cache re-rotates the keys of
    // every chunk to its new place. SnapKV indexes keep the tokens' original positions.
    bool dense_positions = false;
    int32_t next_pos = 0;  // position of the first token after the indexed input
    // M-RoPE media (Qwen2-VL): where the question's text continues (the run's text-after position), which
    // differs from next_pos (entries are counted there, positions are 3-D); -1: next_pos. Entries keep
    // the rotation of their 3-D positions, so this is the one M-RoPE field an index needs to be saved.
    int32_t text_pos = -1;
    uint64_t model_fingerprint = 0;  // LlmModel::fingerprint() of the model that built it
    std::shared_ptr<KVSegment> sink;
    std::vector<ChunkKV> chunks;
    std::vector<int32_t> sink_tokens;

    TierBytes bytes() const;
    size_t low_bytes(size_t chunk) const { return chunks[chunk].low->used_bytes(); }
    size_t high_bytes(size_t chunk) const { return chunks[chunk].high->used_bytes(); }

    // Binary format (docs/security.md): checksummed sections (header, sink, then per chunk: meta, H
    // rows, L rows), 64-byte aligned. Every field is validated against the others on load; format 3
    // files (no text position) still load, other format versions are refused.
    void save(const std::string& path) const;
    // mmap=false: the file is read into memory (read-only once checked), so later changes to the
    // file cannot reach this index. mmap=true: the L rows stay in a private read-only mapping of the
    // file (indexes larger than RAM); their checksums are verified before their first use
    // (check_low) and the file is re-checked for changes before every use.
    static std::unique_ptr<VideoIndex> load(const std::string& path, bool mmap = false);
    // Parses an in-memory image (copied), as load(mmap=false) does a file. verify_checksums=false is
    // for fuzzers, so that mutations reach the field validation behind the checksums.
    static std::unique_ptr<VideoIndex> from_bytes(const uint8_t* data, size_t size, bool verify_checksums = true);

    // Before chunk c's L rows are read. Mapped indexes: throws FormatError when the file changed since
    // it was loaded or the rows' checksum is wrong (verified once). Nothing to do for in-memory ones.
    void check_low(size_t chunk) const;
    // Mapped indexes: throws FormatError when the file's size or modification time changed since load.
    void check_file() const;
    bool file_mapped() const;  // L rows read from a file mapping (load(mmap=true))

    struct Backing;  // the memory the views point into (kv_store.cpp)

  private:
    // Validates the image in b and builds the index over it (views into b, which it then owns).
    static std::unique_ptr<VideoIndex> parse(std::unique_ptr<Backing> b, size_t size, bool verify, bool lazy_low);
    std::unique_ptr<Backing> backing_;
};

}  // namespace x2l
