"""Small GGUF images for reader tests and the fuzz target (written with the `gguf` package)."""
from __future__ import annotations

import numpy as np


def sample_gguf_bytes(tmp_dir, *, alignment: int | None = None) -> bytes:
    """A GGUF with one key of every metadata type, nested arrays, and three tensors."""
    import gguf

    path = str(tmp_dir / f"sample-{alignment}.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_str", ["a", "bc", ""])
    w.add_array("t.arr_int", [1, -2, 3])
    w.add_array("t.arr_f", [0.5, 1.25])
    w.add_array("t.arr_nested", [[1, 2], [3]])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.ones((3, 32), dtype=np.float16))
    w.add_tensor("c", np.full(7, 2.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()
