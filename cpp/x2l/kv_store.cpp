#include "x2l/kv_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/common.h"

namespace x2l {

namespace {

constexpr char kMagic[8] = {'X', '2', 'L', 'I', 'D', 'X', '0', '2'};
constexpr size_t kAlign = 64;

class Writer {
  public:
    explicit Writer(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
        if (!f_) throw Error("cannot write '" + path + "': " + std::strerror(errno));
    }
    ~Writer() {
        if (f_) std::fclose(f_);
    }
    void bytes(const void* p, size_t n) {
        if (n && std::fwrite(p, 1, n, f_) != n) throw Error("write failed for '" + path_ + "'");
        off_ += n;
    }
    template <typename T>
    void pod(const T& v) { bytes(&v, sizeof(T)); }
    void align() {
        static const uint8_t zeros[kAlign] = {0};
        size_t pad = (kAlign - off_ % kAlign) % kAlign;
        bytes(zeros, pad);
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
};

class Reader {
  public:
    Reader(const uint8_t* base, size_t size, const std::string& path) : base_(base), size_(size), path_(path) {}
    const uint8_t* take(size_t n) {
        if (n > size_ - off_) throw FormatError("'" + path_ + "': truncated video index");
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
    void align() {
        size_t pad = (kAlign - off_ % kAlign) % kAlign;
        take(pad);
    }

  private:
    const uint8_t* base_;
    size_t size_;
    size_t off_ = 0;
    std::string path_;
};

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
    w.align();
}

// view=true: rows stay in the mapping; else they are copied into an owned segment.
std::unique_ptr<KVSegment> read_segment(Reader& r, const VideoIndex& ix, bool view) {
    uint32_t type = r.pod<uint32_t>();
    int64_t n = r.pod<int64_t>();
    const TypeInfo* ti = type_info(type);
    if (!ti || n < 0 || n > (int64_t(1) << 32)) throw FormatError("corrupt video index segment header");
    DType t = static_cast<DType>(type);
    r.align();
    size_t rb = row_bytes(t, ix.head_dim);
    size_t part = rb * static_cast<size_t>(n) * ix.n_layer * ix.n_head_kv;
    const uint8_t* k = r.take(part);
    r.align();
    const uint8_t* v = r.take(part);
    r.align();
    const int32_t* pos = reinterpret_cast<const int32_t*>(r.take(sizeof(int32_t) * static_cast<size_t>(n)));
    r.align();
    auto seg = KVSegment::view(t, ix.n_layer, ix.n_head_kv, ix.head_dim, n, k, v, pos);
    if (view) return seg;
    auto own = std::make_unique<KVSegment>(t, ix.n_layer, ix.n_head_kv, ix.head_dim, n);
    own->assign_meta(*seg);
    for (int l = 0; l < ix.n_layer; ++l) own->copy_layer(*seg, l);
    return own;
}

}  // namespace

VideoIndex::VideoIndex(int n_layer_, int n_head_kv_, int head_dim_, int n_embd_)
    : n_layer(n_layer_), n_head_kv(n_head_kv_), head_dim(head_dim_), n_embd(n_embd_) {}

VideoIndex::~VideoIndex() {
    chunks.clear();  // views into the mapping go first
    if (map_) munmap(map_, map_size_);
}

TierBytes VideoIndex::bytes() const {
    TierBytes b;
    if (sink) b.sink = sink->used_bytes();
    for (const auto& c : chunks) {
        b.low += c.low->used_bytes();
        b.high += c.high->used_bytes();
        b.signatures += (c.key_sig.size() + c.emb_sig.size()) * sizeof(float) + c.low_pos.size() * sizeof(int32_t);
    }
    return b;
}

void VideoIndex::save(const std::string& path) const {
    const std::string tmp = path + ".part";
    {
        Writer w(tmp);
        w.bytes(kMagic, sizeof(kMagic));
        w.pod<int32_t>(n_layer);
        w.pod<int32_t>(n_head_kv);
        w.pod<int32_t>(head_dim);
        w.pod<int32_t>(n_embd);
        w.pod<int32_t>(ratio_low);
        w.pod<int32_t>(ratio_high);
        w.pod<int32_t>(pin_ends ? 1 : 0);
        w.pod<int32_t>(two_pass ? 1 : 0);
        w.pod<int32_t>(dense_positions ? 1 : 0);
        w.pod<int32_t>(next_pos);
        w.pod<uint32_t>(static_cast<uint32_t>(compressor.size()));
        w.bytes(compressor.data(), compressor.size());
        w.pod<uint64_t>(sink_tokens.size());
        w.bytes(sink_tokens.data(), sink_tokens.size() * sizeof(int32_t));
        w.pod<uint64_t>(chunks.size());
        w.align();
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
            w.align();
            write_segment(w, *c.high);
            write_segment(w, *c.low);
        }
        w.close();
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw Error("cannot rename '" + tmp + "' to '" + path + "'");
}

std::unique_ptr<VideoIndex> VideoIndex::load(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error("cannot open '" + path + "': " + std::strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        ::close(fd);
        throw Error("cannot stat '" + path + "'");
    }
    size_t size = static_cast<size_t>(st.st_size);
    if (size < sizeof(kMagic)) {
        ::close(fd);
        throw FormatError("'" + path + "' is not an x2l video index (too short)");
    }
    void* map = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (map == MAP_FAILED) throw Error("cannot mmap '" + path + "'");
    const uint8_t* base = static_cast<const uint8_t*>(map);
    if (std::memcmp(base, kMagic, sizeof(kMagic)) != 0) {
        const bool other_version = std::memcmp(base, kMagic, sizeof(kMagic) - 2) == 0;
        munmap(map, size);
        if (other_version) {
            throw FormatError("'" + path + "' was saved by another x2l-edge version: index the video again");
        }
        throw FormatError("'" + path + "' is not an x2l video index (bad magic)");
    }
    std::unique_ptr<VideoIndex> ix;
    try {
        Reader r(base, size, path);
        r.take(sizeof(kMagic));
        int32_t nl = r.pod<int32_t>(), nh = r.pod<int32_t>(), hd = r.pod<int32_t>(), ne = r.pod<int32_t>();
        if (nl <= 0 || nh <= 0 || hd <= 0 || ne <= 0 || nl > 4096 || nh > 4096 || hd > 4096) {
            throw FormatError("corrupt video index header");
        }
        ix.reset(new VideoIndex(nl, nh, hd, ne));
        ix->map_ = map;
        ix->map_size_ = size;
        ix->ratio_low = r.pod<int32_t>();
        ix->ratio_high = r.pod<int32_t>();
        ix->pin_ends = r.pod<int32_t>() != 0;
        ix->two_pass = r.pod<int32_t>() != 0;
        ix->dense_positions = r.pod<int32_t>() != 0;
        ix->next_pos = r.pod<int32_t>();
        uint32_t clen = r.pod<uint32_t>();
        if (clen > 64) throw FormatError("corrupt video index header");
        const uint8_t* cs = r.take(clen);
        ix->compressor.assign(reinterpret_cast<const char*>(cs), clen);
        uint64_t nsink = r.pod<uint64_t>();
        if (nsink > (1u << 24)) throw FormatError("corrupt video index header");
        const uint8_t* st_ = r.take(nsink * sizeof(int32_t));
        ix->sink_tokens.resize(nsink);
        std::memcpy(ix->sink_tokens.data(), st_, nsink * sizeof(int32_t));
        uint64_t nchunks = r.pod<uint64_t>();
        if (nchunks > size / kAlign) throw FormatError("corrupt video index header");
        r.align();
        ix->sink = read_segment(r, *ix, false);
        ix->chunks.resize(nchunks);
        for (auto& c : ix->chunks) {
            c.tok_begin = r.pod<int64_t>();
            c.tok_end = r.pod<int64_t>();
            c.pos_begin = r.pod<int32_t>();
            c.pos_end = r.pod<int32_t>();
            c.n_frames = r.pod<int32_t>();
            uint64_t nk = r.pod<uint64_t>();
            if (nk > (1u << 28)) throw FormatError("corrupt video index chunk");
            c.key_sig.resize(nk);
            std::memcpy(c.key_sig.data(), r.take(nk * sizeof(float)), nk * sizeof(float));
            uint64_t nemb = r.pod<uint64_t>();
            if (nemb > (1u << 28)) throw FormatError("corrupt video index chunk");
            c.emb_sig.resize(nemb);
            std::memcpy(c.emb_sig.data(), r.take(nemb * sizeof(float)), nemb * sizeof(float));
            uint64_t npos = r.pod<uint64_t>();
            if (npos > (1u << 28)) throw FormatError("corrupt video index chunk");
            c.low_pos.resize(npos);
            std::memcpy(c.low_pos.data(), r.take(npos * sizeof(int32_t)), npos * sizeof(int32_t));
            r.align();
            c.high = read_segment(r, *ix, false);  // device tier: resident
            c.low = read_segment(r, *ix, true);    // host tier: stays in the mapping
            if (!c.low_pos.empty() && c.low_pos.size() != static_cast<size_t>(nl) * nh * c.low->size()) {
                throw FormatError("corrupt video index chunk (L row positions)");
            }
        }
    } catch (...) {
        if (ix) {
            // the destructor unmaps
        } else {
            munmap(map, size);
        }
        throw;
    }
    return ix;
}

}  // namespace x2l
