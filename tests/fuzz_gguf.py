"""atheris fuzz target for the GGUF reader: any input either parses or raises FormatError.

    python tests/fuzz_gguf.py -runs=100000 CORPUS_DIR
"""
import sys

import atheris

with atheris.instrument_imports():
    import x2l_edge
    from x2l_edge import _core


def test_one(data: bytes) -> None:
    try:
        f = _core.GGUFFile.from_bytes(data)
    except x2l_edge.FormatError:
        return
    for key in f.keys():
        f.get(key)
    for t in f.tensors():
        f.tensor_bytes(t[0])


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
