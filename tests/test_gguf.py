"""GGUF reader: every value type, versions, alignment, and malformed files (never a crash)."""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest

import x2l_edge
from x2l_edge import _core
from gguf_samples import sample_gguf_bytes


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_gguf_bytes(tmp_path_factory.mktemp("gguf"))


def _header_end(data: bytes) -> int:
    """Offset where the tensor-info table ends (parsed independently with the gguf package)."""
    import gguf
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
    r = gguf.GGUFReader(f.name)
    os.unlink(f.name)
    return r.data_offset, r


def test_all_value_types(sample):
    f = _core.GGUFFile.from_bytes(sample)
    assert f.version == 3
    assert f.get("t.u8") == 200 and f.value_type("t.u8") == "uint8"
    assert f.get("t.i8") == -100
    assert f.get("t.u16") == 60000
    assert f.get("t.i16") == -30000
    assert f.get("t.u32") == 4_000_000_000
    assert f.get("t.i32") == -2_000_000_000
    assert f.get("t.f32") == 1.5
    assert f.get("t.u64") == 2**63 + 5
    assert f.get("t.i64") == -(2**62)
    assert f.get("t.f64") == -2.25
    assert f.get("t.bool") is True
    assert f.get("t.str") == "héllo ✓"
    assert f.get("t.arr_str") == ["a", "bc", ""]
    assert f.get("t.arr_int") == [1, -2, 3]
    assert f.get("t.arr_f") == [0.5, 1.25]
    assert f.get("t.arr_nested") == [[1, 2], [3]]
    assert f.get("missing") is None
    names = [t[0] for t in f.tensors()]
    assert names == ["a", "b", "c"]
    a = np.frombuffer(f.tensor_bytes("a"), dtype=np.float32)
    np.testing.assert_array_equal(a, np.arange(64, dtype=np.float32))
    b = np.frombuffer(f.tensor_bytes("b"), dtype=np.float16)
    assert (b == 1).all() and b.size == 96
    assert f.tensors()[1][1] == [32, 3]  # ggml order: row length first


def test_version_2_and_custom_alignment(tmp_path):
    data = bytearray(sample_gguf_bytes(tmp_path, alignment=64))
    f = _core.GGUFFile.from_bytes(bytes(data))
    assert f.alignment == 64
    assert np.frombuffer(f.tensor_bytes("c"), dtype=np.float32).tolist() == [2.0] * 7
    data[4:8] = struct.pack("<I", 2)  # v2 has the same layout (64-bit counts)
    assert _core.GGUFFile.from_bytes(bytes(data)).version == 2
    data[4:8] = struct.pack("<I", 1)
    with pytest.raises(x2l_edge.FormatError, match="version 1"):
        _core.GGUFFile.from_bytes(bytes(data))
    data[4:8] = struct.pack("<I", 7)
    with pytest.raises(x2l_edge.FormatError, match="unsupported GGUF version"):
        _core.GGUFFile.from_bytes(bytes(data))


def test_bad_magic(sample):
    with pytest.raises(x2l_edge.FormatError, match="bad magic"):
        _core.GGUFFile.from_bytes(b"GGML" + sample[4:])


def test_every_truncation_is_a_clear_error(sample):
    # Each cut of the header/table region, and a sample of cuts inside the data.
    data_off, _ = _header_end(sample)
    cuts = list(range(0, data_off + 8)) + list(range(data_off, len(sample), 37))
    for n in cuts:
        if n >= len(sample):
            continue
        with pytest.raises(x2l_edge.FormatError, match="truncated|outside the file|bad magic|needs more bytes"):
            _core.GGUFFile.from_bytes(sample[:n])


def _tensor_info_offset(data: bytes, name: bytes) -> int:
    """Offset right after the name of tensor `name` in the tensor-info table."""
    i = data.rindex(struct.pack("<Q", len(name)) + name)  # the tensor table follows the metadata
    return i + 8 + len(name)


def test_tensor_type_offset_and_shape_errors(sample, tmp_path):
    # unknown tensor type
    d = bytearray(sample)
    p = _tensor_info_offset(d, b"a")  # n_dims u32, 2 x i64 dims, type u32, offset u64
    d[p + 4 + 16:p + 4 + 16 + 4] = struct.pack("<I", 99)
    with pytest.raises(x2l_edge.FormatError, match="unknown type id 99"):
        _core.GGUFFile.from_bytes(bytes(d))
    # offset out of range
    d = bytearray(sample)
    d[p + 24:p + 32] = struct.pack("<Q", 1 << 40)
    with pytest.raises(x2l_edge.FormatError, match="outside the file"):
        _core.GGUFFile.from_bytes(bytes(d))
    # misaligned offset
    d = bytearray(sample)
    d[p + 24:p + 32] = struct.pack("<Q", 4)
    with pytest.raises(x2l_edge.FormatError, match="not aligned"):
        _core.GGUFFile.from_bytes(bytes(d))
    # absurd dimension
    d = bytearray(sample)
    d[p + 4:p + 12] = struct.pack("<q", -5)
    with pytest.raises(x2l_edge.FormatError, match="invalid dimension"):
        _core.GGUFFile.from_bytes(bytes(d))
    # too many dimensions
    d = bytearray(sample)
    d[p:p + 4] = struct.pack("<I", 9)
    with pytest.raises(x2l_edge.FormatError, match="dimensions"):
        _core.GGUFFile.from_bytes(bytes(d))


def test_bad_metadata(sample):
    d = bytearray(sample)
    key = b"t.u8"
    i = d.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    d[i:i + 4] = struct.pack("<I", 77)
    with pytest.raises(x2l_edge.FormatError, match="unknown metadata value type 77"):
        _core.GGUFFile.from_bytes(bytes(d))
    d = bytearray(sample)
    key = b"t.arr_str"
    i = d.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4  # type, elem type -> count
    d[i:i + 8] = struct.pack("<Q", 2**40)
    with pytest.raises(x2l_edge.FormatError, match="array"):
        _core.GGUFFile.from_bytes(bytes(d))
    d = bytearray(sample)
    d[16:24] = struct.pack("<Q", 2**50)  # metadata count
    with pytest.raises(x2l_edge.FormatError, match="metadata count"):
        _core.GGUFFile.from_bytes(bytes(d))


def test_model_level_errors(tiny_hf, tmp_path):
    """Missing key/tensor, wrong shape, unsupported architecture and tensor type, on load."""
    import gguf

    src = gguf.GGUFReader(str(_convert(tiny_hf, tmp_path)))

    def rewrite(path, *, drop_key=None, drop_tensor=None, arch=None, reshape=None, retype=None):
        w = gguf.GGUFWriter(str(path), arch=arch or "llama")
        for field in src.fields.values():
            if field.name in ("general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
                continue
            if field.name == drop_key:
                continue
            vt = field.types[0]
            if vt == gguf.GGUFValueType.ARRAY:
                w.add_key_value(field.name, field.contents(), vt, sub_type=field.types[-1])
            else:
                w.add_key_value(field.name, field.contents(), vt)
        for t in src.tensors:
            if t.name == drop_tensor:
                continue
            arr = np.array(t.data)
            if t.name == reshape:
                arr = arr[:-1]
            if t.name == retype:  # IQ4_NL: a real ggml type (32-value blocks of 18 bytes) we do not run
                rows, cols = arr.shape
                w.add_tensor(t.name, np.zeros((rows, cols // 32 * 18), dtype=np.uint8),
                             raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
                continue
            w.add_tensor(t.name, arr, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(path)

    with pytest.raises(x2l_edge.FormatError, match="llama.block_count"):
        x2l_edge.Session(rewrite(tmp_path / "a.gguf", drop_key="llama.block_count"))
    with pytest.raises(x2l_edge.FormatError, match="blk.1.ffn_up.weight"):
        x2l_edge.Session(rewrite(tmp_path / "b.gguf", drop_tensor="blk.1.ffn_up.weight"))
    with pytest.raises(x2l_edge.FormatError, match="shape"):
        x2l_edge.Session(rewrite(tmp_path / "c.gguf", reshape="blk.0.attn_q.weight"))
    with pytest.raises(x2l_edge.FormatError, match="unsupported architecture 'mamba'"):
        x2l_edge.Session(rewrite(tmp_path / "d.gguf", arch="mamba"))
    with pytest.raises(x2l_edge.FormatError, match="(?i)iq4_nl.*not support"):
        x2l_edge.Session(rewrite(tmp_path / "e.gguf", retype="blk.0.ffn_down.weight"))
    # A file that is not GGUF at all, and an empty one.
    (tmp_path / "junk.gguf").write_bytes(b"hello world, not a model" * 10)
    with pytest.raises(x2l_edge.FormatError, match="bad magic"):
        x2l_edge.Session(tmp_path / "junk.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(x2l_edge.FormatError, match="truncated"):
        x2l_edge.Session(tmp_path / "empty.gguf")


def _convert(tiny_hf, tmp_path):
    import convert

    out = tmp_path / "src.gguf"
    convert.convert(str(tiny_hf["llama"]), str(out), "f32", progress=False)
    return out


def test_random_mutations_never_crash(sample):
    """Byte flips, insertions and cuts: the reader raises FormatError or accepts; it never crashes."""
    rng = random.Random(1234)
    n_err = 0
    for _ in range(3000):
        d = bytearray(sample)
        for _ in range(rng.randint(1, 4)):
            if not d:
                break
            op = rng.random()
            pos = rng.randrange(len(d))
            if op < 0.6:
                d[pos] = rng.randrange(256)
            elif op < 0.8:
                d[pos:pos + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63, 2**64 - 1, rng.randrange(2**32)]))
            else:
                del d[pos:]
        try:
            f = _core.GGUFFile.from_bytes(bytes(d))
            for t in f.tensors():  # whatever was accepted must be readable
                f.tensor_bytes(t[0])
        except x2l_edge.FormatError:
            n_err += 1
    assert n_err > 100


@pytest.mark.skipif(sys.platform != "linux", reason="atheris is linux-only here")
def test_atheris_fuzz_target_runs(sample, tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed.gguf").write_bytes(sample)
    target = os.path.join(os.path.dirname(__file__), "fuzz_gguf.py")
    r = subprocess.run([sys.executable, target, "-runs=4000", "-max_len=8192", str(corpus)],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 4000 runs" in r.stderr
