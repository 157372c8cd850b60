// Byte-level BPE (tokenizer.ggml.model == "gpt2") following Hugging Face `tokenizers`:
//   1. split out added tokens (control / user-defined) by leftmost-longest literal match,
//   2. pre-tokenize each remaining segment (unicode.cpp splitters),
//   3. map each piece's bytes to the GPT-2 alphabet and apply the ranked merges with HF's
//      algorithm (min-heap on (rank, position) over a linked list of symbols).
#include "llm/tokenizer.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <queue>
#include <string_view>
#include <unordered_map>

#include "core/common.h"
#include "core/gguf.h"
#include "llm/unicode.h"

namespace x2l {

namespace {

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum TokenType : int32_t { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER_DEFINED = 4, TT_UNUSED = 5, TT_BYTE = 6 };

struct Merge {
    int32_t rank;
    int32_t new_id;
};

inline uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

class BpeTokenizer final : public Tokenizer {
  public:
    explicit BpeTokenizer(const GGUFFile& f);

    std::vector<int32_t> encode(const std::string& text, bool parse_special, bool add_bos) const override;
    std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override;
    std::string token_bytes(int32_t id) const override {
        check_id(id);
        return bytes_[id];
    }
    const std::string& token_text(int32_t id) const override {
        check_id(id);
        return tokens_[id];
    }
    bool is_control(int32_t id) const override {
        check_id(id);
        return types_[id] == TT_CONTROL;
    }
    int32_t n_vocab() const override { return int32_t(tokens_.size()); }
    int32_t find_token(const std::string& text) const override {
        auto it = vocab_.find(text);
        return it == vocab_.end() ? -1 : it->second;
    }

  private:
    void check_id(int32_t id) const {
        if (id < 0 || id >= n_vocab())
            throw Error("token id " + std::to_string(id) + " out of range [0, " + std::to_string(n_vocab()) + ")");
    }
    int32_t special_id_key(const GGUFFile& f, const char* key, bool strict) const;
    void encode_segment(std::string_view seg, std::vector<int32_t>& out) const;
    void encode_piece(std::string_view piece, std::vector<int32_t>& out) const;
    void bpe_merge(std::string_view piece, std::vector<int32_t>& out) const;

    std::vector<std::string> tokens_;
    std::vector<int32_t> types_;
    std::vector<std::string> bytes_;  // token_bytes() of every id, precomputed
    std::unordered_map<std::string_view, int32_t> vocab_;  // views into tokens_
    std::unordered_map<uint64_t, Merge> merges_;           // (left id, right id) -> rank, result
    int32_t byte_id_[256];                                 // id of each single-byte symbol, or -1
    unicode::PreSplit split_ = unicode::PreSplit::GPT2;
    bool ignore_merges_ = false;  // HF BPE ignore_merges (Llama 3): a piece in the vocab is one token

    // Added tokens matched in raw text, grouped by first byte, longest first.
    std::vector<int32_t> added_by_byte_[256];

    // Pieces repeat a lot in natural text; remember their ids. encode() runs without the GIL,
    // possibly on several threads, hence the mutex. Cleared wholesale when it grows too big.
    static constexpr size_t kCacheMaxEntries = 1 << 16;
    static constexpr size_t kCacheMaxPiece = 64;
    mutable std::mutex cache_mu_;
    mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

int32_t BpeTokenizer::special_id_key(const GGUFFile& f, const char* key, bool strict) const {
    const int64_t v = f.get_int(key, -1);
    if (v < 0) return -1;
    if (v >= int64_t(tokens_.size())) {
        if (strict)
            throw FormatError(std::string(key) + " = " + std::to_string(v) + " is outside the vocabulary of " +
                              std::to_string(tokens_.size()) + " tokens");
        return -1;
    }
    return int32_t(v);
}

BpeTokenizer::BpeTokenizer(const GGUFFile& f) {
    if (!f.has("tokenizer.ggml.tokens")) throw FormatError("GGUF has no tokenizer (tokenizer.ggml.tokens missing)");
    if (!f.has("tokenizer.ggml.model")) throw FormatError("GGUF has no tokenizer model (tokenizer.ggml.model missing)");
    const std::string model = f.get_str("tokenizer.ggml.model");
    if (model != "gpt2")
        throw FormatError("unsupported tokenizer model '" + model + "' (only byte-level BPE 'gpt2' is supported)");

    pre_type = f.get_str("tokenizer.ggml.pre", "default");
    if (pre_type == "default" || pre_type == "gpt2") split_ = unicode::PreSplit::GPT2;
    else if (pre_type == "smollm") split_ = unicode::PreSplit::SmolLM;
    else if (pre_type == "qwen2") split_ = unicode::PreSplit::Qwen2;
    else if (pre_type == "llama-bpe") {
        split_ = unicode::PreSplit::Llama3;
        ignore_merges_ = true;  // Llama 3's tokenizer.json sets BPE ignore_merges
    } else {
        throw FormatError("unsupported tokenizer pre-type '" + pre_type +
                          "' (supported: default, gpt2, smollm, qwen2, llama-bpe)");
    }

    tokens_ = f.get_str_array("tokenizer.ggml.tokens");
    const size_t n = tokens_.size();
    if (n == 0) throw FormatError("tokenizer.ggml.tokens is empty");
    if (n > size_t(INT32_MAX)) throw FormatError("tokenizer.ggml.tokens is too large");
    if (f.has("tokenizer.ggml.token_type")) {
        const std::vector<int64_t> tt = f.get_int_array("tokenizer.ggml.token_type");
        if (tt.size() != n)
            throw FormatError("tokenizer.ggml.token_type has " + std::to_string(tt.size()) + " entries, expected " +
                              std::to_string(n));
        types_.assign(tt.begin(), tt.end());
    } else {
        types_.assign(n, TT_NORMAL);
    }

    vocab_.reserve(n);
    for (size_t i = 0; i < n; ++i) vocab_.emplace(std::string_view(tokens_[i]), int32_t(i));  // first id wins

    for (int b = 0; b < 256; ++b) {
        std::string s;
        unicode::utf8_append(s, unicode::byte_to_cp(uint8_t(b)));
        auto it = vocab_.find(s);
        byte_id_[b] = it == vocab_.end() ? -1 : it->second;
    }

    // Merges "left right", rank = position. Like HF, a later duplicate pair overrides an earlier
    // one; merges naming unknown tokens (HF refuses to load those) are skipped.
    if (!f.has("tokenizer.ggml.merges")) throw FormatError("tokenizer.ggml.merges missing for BPE tokenizer");
    const std::vector<std::string>& merges = f.get_str_array("tokenizer.ggml.merges");
    merges_.reserve(merges.size());
    std::string joined;
    for (size_t r = 0; r < merges.size(); ++r) {
        const std::string& m = merges[r];
        // Byte-level tokens never contain ' ', but try every split point to be safe.
        for (size_t sp = m.find(' '); sp != std::string::npos; sp = m.find(' ', sp + 1)) {
            auto a = vocab_.find(std::string_view(m).substr(0, sp));
            auto b = vocab_.find(std::string_view(m).substr(sp + 1));
            if (a == vocab_.end() || b == vocab_.end()) continue;
            joined.assign(m, 0, sp);
            joined.append(m, sp + 1, std::string::npos);
            auto c = vocab_.find(joined);
            if (c == vocab_.end()) continue;
            merges_[pair_key(a->second, b->second)] = Merge{int32_t(r), c->second};
            break;
        }
    }

    // Raw bytes per token: byte-level tokens map back through the GPT-2 alphabet; added tokens
    // are stored as plain text. Characters outside the alphabet are kept as UTF-8, as HF's
    // ByteLevel decoder does.
    bytes_.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const std::string& t = tokens_[i];
        if (types_[i] == TT_CONTROL || types_[i] == TT_USER_DEFINED) {
            bytes_[i] = t;
            continue;
        }
        std::string& out = bytes_[i];
        out.reserve(t.size());
        size_t k = 0;
        while (k < t.size()) {
            size_t len;
            const uint32_t cp = unicode::utf8_decode(t.data() + k, t.size() - k, &len);
            const int b = cp == unicode::kInvalidCp ? -1 : unicode::cp_to_byte(cp);
            if (b >= 0) out += char(b);
            else out.append(t, k, len);
            k += len;
        }
    }

    // Added tokens, longest first per leading byte (leftmost-longest like HF's AddedVocabulary).
    for (size_t i = 0; i < n; ++i) {
        if ((types_[i] == TT_CONTROL || types_[i] == TT_USER_DEFINED) && !tokens_[i].empty())
            added_by_byte_[uint8_t(tokens_[i][0])].push_back(int32_t(i));
    }
    for (auto& v : added_by_byte_)
        std::stable_sort(v.begin(), v.end(),
                         [&](int32_t a, int32_t b) { return tokens_[a].size() > tokens_[b].size(); });

    bos_id = special_id_key(f, "tokenizer.ggml.bos_token_id", true);
    eos_id = special_id_key(f, "tokenizer.ggml.eos_token_id", true);
    pad_id = special_id_key(f, "tokenizer.ggml.padding_token_id", false);
    eot_id = special_id_key(f, "tokenizer.ggml.eot_token_id", true);
    if (eot_id < 0) {
        // No explicit end-of-turn: use a chat template's end marker when the vocabulary has one.
        for (const char* t : {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"}) {
            const int32_t id = find_token(t);
            if (id >= 0 && types_[id] == TT_CONTROL) {
                eot_id = id;
                break;
            }
        }
        if (eot_id < 0) eot_id = eos_id;
    }
    add_bos = f.get_bool("tokenizer.ggml.add_bos_token", false);
}

std::vector<int32_t> BpeTokenizer::encode(const std::string& text, bool parse_special, bool add_bos_arg) const {
    std::vector<int32_t> out;
    out.reserve(text.size() / 3 + 4);
    if (add_bos_arg && add_bos && bos_id >= 0) out.push_back(bos_id);
    const size_t n = text.size();
    size_t seg = 0;  // start of the plain text not yet encoded
    size_t pos = 0;
    while (pos < n) {
        const auto& cands = added_by_byte_[uint8_t(text[pos])];
        int32_t hit = -1;
        for (int32_t id : cands) {
            // Control tokens only with parse_special; user-defined ones always (HF non-special
            // added tokens are matched regardless of split_special_tokens).
            if (types_[id] == TT_CONTROL && !parse_special) continue;
            const std::string& t = tokens_[id];
            if (t.size() <= n - pos && std::memcmp(text.data() + pos, t.data(), t.size()) == 0) {
                hit = id;
                break;
            }
        }
        if (hit < 0) {
            ++pos;
            continue;
        }
        encode_segment(std::string_view(text).substr(seg, pos - seg), out);
        out.push_back(hit);
        pos += tokens_[hit].size();
        seg = pos;
    }
    encode_segment(std::string_view(text).substr(seg), out);
    return out;
}

void BpeTokenizer::encode_segment(std::string_view seg, std::vector<int32_t>& out) const {
    if (seg.empty()) return;
    std::vector<std::string_view> pieces;
    unicode::pre_tokenize(split_, seg, pieces);
    for (std::string_view p : pieces) encode_piece(p, out);
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.size() == 1) {  // single byte: no merge can apply
        const int32_t id = byte_id_[uint8_t(piece[0])];
        if (id >= 0) out.push_back(id);
        return;
    }
    if (ignore_merges_) {
        std::string enc;
        enc.reserve(piece.size() * 2);
        for (char ch : piece) unicode::utf8_append(enc, unicode::byte_to_cp(uint8_t(ch)));
        auto it = vocab_.find(enc);
        if (it != vocab_.end()) {
            out.push_back(it->second);
            return;
        }
    }
    const bool cacheable = piece.size() <= kCacheMaxPiece;
    std::string key;
    if (cacheable) {
        key.assign(piece);
        std::lock_guard<std::mutex> lock(cache_mu_);
        auto it = cache_.find(key);
        if (it != cache_.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    const size_t start = out.size();
    bpe_merge(piece, out);
    if (cacheable) {
        std::vector<int32_t> ids(out.begin() + start, out.end());
        std::lock_guard<std::mutex> lock(cache_mu_);
        if (cache_.size() >= kCacheMaxEntries) cache_.clear();
        cache_.emplace(std::move(key), std::move(ids));
    }
}

// HF tokenizers' Word::merge_all: repeatedly apply the lowest-ranked adjacent pair (leftmost on
// ties), skipping stale queue entries, until no mergeable pair is left.
void BpeTokenizer::bpe_merge(std::string_view piece, std::vector<int32_t>& out) const {
    struct Sym {
        int32_t id;
        int32_t prev, next;  // linked list over live symbols; -1 at the ends
        bool live;
    };
    struct Cand {
        int32_t rank, pos, new_id;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::vector<Sym> syms;
    syms.reserve(piece.size());
    for (char ch : piece) {
        const int32_t id = byte_id_[uint8_t(ch)];
        if (id < 0) continue;  // byte missing from the vocabulary: dropped, as HF does without unk
        const int32_t k = int32_t(syms.size());
        syms.push_back(Sym{id, k - 1, -1, true});
        if (k > 0) syms[k - 1].next = k;
    }
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> queue;
    auto push_pair = [&](int32_t pos) {
        const int32_t nx = syms[pos].next;
        if (nx < 0) return;
        auto it = merges_.find(pair_key(syms[pos].id, syms[nx].id));
        if (it != merges_.end()) queue.push(Cand{it->second.rank, pos, it->second.new_id});
    };
    for (int32_t i = 0; i + 1 < int32_t(syms.size()); ++i) push_pair(i);
    while (!queue.empty()) {
        const Cand top = queue.top();
        queue.pop();
        Sym& left = syms[top.pos];
        if (!left.live || left.next < 0) continue;
        const int32_t nx = left.next;
        // Stale entry: the pair at this position changed since it was queued.
        auto it = merges_.find(pair_key(left.id, syms[nx].id));
        if (it == merges_.end() || it->second.new_id != top.new_id) continue;
        left.id = top.new_id;
        syms[nx].live = false;
        left.next = syms[nx].next;
        if (left.next >= 0) syms[left.next].prev = top.pos;
        if (left.prev >= 0) push_pair(left.prev);
        push_pair(top.pos);
    }
    for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
    std::string out;
    for (int32_t id : ids) {
        check_id(id);
        if (skip_special && types_[id] == TT_CONTROL) continue;
        out += bytes_[id];
    }
    return out;
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::from_gguf(const GGUFFile& f) { return std::make_unique<BpeTokenizer>(f); }

}  // namespace x2l
