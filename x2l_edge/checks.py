"""Argument checks shared by the Python API: every value is checked here, before it reaches the native
layer, so a wrong type is a TypeError and a wrong value a ValueError naming the argument (never a
silent coercion such as top_k=1.7 -> 1, and never a binding's signature dump). docs/api.md lists
the whole error contract."""
from __future__ import annotations

import math
import operator
import os
from numbers import Real
from typing import Iterable


def integer(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (or numpy integer; not a bool, not a float) within [lo, hi]."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int (got {type(value).__name__} {value!r})")
    v = operator.index(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be {bounds} (got {v})")
    return v


def real(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite real number within [lo, hi] ((lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number (got {type(value).__name__} {value!r})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number (got {v})")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo} (got {v})")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi} (got {v})")
    return v


def integers(name: str, values: Iterable, *, lo: int | None = None, hi: int | None = None) -> list[int]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of ints (got {type(values).__name__})")
    return [integer(f"{name}[{i}]", v, lo=lo, hi=hi) for i, v in enumerate(values)]


def input_file(path, what: str) -> str:
    """A path to an existing regular file: FileNotFoundError, IsADirectoryError otherwise."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike (got {type(path).__name__})")
    p = os.fsdecode(os.fspath(path))
    if not os.path.exists(p):
        raise FileNotFoundError(2, f"{what} not found", p)
    if os.path.isdir(p):
        raise IsADirectoryError(21, f"{what} path is a directory", p)
    return p


SEED_MAX = 2**64 - 1


def sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, max_tokens) -> dict:
    """The sampler's arguments, checked (the native Sampler gets exactly these values)."""
    return dict(
        temperature=real("temperature", temperature, lo=0.0),
        top_k=integer("top_k", top_k, lo=0, hi=2**31 - 1),
        top_p=real("top_p", top_p, lo=0.0, hi=1.0, lo_open=True),
        min_p=real("min_p", min_p, lo=0.0, hi=1.0),
        repeat_penalty=real("repeat_penalty", repeat_penalty, lo=0.0, lo_open=True),
        repeat_last_n=integer("repeat_last_n", repeat_last_n, lo=0, hi=2**31 - 1),
        seed=integer("seed", seed, lo=0, hi=SEED_MAX),
        max_tokens=integer("max_tokens", max_tokens, lo=0),
    )
