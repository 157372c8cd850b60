"""A reader of saved X²L index files written from docs/security.md, independent of the C++ loader:
field offsets for mutation tests and fuzzers, and XXH64 (written from the xxHash specification) to
re-seal the per-section checksums after a mutation, as someone crafting a file would.

Format 5 (magic X2LIDX05): sections, each starting 64-byte aligned: payload, u64 XXH64(payload,
seed 0), zero padding to 64. Sections: header (ending with the i32 M-RoPE text position), sink
segment, then per chunk: meta (ending with the row signature), H segment, L segment. Format 4
(X2LIDX04: without the row signatures), format 3 (X2LIDX03: without the text position either) and
format 2 (X2LIDX02, no checksums, no fingerprint) are read too, for old files and tests that must run
against older builds.
"""
from __future__ import annotations

import struct

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_M = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M
    return (_rotl(acc, 31) * _P1) & _M


def _merge(acc: int, v: int) -> int:
    acc ^= _round(0, v)
    return (acc * _P1 + _P4) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    data = bytes(data)
    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed & _M, (seed - _P1) & _M]
        lanes = struct.unpack_from(f"<{(n // 32) * 4}Q", data)
        for s in range(0, len(lanes), 4):
            v[0] = _round(v[0], lanes[s])
            v[1] = _round(v[1], lanes[s + 1])
            v[2] = _round(v[2], lanes[s + 2])
            v[3] = _round(v[3], lanes[s + 3])
        i = (n // 32) * 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for x in v:
            h = _merge(h, x)
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h ^= _round(0, struct.unpack_from("<Q", data, i)[0])
        h = (_rotl(h, 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h ^= (struct.unpack_from("<I", data, i)[0] * _P1) & _M
        h = (_rotl(h, 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M
        h = (_rotl(h, 11) * _P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    h ^= h >> 32
    return h


# ggml type id -> (block size, block bytes) for the KV tier types
ROW = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34)}
HEADER_I32 = ("n_layer", "n_head_kv", "head_dim", "n_embd", "ratio_low", "ratio_high", "pin_ends", "two_pass",
              "dense_positions", "next_pos")


class _Cursor:
    def __init__(self, raw: bytes):
        self.raw, self.off = raw, 0

    def take(self, fmt: str):
        off = self.off
        v = struct.unpack_from("<" + fmt, self.raw, off)[0]
        self.off += struct.calcsize("<" + fmt)
        return off, v

    def skip(self, n: int) -> int:
        off = self.off
        self.off += n
        return off

    def align(self) -> None:
        self.off = (self.off + 63) // 64 * 64


def layout(raw: bytes) -> dict:
    """Offsets of every field: {'version', 'fields': {name: (offset, fmt)}, 'sink': seg, 'chunks': [...],
    'sections': [(start, end)] (v3: the u64 checksum sits at end)}. seg = {'type', 'n': (off, fmt),
    'k', 'v': (offset, nbytes), 'pos': (offset, count)}."""
    c = _Cursor(raw)
    magic = raw[:8]
    if magic not in (b"X2LIDX02", b"X2LIDX03", b"X2LIDX04", b"X2LIDX05"):
        raise ValueError(f"not an index of format 2, 3, 4 or 5: {magic!r}")
    version = int(magic[6:])
    v3 = version >= 3  # checksummed sections and a fingerprint
    out: dict = {"version": version, "fields": {}, "chunks": [], "sections": []}
    f = out["fields"]
    start = 0

    def close_section():
        nonlocal start
        if v3:
            out["sections"].append((start, c.off))
            c.skip(8)
        c.align()
        start = c.off

    c.skip(8)
    for name in HEADER_I32:
        off, val = c.take("i")
        f[name] = (off, "i")
    hd = struct.unpack_from("<i", raw, f["head_dim"][0])[0]
    nl = struct.unpack_from("<i", raw, f["n_layer"][0])[0]
    nh = struct.unpack_from("<i", raw, f["n_head_kv"][0])[0]
    if v3:
        off, _ = c.take("Q")
        f["fingerprint"] = (off, "Q")
    off, clen = c.take("I")
    f["compressor_len"] = (off, "I")
    f["compressor"] = (c.skip(clen), f"{clen}s")
    off, nsink = c.take("Q")
    f["n_sink_tokens"] = (off, "Q")
    f["sink_tokens"] = (c.skip(4 * nsink), nsink)
    off, nchunks = c.take("Q")
    f["n_chunks"] = (off, "Q")
    if version >= 4:
        f["text_pos"] = (c.take("i")[0], "i")
    if not v3:
        c.align()
        start = c.off
    else:
        close_section()

    def segment():
        seg = {}
        seg["type"] = (c.take("I")[0], "I")
        t = struct.unpack_from("<I", raw, seg["type"][0])[0]
        off, n = c.take("q")
        seg["n"] = (off, "q")
        c.align()
        bs, bb = ROW[t]
        part = hd // bs * bb * n * nl * nh
        seg["k"] = (c.skip(part), part)
        c.align()
        seg["v"] = (c.skip(part), part)
        c.align()
        seg["pos"] = (c.skip(4 * n), n)
        if v3:
            close_section()
        else:
            c.align()
        return seg

    out["sink"] = segment()
    for _ in range(nchunks):
        ch = {}
        for name, fmt in (("tok_begin", "q"), ("tok_end", "q"), ("pos_begin", "i"), ("pos_end", "i"),
                          ("n_frames", "i")):
            ch[name] = (c.take(fmt)[0], fmt)
        for name, size in (("key_sig", 4), ("emb_sig", 4), ("low_pos", 4)) + ((("row_sig", 2),) if version >= 5 else ()):
            off, n = c.take("Q")
            ch["n_" + name] = (off, "Q")
            ch[name] = (c.skip(size * n), n)
        if v3:
            close_section()
        else:
            c.align()
        ch["high"] = segment()
        ch["low"] = segment()
        out["chunks"].append(ch)
    out["end"] = c.off
    return out


def get(raw, field) -> int:
    off, fmt = field
    return struct.unpack_from("<" + fmt, raw, off)[0]


def put(raw: bytearray, field, value) -> None:
    off, fmt = field
    struct.pack_into("<" + fmt, raw, off, value)


def reseal(raw: bytearray, lay: dict, offset: int | None = None) -> None:
    """Recompute the checksum of the section of layout `lay` (taken before the mutation) that holds
    `offset` (every section when None); formats 3 to 5."""
    for start, end in lay["sections"]:
        if offset is None or start <= offset < end:
            struct.pack_into("<Q", raw, end, xxh64(bytes(raw[start:end])))


def to_format3(raw: bytes) -> bytes:
    """A format 4 image (or a format 5 one, first rewritten as 4) rewritten as format 3 (as an older
    x2l-edge saved it): the header without its text position, re-sealed and re-padded; every later
    section is unchanged (each starts 64-byte aligned, so it moves by whole 64-byte steps)."""
    if raw[:8] == b"X2LIDX05":
        raw = to_format4(raw)
    lay = layout(raw)
    if lay["version"] != 4:
        raise ValueError("not a format 4 index")
    start, end = lay["sections"][0]
    off, _ = lay["fields"]["text_pos"]
    assert off + 4 == end, "the text position ends the header"
    payload = b"X2LIDX03" + raw[8:off]
    header = payload + struct.pack("<Q", xxh64(payload))
    header += bytes((-len(header)) % 64)
    return header + raw[(end + 8 + 63) // 64 * 64:]


def to_format4(raw: bytes) -> bytes:
    """A format 5 image rewritten as format 4 (as an older x2l-edge saved it): every chunk's row
    signature dropped from its meta section, every section re-sealed and re-aligned."""
    lay = layout(raw)
    if lay["version"] != 5:
        raise ValueError("not a format 5 index")
    cut = {}  # meta section start -> payload end without the row signature
    for ch in lay["chunks"]:
        for start, end in lay["sections"]:
            if start <= ch["n_row_sig"][0] < end:
                cut[start] = ch["n_row_sig"][0]
    out = bytearray()
    for start, end in lay["sections"]:
        payload = raw[start:cut.get(start, end)]
        if start == 0:
            payload = b"X2LIDX04" + payload[8:]
        out += payload + struct.pack("<Q", xxh64(bytes(payload)))
        out += bytes((64 - len(out) % 64) % 64)
    return bytes(out)
