"""Where a Session computes: the one place the Python API decides between the CPU backend and a CUDA
device ('auto', 'cpu', 'cuda:N'), probes a device before trusting it, and falls back to the CPU with
one RuntimeWarning, given once per process. The C++ side builds whichever backend it is given (cpp/backends.cpp)."""
from __future__ import annotations

import os
import re
import warnings

from . import _core


_warned: set = set()


def warn_once(message: str, *, stacklevel: int = 2) -> None:
    """A RuntimeWarning the first time this message comes up in the process, then silence: a fallback
    said once is news, said at every Session is noise that hides other warnings."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def resolve(device: str, *, stacklevel: int = 3) -> int:
    """The CUDA device index for Session's device argument, or -1 for the CPU backend.

    'cpu' -> -1. 'cuda' / 'cuda:N' -> N when this build has the CUDA backend and device N exists;
    otherwise the CPU backend, with a one-line RuntimeWarning. 'auto' -> 0 when this build has the
    CUDA backend and a device is present at run time (open_llm then checks it, see auto_probe), -1
    otherwise: silently in a build without the CUDA backend, with a one-line RuntimeWarning in one
    whose device is missing. The CPU emulator of CUDA (tests/cuda_emu) is never picked by 'auto'."""
    if not isinstance(device, str):
        raise TypeError("device must be a str: 'auto', 'cpu' or 'cuda:N'")
    if device == "cpu":
        return -1
    if device == "auto":
        if not _core.cuda_built() or _core.cuda_emulated():
            return -1
        why = _unusable(0)
        if not why:
            return 0
        warn_once(f"x2l-edge: this build has the CUDA backend but no CUDA device is usable here ({why}); running "
                  "on the CPU. Pass device='cpu' (CLI: --device cpu) to say so and silence this.", stacklevel=stacklevel)
        return -1
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda:N' (got {device!r})")
    index = int(m.group(1) or 0)
    if not _core.cuda_built():
        why = "this build has no CUDA backend (no nvcc at build time)"
    elif _unusable(index):
        why = _unusable(index)
    else:
        return index
    warn_once(f"x2l-edge: {device} is not available ({why}); running on the CPU", stacklevel=stacklevel)
    return -1


def _unusable(index: int) -> str:
    """'' when a kernel of this build ran on CUDA device `index`, otherwise why not (no device, a driver
    too old for this build, no kernel image for the GPU's architecture)."""
    check = getattr(_core, "cuda_device_check", None)
    if check is None:
        return "" if _core.cuda_device_count() > index else f"{_core.cuda_device_count()} CUDA device(s) at run time"
    return check(index)


_PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
_PROBE_MIN_CORR = 0.95
_probed: dict = {}  # (model file, its mtime and size, device) -> None (agrees) or why not


def auto_probe(dev, path: str, n_threads: int) -> str | None:
    """None when `dev` (an LlmSession on a device) computes what the CPU backend computes for this
    model: the logits of a short probe prompt, row by row, correlate above _PROBE_MIN_CORR (quantized
    weights meet q8 activations on the CPU and f32 ones on the device, so the two never agree exactly;
    a broken kernel or an unsupported GPU gives NaNs or noise). Otherwise why not. Leaves dev empty."""
    import numpy as np

    ids = list(dev.tokenizer.encode(_PROBE_TEXT, parse_special=False, add_bos=True))[:16] or [0, 1, 2]
    cpu = _core.LlmSession(path, n_threads=n_threads, n_ctx=len(ids), n_batch=len(ids), device=-1)
    ref = np.asarray(cpu.eval(ids, all_logits=True), dtype=np.float64)
    try:
        got = np.asarray(dev.eval(ids, all_logits=True), dtype=np.float64)
    finally:
        dev.truncate(0)
    if not np.isfinite(got).all():
        return f"its logits on a {len(ids)}-token probe are not finite"
    corr = min(float(np.corrcoef(r, g)[0, 1]) for r, g in zip(ref, got))
    if not corr > _PROBE_MIN_CORR:
        return f"its logits disagree with the CPU backend's (correlation {corr:.3f} on a {len(ids)}-token probe)"
    return None


def _open_auto(path: str, index: int, **kw):
    """The LlmSession for device='auto' on CUDA device `index` and None, or None and why the CPU backend
    must run instead: kv_type other than f16, weights the kernels cannot read, not enough device
    memory, or a failed probe (auto_probe, run once per model file and device in a process)."""
    if kw["kv_type"] != "f16":
        return None, f"the CUDA backend keeps an f16 KV cache, kv_type is {kw['kv_type']}"
    try:
        dev = _core.LlmSession(path, device=index, **kw)
    except _core.FormatError:
        raise  # a broken file is broken on every backend
    except _core.Error as e:  # BudgetError included
        return None, str(e)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, index)
    if key not in _probed:
        try:
            _probed[key] = auto_probe(dev, path, kw["n_threads"])
        except Exception as e:  # noqa: BLE001 - any failure of the device run means: use the CPU
            _probed[key] = f"its probe run failed ({type(e).__name__}: {e})"
    if _probed[key]:
        return None, _probed[key]
    return dev, None


def open_llm(path: str, device: str, **kw):
    """(the _core.LlmSession for this device choice, 'cpu' or 'cuda:N' where it runs). kw: LlmSession's
    other arguments (n_threads, n_ctx, kv_type, n_batch, cuda_graphs)."""
    index = resolve(device, stacklevel=4)
    core = None
    if device == "auto" and index >= 0:
        core, why = _open_auto(path, index, **kw)
        if why:
            warn_once(f"x2l-edge: device='auto' does not use cuda:{index} ({why}); running on the CPU. Pass "
                      "device='cpu' (CLI: --device cpu) to silence this.", stacklevel=3)
            index = -1
    if core is None:
        core = _core.LlmSession(path, device=index, **kw)
    return core, "cpu" if index < 0 else f"cuda:{index}"


def open_vision(path: str, device: str, n_threads: int, tower=None):
    """The vision tower + projector of the model at path on `device` ('cpu' or 'cuda:N' as open_llm
    chose), or on the CPU with a RuntimeWarning when the device cannot hold it or read its weights.
    tower: the loader class (_core.VisionEncoder, or _core.QwenVision for Qwen's mergers)."""
    tower = tower or _core.VisionEncoder
    if device != "cpu":
        try:
            return tower.from_gguf(path, n_threads=n_threads, device=int(device.split(":")[1]))
        except _core.Error as e:  # a weight type the kernels do not read, or no room next to the LLM
            warn_once(f"x2l-edge: the vision tower does not run on {device} ({e}); encoding frames on the CPU",
                      stacklevel=3)
    return tower.from_gguf(path, n_threads=n_threads)
