// UTF-8, code point classes, the GPT-2 byte alphabet and the pre-tokenizer state machines.
//
// The splitters reproduce leftmost-first regex alternation (what Oniguruma does for the HF
// patterns): at each position the alternatives are tried in pattern order and the first one
// that matches wins; each alternative is a small greedy scan with the backtracking the pattern
// implies written out by hand (e.g. \s+(?!\S) gives back one whitespace before a non-space).
#include "llm/unicode.h"

#include <algorithm>
#include <cstdint>

namespace x2l {
namespace unicode {

namespace {

struct CpRange {
    uint32_t first, last;
    uint8_t cls;
};

#include "unicode_data.inc"

}  // namespace

uint8_t cp_class(uint32_t cp) {
    if (cp < 256) return kLatin1Class[cp];
    if (cp == kInvalidCp) return 0;
    // Last range whose first <= cp.
    const CpRange* end = kCpRanges + sizeof(kCpRanges) / sizeof(kCpRanges[0]);
    const CpRange* it = std::upper_bound(kCpRanges, end, cp,
                                         [](uint32_t c, const CpRange& r) { return c < r.first; });
    if (it == kCpRanges) return 0;
    --it;
    return cp <= it->last ? it->cls : 0;
}

uint32_t utf8_decode(const char* s, size_t n, size_t* len) {
    const auto* u = reinterpret_cast<const uint8_t*>(s);
    const uint8_t b0 = u[0];
    *len = 1;
    if (b0 < 0x80) return b0;
    auto cont = [&](size_t i, uint8_t lo, uint8_t hi) { return i < n && u[i] >= lo && u[i] <= hi; };
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        if (!cont(1, 0x80, 0xBF)) return kInvalidCp;
        *len = 2;
        return (uint32_t(b0 & 0x1F) << 6) | (u[1] & 0x3F);
    }
    if (b0 >= 0xE0 && b0 <= 0xEF) {
        // Exclude overlong forms (E0 80..9F) and UTF-16 surrogates (ED A0..BF).
        const uint8_t lo = b0 == 0xE0 ? 0xA0 : 0x80, hi = b0 == 0xED ? 0x9F : 0xBF;
        if (!cont(1, lo, hi) || !cont(2, 0x80, 0xBF)) return kInvalidCp;
        *len = 3;
        return (uint32_t(b0 & 0x0F) << 12) | (uint32_t(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
    }
    if (b0 >= 0xF0 && b0 <= 0xF4) {
        // Exclude overlong forms (F0 80..8F) and code points above U+10FFFF (F4 90..).
        const uint8_t lo = b0 == 0xF0 ? 0x90 : 0x80, hi = b0 == 0xF4 ? 0x8F : 0xBF;
        if (!cont(1, lo, hi) || !cont(2, 0x80, 0xBF) || !cont(3, 0x80, 0xBF)) return kInvalidCp;
        *len = 4;
        return (uint32_t(b0 & 0x07) << 18) | (uint32_t(u[1] & 0x3F) << 12) |
               (uint32_t(u[2] & 0x3F) << 6) | (u[3] & 0x3F);
    }
    return kInvalidCp;
}

void utf8_append(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18));
        out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

// GPT-2 keeps the printable bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF as themselves and maps
// the other 68 bytes (0x00..0x20, 0x7F..0xA0, 0xAD), in byte order, to U+0100 onwards.
namespace {
bool byte_is_printable(uint32_t b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}
}  // namespace

uint32_t byte_to_cp(uint8_t b) {
    if (byte_is_printable(b)) return b;
    uint32_t k;  // rank of b among the non-printable bytes
    if (b <= 0x20) k = b;
    else if (b <= 0xA0) k = 33 + (b - 0x7F);
    else k = 67;  // 0xAD
    return 0x100 + k;
}

int cp_to_byte(uint32_t cp) {
    if (cp < 0x100) return byte_is_printable(cp) ? int(cp) : -1;
    if (cp >= 0x100 + 68) return -1;
    const uint32_t k = cp - 0x100;
    if (k < 33) return int(k);
    if (k < 67) return int(0x7F + (k - 33));
    return 0xAD;
}

// ------------------------------------------------------------------ splitters
namespace {

// Per-code-point flags used by the matchers: the table classes, the literal characters the
// patterns name, and the UTF-8 length in the top two bits. One byte per code point keeps the
// decoded form small; byte offsets are recovered by summing lengths while scanning.
enum : uint8_t {
    F_L = kLetter, F_N = kNumber, F_S = kSpace,
    F_NL = 8,       // \r or \n
    F_SP = 16,      // ' ' (U+0020), the optional prefix in " ?..."
    F_APOS = 32,    // '\''
};
constexpr int kLenShift = 6;
inline size_t cp_len(uint8_t f) { return size_t(f >> kLenShift) + 1; }

std::vector<uint8_t> decode_all(std::string_view text) {
    const size_t n = text.size();
    std::vector<uint8_t> f;
    f.reserve(n);
    size_t i = 0;
    while (i < n) {
        size_t len = 1;
        const uint8_t b = uint8_t(text[i]);
        // ASCII fast path: most text is mostly ASCII.
        const uint32_t cp = b < 0x80 ? b : utf8_decode(text.data() + i, n - i, &len);
        uint8_t fl = cp < 256 ? kLatin1Class[cp] : cp_class(cp);
        if (cp == '\r' || cp == '\n') fl |= F_NL;
        else if (cp == ' ') fl |= F_SP;
        else if (cp == '\'') fl |= F_APOS;
        f.push_back(uint8_t(fl | ((len - 1) << kLenShift)));
        i += len;
    }
    return f;
}

inline bool is_other(uint8_t f) { return (f & (F_L | F_N | F_S)) == 0; }  // [^\s\p{L}\p{N}]

struct Matcher {
    const uint8_t* f;
    std::string_view text;
    size_t end;  // exclusive code point index; lookaheads treat it as end of input

    size_t run(size_t i, uint8_t mask) const {
        while (i < end && (f[i] & mask)) ++i;
        return i;
    }
    size_t run_other(size_t i) const {
        while (i < end && is_other(f[i])) ++i;
        return i;
    }
    // Case folding for (?i:...): ASCII, plus U+017F LATIN SMALL LETTER LONG S which folds to 's'
    // (no other code point folds to one of the letters in the contraction alternatives).
    static uint32_t fold(uint32_t c) {
        if (c >= 'A' && c <= 'Z') return c + 32;
        if (c == 0x17F) return 's';
        return c;
    }
    // 's|'t|'re|'ve|'m|'ll|'d, optionally case-insensitive; b is the byte offset of code point i.
    // Returns the match end or i.
    size_t contraction(size_t i, size_t b, bool ci) const {
        if (!(f[i] & F_APOS) || i + 1 >= end) return i;
        size_t len1, len2;
        ++b;  // the apostrophe is one byte
        uint32_t a = utf8_decode(text.data() + b, text.size() - b, &len1);
        if (ci) a = fold(a);
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < end) {
            b += len1;
            uint32_t c = utf8_decode(text.data() + b, text.size() - b, &len2);
            if (ci) c = fold(c);
            if ((a == 'r' && c == 'e') || (a == 'v' && c == 'e') || (a == 'l' && c == 'l')) return i + 3;
        }
        return i;
    }
    // Whitespace tail shared by both families: \s+(?!\S)|\s+ (f[i] is whitespace).
    size_t space_run(size_t i) const {
        const size_t j = run(i, F_S);
        if (j == end || j - i == 1) return j;  // at end (?!\S) holds; a lone space falls to \s+
        return j - 1;                          // give the last space back to the next token
    }

    size_t gpt2(size_t i, size_t b) const {
        size_t j = contraction(i, b, false);
        if (j > i) return j;
        // " ?X+" for X in L, N, other: a leading ' ' is never X itself, so only one start to try.
        const size_t k = ((f[i] & F_SP) && i + 1 < end) ? i + 1 : i;
        if (f[k] & F_L) return run(k, F_L);
        if (f[k] & F_N) return run(k, F_N);
        if (is_other(f[k])) return run_other(k);
        if (f[i] & F_S) return space_run(i);
        return i;
    }

    size_t qwen(size_t i, size_t b, size_t max_digits) const {
        size_t j = contraction(i, b, true);
        if (j > i) return j;
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if (f[i] & F_L) return run(i, F_L);
        if (!(f[i] & (F_NL | F_L | F_N)) && i + 1 < end && (f[i + 1] & F_L)) return run(i + 1, F_L);
        // \p{N}{1,max_digits}
        if (f[i] & F_N) {
            j = i + 1;
            while (j < end && j - i < max_digits && (f[j] & F_N)) ++j;
            return j;
        }
        // " ?[^\s\p{L}\p{N}]+[\r\n]*"
        const size_t k = ((f[i] & F_SP) && i + 1 < end) ? i + 1 : i;
        if (is_other(f[k])) return run(run_other(k), F_NL);
        if (f[i] & F_S) {
            // \s*[\r\n]+ : backtracking \s* stops right after the run's last newline.
            j = run(i, F_S);
            for (size_t m = j; m > i; --m)
                if (f[m - 1] & F_NL) return m;
            return space_run(i);
        }
        return i;
    }
};

// Applies one matcher over code points [begin, end) starting at byte offset b, emitting matches
// and unmatched gaps. Returns the byte offset of end.
template <typename Match>
size_t split_range(const uint8_t* f, std::string_view text, size_t begin, size_t end, size_t b, Match match,
                   std::vector<std::string_view>& out) {
    size_t gap = SIZE_MAX;  // byte offset where pending unmatched code points start
    size_t i = begin;
    while (i < end) {
        const size_t j = match(i, b);
        if (j > i) {
            if (gap != SIZE_MAX) out.emplace_back(text.data() + gap, b - gap);
            gap = SIZE_MAX;
            size_t e = b;
            for (size_t k = i; k < j; ++k) e += cp_len(f[k]);
            out.emplace_back(text.data() + b, e - b);
            b = e;
            i = j;
        } else {
            if (gap == SIZE_MAX) gap = b;
            b += cp_len(f[i]);
            ++i;
        }
    }
    if (gap != SIZE_MAX) out.emplace_back(text.data() + gap, b - gap);
    return b;
}

}  // namespace

void pre_tokenize(PreSplit kind, std::string_view text, std::vector<std::string_view>& out) {
    if (text.empty()) return;
    const std::vector<uint8_t> f = decode_all(text);
    const size_t n = f.size();
    const Matcher m{f.data(), text, n};
    switch (kind) {
        case PreSplit::GPT2:
            split_range(f.data(), text, 0, n, 0, [&](size_t i, size_t b) { return m.gpt2(i, b); }, out);
            break;
        case PreSplit::Qwen2:
            split_range(f.data(), text, 0, n, 0, [&](size_t i, size_t b) { return m.qwen(i, b, 1); }, out);
            break;
        case PreSplit::Llama3:
            split_range(f.data(), text, 0, n, 0, [&](size_t i, size_t b) { return m.qwen(i, b, 3); }, out);
            break;
        case PreSplit::SmolLM: {
            // Digits(individual_digits=true) first: each \p{N} is its own piece and the GPT2
            // regex then runs on the text between digits, which ends there (lookaheads included).
            size_t a = 0, b = 0;
            for (size_t i = 0; i < n; ++i) {
                if (!(f[i] & F_N)) continue;
                if (a < i) {
                    const Matcher seg{f.data(), text, i};
                    b = split_range(f.data(), text, a, i, b, [&](size_t k, size_t o) { return seg.gpt2(k, o); }, out);
                }
                out.emplace_back(text.data() + b, cp_len(f[i]));
                b += cp_len(f[i]);
                a = i + 1;
            }
            if (a < n) split_range(f.data(), text, a, n, b, [&](size_t k, size_t o) { return m.gpt2(k, o); }, out);
            break;
        }
    }
}

}  // namespace unicode
}  // namespace x2l
