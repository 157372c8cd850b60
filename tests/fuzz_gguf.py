"""atheris fuzz target for the GGUF reader: any input either parses or raises FormatError.

    python tests/fuzz_gguf.py -runs=100000 CORPUS_DIR       # seeds: tests/fuzz_corpus/gguf

Inputs are mutation recipes applied to a seed from the corpus (tests/fuzz_mutate.py), or raw files.
"""
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_mutate import mutate  # noqa: E402

with atheris.instrument_imports():
    import x2l_edge
    from x2l_edge import _core


SEEDS = []


def test_one(data: bytes) -> None:
    if SEEDS and data:
        data = mutate(SEEDS[data[0] // 2 % len(SEEDS)], data)
    try:
        f = _core.GGUFFile.from_bytes(data)
    except x2l_edge.FormatError:
        return
    for key in f.keys():
        f.get(key)
    for t in f.tensors():
        f.tensor_bytes(t[0])


if __name__ == "__main__":
    seed_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_corpus", "gguf")
    SEEDS.extend(open(os.path.join(seed_dir, n), "rb").read() for n in sorted(os.listdir(seed_dir)) if n.endswith(".gguf"))
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
