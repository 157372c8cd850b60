#!/usr/bin/env python3
"""Merge llama.cpp's two files (model.gguf + mmproj.gguf) into one GGUF that x2l-edge loads alone.

    python tools/merge_mmproj.py model.gguf mmproj.gguf out.gguf

The output holds every key and tensor of model.gguf, plus the mmproj's clip.* keys and its v.* / mm.*
tensors (docs/families.md §8: no name collides; the mmproj's general.* keys are dropped). Nothing is
re-encoded: headers are parsed with struct and tensor bytes copied as they are (quantized types
included), each at the model file's alignment, so a merge takes about as long as copying the files.
x2l_edge.Session(out.gguf) then finds the vision tower in the same file (Session(model, mmproj=...) and
Session(merged) run the same code on the same bytes).
"""
from __future__ import annotations

import argparse
import shutil
import struct
import sys

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class MergeError(Exception):
    """A file that is not a GGUF of the expected kind, or names that collide; the message says which."""


class _Header:
    """One GGUF header: raw KV records (key -> bytes from the key's length to the value's end), tensor
    infos (name, n_dims, ne, ggml type, offset) and where the data section starts."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        if d[:4] != b"GGUF":
            raise MergeError(f"{path}: not a GGUF file")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", d, 4)
        if self.version < 2:
            raise MergeError(f"{path}: GGUF version {self.version} is too old")
        off = 24
        self.kv: dict[str, bytes] = {}
        self.alignment = 32
        for _ in range(n_kv):
            start = off
            key, off = self._string(off)
            (vtype,) = struct.unpack_from("<I", d, off)
            value_at = off + 4
            off = self._skip(vtype, value_at)
            self.kv[key] = d[start:off]
            if key == "general.alignment":
                (self.alignment,) = struct.unpack_from("<I", d, value_at)
        self.tensors = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            (n_dims,) = struct.unpack_from("<I", d, off)
            ne = struct.unpack_from(f"<{n_dims}Q", d, off + 4)
            ggml_type, rel = struct.unpack_from("<IQ", d, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            self.tensors.append((name, ne, ggml_type, rel))
        self.data_start = (off + self.alignment - 1) // self.alignment * self.alignment
        self.path = path

    def _string(self, off):
        (n,) = struct.unpack_from("<Q", self.data, off)
        return self.data[off + 8:off + 8 + n].decode("utf-8"), off + 8 + n

    def _skip(self, vtype, off):
        if vtype == _STRING:
            return self._string(off)[1]
        if vtype == _ARRAY:
            etype, n = struct.unpack_from("<IQ", self.data, off)
            off += 12
            if etype in _SCALARS:
                return off + _SCALARS[etype] * n
            for _ in range(n):
                off = self._skip(etype, off)
            return off
        if vtype not in _SCALARS:
            raise MergeError(f"{self.path}: unknown GGUF value type {vtype}")
        return off + _SCALARS[vtype]

    def nbytes(self, ne, ggml_type) -> int:
        import gguf

        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise MergeError(f"{self.path}: unknown ggml type {ggml_type}") from None
        n = 1
        for x in ne:
            n *= x
        return n // block * size


def _record(name: str, ne, ggml_type: int, offset: int) -> bytes:
    raw = name.encode()
    return (struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<IQ", ggml_type, offset))


def _string_value(h: _Header, key: str) -> str | None:
    rec = h.kv.get(key)
    if rec is None:
        return None
    (n,) = struct.unpack_from("<Q", rec, 0)
    (vtype,) = struct.unpack_from("<I", rec, 8 + n)
    if vtype != _STRING:
        return None
    (m,) = struct.unpack_from("<Q", rec, 12 + n)
    return rec[20 + n:20 + n + m].decode("utf-8")


def merge(model_path: str, mmproj_path: str, out_path: str) -> dict:
    """Write out_path = model + the mmproj's clip.* keys and v.* / mm.* tensors. Returns a summary."""
    model, proj = _Header(model_path), _Header(mmproj_path)
    if _string_value(proj, "general.architecture") != "clip":
        raise MergeError(f"{mmproj_path}: not an mmproj file (general.architecture is not 'clip')")
    if _string_value(model, "general.architecture") in (None, "clip"):
        raise MergeError(f"{model_path}: not an LLM file (general.architecture is missing or 'clip')")
    clip_keys = {k: v for k, v in proj.kv.items() if k.startswith("clip.")}
    clash = sorted(set(clip_keys) & set(model.kv)) + sorted(
        {t[0] for t in proj.tensors} & {t[0] for t in model.tensors})
    if clash:
        raise MergeError(f"{model_path} already holds {', '.join(clash[:5])}: is it merged already?")
    align = model.alignment
    parts = [(model, t) for t in model.tensors] + [(proj, t) for t in proj.tensors]
    infos, offset = [], 0
    for h, (name, ne, ggml_type, rel) in parts:
        infos.append(_record(name, ne, ggml_type, offset))
        offset += (h.nbytes(ne, ggml_type) + align - 1) // align * align
    kv = list(model.kv.values()) + list(clip_keys.values())
    head = b"GGUF" + struct.pack("<IQQ", model.version, len(parts), len(kv)) + b"".join(kv) + b"".join(infos)
    head += b"\0" * ((-len(head)) % align)
    with open(out_path + ".tmp", "wb") as f:
        f.write(head)
        for h, (name, ne, ggml_type, rel) in parts:
            n = h.nbytes(ne, ggml_type)
            start = h.data_start + rel
            if start + n > len(h.data):
                raise MergeError(f"{h.path}: tensor '{name}' runs past the end of the file")
            f.write(h.data[start:start + n])
            f.write(b"\0" * ((-n) % align))
    shutil.move(out_path + ".tmp", out_path)
    return {"tensors": len(parts), "keys": len(kv), "vision_tensors": len(proj.tensors), "clip_keys": len(clip_keys)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("mmproj")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    try:
        info = merge(a.model, a.mmproj, a.out)
    except (MergeError, OSError) as e:
        print(f"merge_mmproj.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.out}: {info['tensors']} tensors ({info['vision_tensors']} from the mmproj), {info['keys']} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
