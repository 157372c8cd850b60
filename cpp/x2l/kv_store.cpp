#include "x2l/kv_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "core/common.h"
#include "core/hash.h"

namespace x2l {

namespace {

// Format 5: every section is followed by the XXH64 of its bytes; the header ends with the M-RoPE text
// position and every chunk's meta with its row signature (docs/security.md). Formats 3 (neither
// field) and 4 (no row signature) are still read.
constexpr char kMagic[8] = {'X', '2', 'L', 'I', 'D', 'X', '0', '5'};
constexpr size_t kAlign = 64;
// Bounds of a header a loader accepts (the model loader's, or tighter where the KV layout needs it).
constexpr int kMaxLayers = 4096, kMaxHeadsKv = 4096, kMaxHeadDim = 256, kMaxEmbd = 1 << 24, kMaxRatio = 1 << 20;
constexpr uint32_t kMaxCompressorName = 64;
// Largest M-RoPE text position accepted: the answer's positions count up from it in int32.
constexpr int32_t kMaxTextPos = 1 << 30;

bool tier_type(uint32_t t) {
    return t == static_cast<uint32_t>(DType::F32) || t == static_cast<uint32_t>(DType::F16) ||
           t == static_cast<uint32_t>(DType::Q8_0) || t == static_cast<uint32_t>(DType::Q4_0);
}

// a * b, refused when it overflows size_t (sizes read from a file are never trusted to fit).
size_t mul(size_t a, size_t b) {
    size_t r;
    if (__builtin_mul_overflow(a, b, &r)) throw FormatError("corrupt video index: a size overflows");
    return r;
}

class Writer {
  public:
    explicit Writer(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
        if (!f_) {
            const int err = errno;
            throw FileError(err, path, "cannot write '" + path + "': " + std::strerror(err));
        }
    }
    ~Writer() {
        if (f_) std::fclose(f_);
    }
    void bytes(const void* p, size_t n) {
        if (n && std::fwrite(p, 1, n, f_) != n) throw Error("write failed for '" + path_ + "'");
        hash_.update(p, n);
        off_ += n;
    }
    template <typename T>
    void pod(const T& v) { bytes(&v, sizeof(T)); }
    void align() {
        static const uint8_t zeros[kAlign] = {0};
        bytes(zeros, (kAlign - off_ % kAlign) % kAlign);
    }
    // Ends a section: its checksum, then padding to the next section.
    void end_section() {
        const uint64_t h = hash_.digest();
        bytes(&h, sizeof(h));
        align();
        hash_ = Xxh64();
    }
    void close() {
        if (std::fclose(f_) != 0) {
            f_ = nullptr;
            throw Error("write failed for '" + path_ + "'");
        }
        f_ = nullptr;
    }

  private:
    std::string path_;
    FILE* f_;
    size_t off_ = 0;
    Xxh64 hash_;
};

// A section's place in the file and the checksum stored after it.
struct Section {
    size_t begin = 0, size = 0;
    uint64_t hash = 0;
    bool ok(const uint8_t* base) const { return xxh64(base + begin, size) == hash; }
};

class Reader {
  public:
    Reader(const uint8_t* base, size_t size) : base_(base), size_(size) {}
    const uint8_t* take(size_t n) {
        if (n > size_ - off_) throw FormatError("truncated video index");
        const uint8_t* p = base_ + off_;
        off_ += n;
        return p;
    }
    template <typename T>
    T pod() {
        T v;
        std::memcpy(&v, take(sizeof(T)), sizeof(T));
        return v;
    }
    void align() { take((kAlign - off_ % kAlign) % kAlign); }
    Section end_section() {
        Section s{begin_, off_ - begin_, 0};
        s.hash = pod<uint64_t>();
        align();
        begin_ = off_;
        return s;
    }
    size_t offset() const { return off_; }
    size_t size() const { return size_; }

  private:
    const uint8_t* base_;
    size_t size_;
    size_t off_ = 0, begin_ = 0;
};

// False when a row holds a NaN or infinity (f32/f16 values, q8_0/q4_0 block scales). The loops
// OR-reduce without an early exit so that they vectorize; the index is checked a block at a time.
template <typename Word>
bool no_all_ones_exponent(const uint8_t* p, size_t n_words, size_t stride_words, Word exp_mask) {
    constexpr size_t kBlock = 4096;
    for (size_t b = 0; b < n_words; b += kBlock) {
        const size_t e = std::min(n_words, b + kBlock);
        Word bad = 0;
        for (size_t i = b; i < e; ++i) {
            Word v;
            std::memcpy(&v, p + i * stride_words * sizeof(Word), sizeof(Word));
            bad |= static_cast<Word>((v & exp_mask) == exp_mask);
        }
        if (bad) return false;
    }
    return true;
}

bool rows_finite(DType t, const uint8_t* p, size_t bytes) {
    switch (t) {
        case DType::F32: return no_all_ones_exponent<uint32_t>(p, bytes / 4, 1, 0x7F800000u);
        case DType::F16: return no_all_ones_exponent<uint16_t>(p, bytes / 2, 1, 0x7C00u);
        default: {  // q8_0 / q4_0: an f16 scale at the start of every block (34 or 18 bytes: an even stride)
            const size_t bb = type_info(t).block_bytes;
            return no_all_ones_exponent<uint16_t>(p, bytes / bb, bb / 2, 0x7C00u);
        }
    }
}

bool floats_finite(const std::vector<float>& v) {
    for (float x : v) {
        if (!std::isfinite(x)) return false;
    }
    return true;
}

void write_segment(Writer& w, const KVSegment& s) {
    w.pod<uint32_t>(static_cast<uint32_t>(s.type()));
    w.pod<int64_t>(s.size());
    w.align();
    // Rows are written compactly ([layer][head][entry] with stride = size), whatever the capacity.
    for (int part = 0; part < 2; ++part) {
        for (int l = 0; l < s.n_layer(); ++l) {
            for (int h = 0; h < s.n_head_kv(); ++h) {
                const uint8_t* row = part == 0 ? s.k_row(l, h, 0) : s.v_row(l, h, 0);
                w.bytes(row, s.row_bytes() * static_cast<size_t>(s.size()));
            }
        }
        w.align();
    }
    w.bytes(s.pos_data(), sizeof(int32_t) * static_cast<size_t>(s.size()));
    w.end_section();
}

// A segment section: rows stay where they are (views into the loaded image or mapping).
struct SegmentRead {
    std::unique_ptr<KVSegment> seg;
    Section section;
    bool finite() const {  // K and V rows separately: each starts a block at its own 64-byte boundary
        const size_t part = seg->layer_bytes() * seg->n_layer();
        return rows_finite(seg->type(), seg->k_data(), part) && rows_finite(seg->type(), seg->v_data(), part);
    }
};

SegmentRead read_segment(Reader& r, const VideoIndex& ix, const char* what) {
    const uint32_t type = r.pod<uint32_t>();
    const int64_t n = r.pod<int64_t>();
    if (!tier_type(type)) {
        throw FormatError(std::string("corrupt video index: ") + what + " KV type " + std::to_string(type) +
                          " is not f32, f16, q8_0 or q4_0");
    }
    const DType t = static_cast<DType>(type);
    if (ix.head_dim % type_info(t).block_size != 0) {
        throw FormatError(std::string("corrupt video index: head_dim is not a multiple of the ") + what +
                          " type's block size");
    }
    if (n < 0 || n > INT32_MAX) throw FormatError(std::string("corrupt video index: ") + what + " entry count out of range");
    r.align();
    const size_t part = mul(mul(mul(row_bytes(t, ix.head_dim), static_cast<size_t>(n)), ix.n_layer), ix.n_head_kv);
    SegmentRead out;
    const uint8_t* k = r.take(part);
    r.align();
    const uint8_t* v = r.take(part);
    r.align();
    const int32_t* pos = reinterpret_cast<const int32_t*>(r.take(mul(sizeof(int32_t), static_cast<size_t>(n))));
    out.section = r.end_section();
    out.seg = KVSegment::view(t, ix.n_layer, ix.n_head_kv, ix.head_dim, n, k, v, pos);
    return out;
}

[[noreturn]] void bad_chunk(size_t c, const std::string& why) {
    throw FormatError("corrupt video index: chunk " + std::to_string(c) + ": " + why);
}

}  // namespace

// The memory the index's views point into: an anonymous read-only copy of the file, or (mmap loads)
// a private read-only mapping of it, with what is needed to notice that the file changed.
struct VideoIndex::Backing {
    void* base = nullptr;
    size_t size = 0;  // of the mapping (> 0 whenever base is set)
    bool file_mapped = false;
    int fd = -1;
    std::string path;
    struct stat at_load {};
    std::vector<Section> low;  // per chunk, verified lazily when file_mapped
    std::vector<char> low_ok;
    std::mutex mu;

    ~Backing() {
        if (base) munmap(base, size);
        if (fd >= 0) ::close(fd);
    }
    const uint8_t* bytes() const { return static_cast<const uint8_t*>(base); }
};

namespace {

// Anonymous, page-aligned memory for a copy of an index image (made read-only once filled).
std::unique_ptr<VideoIndex::Backing> anonymous_backing(size_t size) {
    auto b = std::make_unique<VideoIndex::Backing>();
    const size_t len = size > 0 ? size : 1;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) throw BudgetError("cannot allocate " + std::to_string(size) + " bytes for a video index");
    b->base = p;
    b->size = len;
    return b;
}

}  // namespace

// Checksums verified unless !verify, and then except the L rows' when lazy_low.
std::unique_ptr<VideoIndex> VideoIndex::parse(std::unique_ptr<Backing> b, size_t size, bool verify, bool lazy_low) {
    const uint8_t* base = b->bytes();
    if (size < sizeof(kMagic) || std::memcmp(base, "X2LIDX", 6) != 0) {
        throw FormatError("not an x2l video index (bad magic)");
    }
    int version = 0;  // of the formats this version reads: 03, 04 and kMagic's
    for (int v = 3; v <= kMagic[7] - '0'; ++v) {
        if (base[6] == '0' && base[7] == '0' + v) version = v;
    }
    if (version == 0) {
        throw FormatError("saved by another x2l-edge version (index format " + std::string(reinterpret_cast<const char*>(base) + 6, 2) +
                          ", this version reads 03 to " + std::string(kMagic + 6, 2) + "): index the video again");
    }
    const bool v3 = version == 3;
    auto check = [&](const Section& s, const std::string& what) {
        if (verify && !s.ok(base)) throw FormatError("checksum mismatch in the " + what + " (corrupt or modified file)");
    };
    Reader r(base, size);
    r.take(sizeof(kMagic));
    const int32_t nl = r.pod<int32_t>(), nh = r.pod<int32_t>(), hd = r.pod<int32_t>(), ne = r.pod<int32_t>();
    if (nl < 1 || nl > kMaxLayers || nh < 1 || nh > kMaxHeadsKv || hd < 1 || hd > kMaxHeadDim || ne < 1 ||
        ne > kMaxEmbd) {
        throw FormatError("corrupt video index header: model dimensions out of range");
    }
    std::unique_ptr<VideoIndex> ix(new VideoIndex(nl, nh, hd, ne));
    VideoIndex& x = *ix;
    x.ratio_low = r.pod<int32_t>();
    x.ratio_high = r.pod<int32_t>();
    const int32_t pin_ends = r.pod<int32_t>(), two_pass = r.pod<int32_t>(), dense = r.pod<int32_t>();
    x.next_pos = r.pod<int32_t>();
    x.model_fingerprint = r.pod<uint64_t>();
    if (x.ratio_low < 1 || x.ratio_high < x.ratio_low || x.ratio_high > kMaxRatio) {
        throw FormatError("corrupt video index header: compression ratios out of range");
    }
    for (int32_t flag : {pin_ends, two_pass, dense}) {
        if (flag != 0 && flag != 1) throw FormatError("corrupt video index header: a flag is neither 0 nor 1");
    }
    x.pin_ends = pin_ends, x.two_pass = two_pass, x.dense_positions = dense;
    const uint32_t clen = r.pod<uint32_t>();
    if (clen > kMaxCompressorName) throw FormatError("corrupt video index header: compressor name too long");
    x.compressor.assign(reinterpret_cast<const char*>(r.take(clen)), clen);
    // "rule" or "L rule/H rule" (X2LOptions::high_compressor)
    const size_t slash = x.compressor.find('/');
    if (x.compressor != "beacon" &&
        !(slash == std::string::npos ? is_training_free_rule(x.compressor)
                                     : is_training_free_rule(x.compressor.substr(0, slash)) &&
                                           is_training_free_rule(x.compressor.substr(slash + 1)))) {
        throw FormatError("corrupt video index header: unknown compressor");
    }
    // Beacon indexes number entries densely and run two passes; training-free ones keep token
    // positions unless they were built with dense_positions.
    if (x.compressor == "beacon" && (!x.dense_positions || !x.two_pass)) {
        throw FormatError("corrupt video index header: settings contradict the compressor");
    }
    const uint64_t nsink = r.pod<uint64_t>();
    if (nsink > INT32_MAX) throw FormatError("corrupt video index header: sink size out of range");
    const uint8_t* sink_ids = r.take(mul(nsink, sizeof(int32_t)));
    x.sink_tokens.resize(nsink);
    if (nsink) std::memcpy(x.sink_tokens.data(), sink_ids, nsink * sizeof(int32_t));
    for (int32_t id : x.sink_tokens) {
        if (id < 0) throw FormatError("corrupt video index header: negative sink token id");
    }
    const uint64_t nchunks = r.pod<uint64_t>();
    // Every chunk takes at least three sections of 64 bytes.
    if (nchunks < 1 || nchunks > size / (3 * kAlign)) throw FormatError("corrupt video index header: chunk count");
    x.text_pos = v3 ? -1 : r.pod<int32_t>();
    // -1 (the question continues at next_pos), or an M-RoPE text position after the sink. Beacon
    // indexes number entries densely: their question always continues after the last entry.
    if (x.text_pos != -1 && (x.text_pos < static_cast<int64_t>(nsink) || x.text_pos > kMaxTextPos || x.dense_positions)) {
        throw FormatError("corrupt video index header: text position out of range");
    }
    check(r.end_section(), "header");

    SegmentRead sink = read_segment(r, x, "sink");
    check(sink.section, "sink");
    if (sink.seg->size() != static_cast<int64_t>(nsink)) throw FormatError("corrupt video index: sink size != sink tokens");
    for (int64_t e = 0; e < sink.seg->size(); ++e) {
        if (sink.seg->pos(e) != e) throw FormatError("corrupt video index: sink positions are not 0, 1, 2, ...");
    }
    if (!sink.finite()) {
        throw FormatError("corrupt video index: the sink holds NaN or infinite values");
    }
    x.sink = std::move(sink.seg);

    int64_t tok = static_cast<int64_t>(nsink);  // where the next chunk must start
    int64_t low_next = tok, high_next = tok;    // dense positions of the next L / H entry
    const size_t lh = static_cast<size_t>(nl) * nh;
    x.chunks.resize(nchunks);
    b->low.resize(nchunks);
    b->low_ok.assign(nchunks, lazy_low ? 0 : 1);
    for (size_t c = 0; c < nchunks; ++c) {
        ChunkKV& ch = x.chunks[c];
        ch.tok_begin = r.pod<int64_t>();
        ch.tok_end = r.pod<int64_t>();
        ch.pos_begin = r.pod<int32_t>();
        ch.pos_end = r.pod<int32_t>();
        ch.n_frames = r.pod<int32_t>();
        auto floats = [&](std::vector<float>& out) {
            const uint64_t n = r.pod<uint64_t>();
            const uint8_t* p = r.take(mul(n, sizeof(float)));
            out.resize(n);
            if (n) std::memcpy(out.data(), p, n * sizeof(float));
        };
        floats(ch.key_sig);
        floats(ch.emb_sig);
        const uint64_t npos = r.pod<uint64_t>();
        const uint8_t* lp = r.take(mul(npos, sizeof(int32_t)));
        ch.low_pos.resize(npos);
        if (npos) std::memcpy(ch.low_pos.data(), lp, npos * sizeof(int32_t));
        if (version >= 5) {
            const uint64_t nrow = r.pod<uint64_t>();
            const uint8_t* rs = r.take(mul(nrow, sizeof(uint16_t)));
            ch.row_sig.resize(nrow);
            if (nrow) std::memcpy(ch.row_sig.data(), rs, nrow * sizeof(uint16_t));
        }
        check(r.end_section(), "meta of chunk " + std::to_string(c));

        // The chunk follows the previous one without a gap, in tokens and positions.
        const int64_t n = ch.tok_end - ch.tok_begin;
        if (ch.tok_begin != tok || n < 1 || n > INT32_MAX) bad_chunk(c, "token range does not follow the previous chunk");
        if (ch.pos_begin != tok || static_cast<int64_t>(ch.pos_end) != tok + n) {
            bad_chunk(c, "positions do not match its tokens");
        }
        tok += n;
        if (tok > INT32_MAX) bad_chunk(c, "input longer than 2^31 tokens");
        // Signatures: n_frames rows of n_embd for the embedding scorer, whole keys of every layer
        // and KV head for the keys scorer (at most one per entry).
        if (ch.n_frames < 1 || ch.n_frames > n) bad_chunk(c, "n_frames out of range [1, chunk tokens]");
        if (ch.emb_sig.size() != mul(static_cast<size_t>(ch.n_frames), ne)) {
            bad_chunk(c, "embedding signature size does not match n_frames x n_embd");
        }
        const size_t per_key = lh * hd;
        if (ch.key_sig.size() % per_key != 0 || ch.key_sig.size() / per_key > static_cast<size_t>(n)) {
            bad_chunk(c, "key signature size does not match the model dimensions");
        }
        // Row signature (format 5): whole rows of n_embd, at most one per chunk token (none: the index
        // was first saved by format 3 or 4).
        if (ch.row_sig.size() % static_cast<size_t>(ne) != 0 || ch.row_sig.size() / static_cast<size_t>(ne) > static_cast<size_t>(n)) {
            bad_chunk(c, "row signature size is not a whole number of n_embd rows, at most one per chunk token");
        }
        if (!floats_finite(ch.emb_sig) || !floats_finite(ch.key_sig) ||
            !rows_finite(DType::F16, reinterpret_cast<const uint8_t*>(ch.row_sig.data()), ch.row_sig.size() * sizeof(uint16_t))) {
            bad_chunk(c, "signature holds NaN or infinity");
        }

        SegmentRead high = read_segment(r, x, "H");
        check(high.section, "H rows of chunk " + std::to_string(c));
        SegmentRead low = read_segment(r, x, "L");
        b->low[c] = low.section;
        if (!lazy_low) check(low.section, "L rows of chunk " + std::to_string(c));
        const KVSegment &H = *high.seg, &L = *low.seg;
        if (L.type() != x.sink->type()) bad_chunk(c, "L type differs from the sink's");
        if (c > 0 && (H.type() != x.chunks[0].high->type())) bad_chunk(c, "H type differs from chunk 0's");
        if (L.size() > n || H.size() > L.size()) bad_chunk(c, "entry counts (H <= L <= chunk tokens)");
        if (!high.finite() || (!lazy_low && !low.finite())) {
            bad_chunk(c, "KV rows hold NaN or infinite values");
        }
        // Positions: dense (beacon) ones continue the previous chunk's; SnapKV ones are the positions of
        // the chunk's own tokens, per layer and KV head for L (low_pos). M-RoPE media (text_pos set): an
        // entry records its temporal-axis position (keys keep their 3-D rotation), which lies after the
        // sink and before the text position, not in the chunk's entry range.
        const int64_t mrope_lo = static_cast<int64_t>(nsink);
        auto in_chunk = [&](int32_t p) {
            return x.text_pos >= 0 ? p >= mrope_lo && p < x.text_pos : p >= ch.pos_begin && p < ch.pos_end;
        };
        for (const auto* seg : {&H, &L}) {
            int64_t& next = seg == &H ? high_next : low_next;
            for (int64_t e = 0; e < seg->size(); ++e) {
                if (x.dense_positions ? seg->pos(e) != next + e : !in_chunk(seg->pos(e))) bad_chunk(c, "entry position out of place");
            }
            next += seg->size();
        }
        if (x.dense_positions ? !ch.low_pos.empty() : ch.low_pos.size() != mul(lh, static_cast<size_t>(L.size()))) {
            bad_chunk(c, "L row positions do not match the L entries");
        }
        for (size_t i = 0; i < ch.low_pos.size(); ++i) {
            if (!in_chunk(ch.low_pos[i]) || (i < static_cast<size_t>(L.size()) && ch.low_pos[i] != L.pos(i))) {
                bad_chunk(c, "L row position out of place");
            }
        }
        ch.high = std::move(high.seg);
        ch.low = std::move(low.seg);
    }
    if (x.next_pos != tok) throw FormatError("corrupt video index: next_pos does not follow the last chunk");
    if (r.offset() != size) throw FormatError("corrupt video index: trailing bytes after the last section");
    ix->backing_ = std::move(b);
    return ix;
}

VideoIndex::VideoIndex(int n_layer_, int n_head_kv_, int head_dim_, int n_embd_)
    : n_layer(n_layer_), n_head_kv(n_head_kv_), head_dim(head_dim_), n_embd(n_embd_) {}

VideoIndex::~VideoIndex() {
    chunks.clear();  // views into the backing go first
    sink.reset();
}

TierBytes VideoIndex::bytes() const {
    TierBytes b;
    if (sink) b.sink = sink->used_bytes();
    for (const auto& c : chunks) {
        b.low += c.low->used_bytes();
        b.high += c.high->used_bytes();
        b.signatures += (c.key_sig.size() + c.emb_sig.size()) * sizeof(float) + c.low_pos.size() * sizeof(int32_t) +
                        c.row_sig.size() * sizeof(uint16_t);
    }
    return b;
}

void VideoIndex::save(const std::string& path) const {
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
        throw FileError(EISDIR, path, "'" + path + "' is a directory: give a file name to save the index to");
    }
    const std::string tmp = path + ".part";
    try {
        Writer w(tmp);
        w.bytes(kMagic, sizeof(kMagic));
        for (int32_t v : {n_layer, n_head_kv, head_dim, n_embd, ratio_low, ratio_high, int32_t(pin_ends), int32_t(two_pass),
                          int32_t(dense_positions), next_pos}) {
            w.pod<int32_t>(v);
        }
        w.pod<uint64_t>(model_fingerprint);
        w.pod<uint32_t>(static_cast<uint32_t>(compressor.size()));
        w.bytes(compressor.data(), compressor.size());
        w.pod<uint64_t>(sink_tokens.size());
        w.bytes(sink_tokens.data(), sink_tokens.size() * sizeof(int32_t));
        w.pod<uint64_t>(chunks.size());
        w.pod<int32_t>(text_pos);
        w.end_section();
        write_segment(w, *sink);
        for (const auto& c : chunks) {
            w.pod<int64_t>(c.tok_begin);
            w.pod<int64_t>(c.tok_end);
            w.pod<int32_t>(c.pos_begin);
            w.pod<int32_t>(c.pos_end);
            w.pod<int32_t>(c.n_frames);
            w.pod<uint64_t>(c.key_sig.size());
            w.bytes(c.key_sig.data(), c.key_sig.size() * sizeof(float));
            w.pod<uint64_t>(c.emb_sig.size());
            w.bytes(c.emb_sig.data(), c.emb_sig.size() * sizeof(float));
            w.pod<uint64_t>(c.low_pos.size());
            w.bytes(c.low_pos.data(), c.low_pos.size() * sizeof(int32_t));
            w.pod<uint64_t>(c.row_sig.size());
            w.bytes(c.row_sig.data(), c.row_sig.size() * sizeof(uint16_t));
            w.end_section();
            write_segment(w, *c.high);
            write_segment(w, *c.low);
        }
        w.close();
    } catch (...) {
        std::remove(tmp.c_str());  // no half-written file left behind
        throw;
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        std::remove(tmp.c_str());
        throw FileError(err, path, "cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(err));
    }
}

std::unique_ptr<VideoIndex> VideoIndex::from_bytes(const uint8_t* data, size_t size, bool verify_checksums) {
    auto b = anonymous_backing(size);
    if (size) std::memcpy(b->base, data, size);
    mprotect(b->base, b->size, PROT_READ);
    return parse(std::move(b), size, verify_checksums, false);
}

std::unique_ptr<VideoIndex> VideoIndex::load(const std::string& path, bool mmap_low) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        const int err = errno;
        throw FileError(err, path, "cannot open '" + path + "': " + std::strerror(err));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        if (S_ISDIR(st.st_mode)) throw FileError(EISDIR, path, "'" + path + "' is a directory, not a file");
        throw Error("'" + path + "' is not a regular file");
    }
    const size_t size = static_cast<size_t>(st.st_size);
    std::unique_ptr<Backing> b;
    try {
        if (size < sizeof(kMagic)) throw FormatError("not an x2l video index (too short)");
        if (mmap_low) {
            b = std::make_unique<Backing>();
            void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) throw Error(std::string("cannot map the file: ") + std::strerror(errno));
            b->base = p;
            b->size = size;
            b->file_mapped = true;
            b->fd = fd;
            b->path = path;
            b->at_load = st;
            fd = -1;  // the backing owns it
        } else {
            b = anonymous_backing(size);
            uint8_t* dst = static_cast<uint8_t*>(b->base);
            for (size_t done = 0; done < size;) {
                const ssize_t got = pread(fd, dst + done, size - done, static_cast<off_t>(done));
                if (got < 0 && errno == EINTR) continue;
                if (got < 0) throw Error(std::string("cannot read the file: ") + std::strerror(errno));
                if (got == 0) throw FormatError("truncated video index (the file shrank while it was read)");
                done += static_cast<size_t>(got);
            }
            ::close(fd);
            fd = -1;
            mprotect(b->base, b->size, PROT_READ);
        }
        return parse(std::move(b), size, true, mmap_low);
    } catch (const Error& e) {
        if (fd >= 0) ::close(fd);
        if (dynamic_cast<const FormatError*>(&e)) throw FormatError("'" + path + "': " + e.what());
        if (dynamic_cast<const BudgetError*>(&e)) throw;
        throw Error("'" + path + "': " + e.what());
    }
}

bool VideoIndex::file_mapped() const { return backing_ && backing_->file_mapped; }

void VideoIndex::check_file() const {
    if (!file_mapped()) return;
    const Backing& b = *backing_;
    struct stat st;
    if (fstat(b.fd, &st) != 0 || st.st_size != b.at_load.st_size || st.st_mtim.tv_sec != b.at_load.st_mtim.tv_sec ||
        st.st_mtim.tv_nsec != b.at_load.st_mtim.tv_nsec) {
        throw FormatError("'" + b.path + "' changed since it was loaded (size or modification time): load it again");
    }
}

void VideoIndex::check_low(size_t chunk) const {
    if (!file_mapped()) return;
    check_file();
    Backing& b = *backing_;
    if (chunk >= chunks.size()) throw Error("chunk index out of range");
    std::lock_guard<std::mutex> lock(b.mu);
    if (b.low_ok[chunk]) return;
    const Section& s = b.low[chunk];
    const KVSegment& L = *chunks[chunk].low;
    if (!s.ok(b.bytes())) {
        throw FormatError("'" + b.path + "': checksum mismatch in the L rows of chunk " + std::to_string(chunk) +
                          " (corrupt or modified file)");
    }
    const size_t part = L.layer_bytes() * L.n_layer();
    if (!rows_finite(L.type(), L.k_data(), part) || !rows_finite(L.type(), L.v_data(), part)) {
        throw FormatError("'" + b.path + "': the L rows of chunk " + std::to_string(chunk) + " hold NaN or infinite values");
    }
    b.low_ok[chunk] = 1;
}

}  // namespace x2l
