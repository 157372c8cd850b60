"""Structure-aware inputs for the atheris targets. The C++ core is not built with coverage
instrumentation, so libFuzzer sees no new coverage from what the core does with an input and would
shrink its corpus to a one-byte file; instead each fuzz input is read as a recipe of mutations applied
to a valid seed file (bytes set, little-endian integers set to boundary values, cuts, insertions,
spans copied), so every run starts from a well-formed file and breaks it in a few places."""
from __future__ import annotations

import struct

import atheris

INTERESTING = [0, 1, 2, 7, 8, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def mutate(seed: bytes, data: bytes) -> bytes:
    """data (the fuzzer's input) -> a mutated copy of seed. The first byte's low bit keeps the raw
    input as the file instead, so the fuzzer's own mutations are tried too."""
    if data[:1] and data[0] & 1:
        return data[1:]
    fdp = atheris.FuzzedDataProvider(data[1:])
    out = bytearray(seed)
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        if not out:
            break
        op = fdp.ConsumeIntInRange(0, 5)
        pos = fdp.ConsumeIntInRange(0, len(out) - 1)
        if op == 0:  # one byte
            out[pos] = fdp.ConsumeIntInRange(0, 255)
        elif op in (1, 2):  # an aligned 4- or 8-byte field to a boundary value (+-1)
            size = 4 if op == 1 else 8
            pos -= pos % size
            v = (fdp.PickValueInList(INTERESTING) + fdp.ConsumeIntInRange(-1, 1)) % (1 << (8 * size))
            out[pos:pos + size] = struct.pack("<I" if size == 4 else "<Q", v)[: len(out) - pos]
        elif op == 3:  # cut
            del out[pos:]
        elif op == 4:  # insert
            out[pos:pos] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
        else:  # copy a span elsewhere
            n = fdp.ConsumeIntInRange(1, 64)
            src = fdp.ConsumeIntInRange(0, len(out) - 1)
            out[pos:pos + n] = out[src:src + n]
    return bytes(out)
