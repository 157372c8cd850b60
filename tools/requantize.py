#!/usr/bin/env python3
"""Re-encode the 2-D weights of a GGUF model to another type (e.g. the shipped Q4_1 SmolLM2 -> Q8_0).

    python tools/requantize.py IN.gguf OUT.gguf --outtype q8_0

Weights are dequantized with gguf.quants and re-quantized with it; 1-D tensors (norms) stay as
they are. Metadata is copied unchanged. Note that the result carries the rounding of the input
type: a Q8_0 made from Q4_1 has Q4_1's information at Q8_0's cost, which is what a speed
benchmark of the Q8_0 kernels needs.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0"}


def requantize(src_path: str, dst_path: str, outtype: str, progress: bool = True) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    if outtype not in TYPES:
        raise SystemExit(f"error: --outtype must be one of {', '.join(TYPES)}")
    qt = getattr(Q, TYPES[outtype])
    r = gguf.GGUFReader(src_path)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst_path, arch=arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, field.contents(), vt, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, field.contents(), vt)
    w.add_file_type(int({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3, "q5_0": 8}[outtype]))
    for i, t in enumerate(r.tensors):
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        if len(shape) >= 2 and shape[-1] % 32 == 0 and t.tensor_type != qt:
            x = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            if qt == Q.F32:
                w.add_tensor(t.name, x)
            elif qt == Q.F16:
                w.add_tensor(t.name, x.astype(np.float16))
            else:
                w.add_tensor(t.name, quantize(x, qt), raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        if progress:
            print(f"\r[{i + 1}/{len(r.tensors)}] {t.name}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--outtype", default="q8_0", choices=sorted(TYPES))
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    requantize(a.src, a.dst, a.outtype, progress=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
