"""atheris fuzz target for saved X²L indexes: any image is refused with x2l_edge.Error or loads into an
index that a decoder can score, reload and answer on, without a crash.

    python tests/fuzz_index.py -runs=2000 CORPUS_DIR          # fuzz (seed: tests/fuzz_corpus/index)
    python tests/fuzz_index.py --make-seed tests/fuzz_corpus/index

Inputs are mutation recipes applied to a fresh seed index (tests/fuzz_mutate.py), or raw files.

The model is a tiny random qwen2 built at start (tests/tiny_models.py + tools/convert.py; its
dimensions are fixed, its weights need not be: the target writes the session's fingerprint into each
input, and checksums are not verified, so that mutations reach the field validation behind them and
the code that reads an index after it loaded).
"""
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tools"))

from fuzz_mutate import mutate  # noqa: E402

with atheris.instrument_imports():
    import x2l_edge
    from x2l_edge import _core
    from x2l_edge.x2l import VideoContext, prefill_chunks

FINGERPRINT_OFFSET = 8 + 10 * 4  # after the magic and ten int32 header fields (docs/security.md)
_state = {}


def _session():
    import convert
    import tiny_models

    d = Path(tempfile.mkdtemp(prefix="x2l_fuzz_index_"))
    hf = tiny_models.make_tiny_qwen2(d / "hf", seed=3, hidden_size=64, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64)
    convert.convert(str(hf), str(d / "m.gguf"), "f32", progress=False)
    return x2l_edge.Session(d / "m.gguf", n_threads=1, kv_type="f32", n_ctx=256, device="cpu")


def make_seed(session) -> bytes:
    ids = session.tokenize("a red star, then the number seven, then the secret word piano. " * 3, special=False)
    chunks = [ids[i:i + 8] for i in range(0, 24, 8)]
    index, _ = prefill_chunks(session, chunks, sink_ids=ids[:3], ratio_low=2, ratio_high=4, frames_per_chunk=2)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "seed.x2l")
        index.save(p)
        return open(p, "rb").read()


def test_one(data: bytes) -> None:
    s, fp = _state["session"], _state["fingerprint"]
    if data:
        data = mutate(_state["seed"], data)
    if len(data) >= FINGERPRINT_OFFSET + 8:
        data = data[:FINGERPRINT_OFFSET] + struct.pack("<Q", fp) + data[FINGERPRINT_OFFSET + 8:]
    try:
        ix = _core.VideoIndex.from_bytes(data, verify_checksums=False)
    except x2l_edge.FormatError:
        return
    n = ix.n_chunks
    ix.memory()
    ix.settings()
    has_signatures = n > 0
    for c in range(n):
        has_signatures &= ix.chunk_info(c)["signature_rows"] > 0
        ix.low_positions(c)
        ix.low_rows(c, 0, 0, True)
    try:
        ctx = VideoContext(s, ix, question_suffix="", max_answer_tokens=4)
    except x2l_edge.Error:
        return  # e.g. dimensions of another model, a sink id beyond the vocabulary
    for scorer in ("embedding", "keys", "maxsim", "attention"):
        if scorer == "maxsim" and not has_signatures:  # index format 3 or 4 (the corpus' raw file): refused
            try:
                ctx.scores("the secret word?", scorer=scorer)
            except x2l_edge.Error as e:
                assert "no row signatures" in str(e), e
                continue
            raise AssertionError("maxsim scored an index without row signatures")
        ctx.scores("the secret word?", scorer=scorer)
    ctx.ask("the secret word?", chunks=sorted({0, n - 1}), max_tokens=1)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seed":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        (out / "seed.x2l").write_bytes(make_seed(_session()))
        return
    _state["session"] = s = _session()
    _state["seed"] = seed = make_seed(s)
    _state["fingerprint"] = _core.VideoIndex.from_bytes(seed).settings()["model_fingerprint"]
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
