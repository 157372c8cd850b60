"""A memory plan on paper for an 8 GB Jetson Orin Nano: how many minutes of 1-fps video a model can index
with X²L (H tier q8_0, L tier f16 or q8_0), from the models' layer and head counts. No GPU and no weights
needed; every input is an assumption written down below (docs/jetson.md shows the arithmetic).

    python bench/jetson_memory_plan.py [--out bench/results/jetson_memory_plan.json]

On a Jetson host and device share one DRAM, so the H tier (on the device), the L tier (page-locked host
memory, read in place by the kernels) and everything else come out of the same 8 GB.
"""
from __future__ import annotations

import argparse
import json
import os

GIB, MIB = 1 << 30, 1 << 20

# Bytes per stored value: f16 2; q8_0 a 34-byte block of 32 values; q4_0 an 18-byte block of 32.
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# Text decoders (config.json of each model): layers, KV heads, head_dim; params for the weights.
MODELS = {
    "Qwen2.5-0.5B": {"n_layer": 24, "n_kv_head": 2, "head_dim": 64, "params": 0.494e9, "tokens_per_frame": 144},
    "Qwen2.5-3B": {"n_layer": 36, "n_kv_head": 2, "head_dim": 128, "params": 3.09e9, "tokens_per_frame": 144},
    # SmolVLM2-500M's text model (SmolLM2-360M): 5 KV heads, 64 tokens per frame after pixel shuffle.
    "SmolVLM2-500M": {"n_layer": 32, "n_kv_head": 5, "head_dim": 64, "params": 0.362e9, "tokens_per_frame": 64},
}
VISION_PARAMS = {"Qwen2.5-0.5B": 0.40e9, "Qwen2.5-3B": 0.40e9, "SmolVLM2-500M": 0.093e9}  # SigLIP-so400m / SigLIP-B

ORIN_NANO_USABLE = 7.4 * GIB    # 8 GB LPDDR5 less firmware carve-outs, as `free` reports it on JetPack 6
OS_AND_SERVICES = 1.2 * GIB     # headless L4T + container runtime (assumption: measure with `free` on the board)
CUDA_CONTEXT = 0.3 * GIB        # the CUDA runtime's context and module images (no cuBLAS/cuDNN here)
HEADROOM = 0.5 * GIB            # page cache for the video decoder, fragmentation, the Python process
ACTIVATIONS = {"Qwen2.5-0.5B": 0.3 * GIB, "Qwen2.5-3B": 0.5 * GIB, "SmolVLM2-500M": 0.3 * GIB}  # one 10-frame chunk

RATIO_LOW, RATIO_HIGH = 2, 32   # the method's ratios (X2LOptions ships ratio_low 1: docs/jetson.md)
FPS = 1


def kv_bytes_per_token(m: dict, dtype: str) -> float:
    """K and V rows of one token over every layer and KV head."""
    return 2 * m["n_layer"] * m["n_kv_head"] * m["head_dim"] * BYTES_PER_VALUE[dtype]


def plan(name: str, weights: str, low_type: str, high_type: str = "q8_0") -> dict:
    m = MODELS[name]
    tpf = m["tokens_per_frame"]
    per_frame = {
        "low": tpf / RATIO_LOW * kv_bytes_per_token(m, low_type),
        "high": tpf / RATIO_HIGH * kv_bytes_per_token(m, high_type),
    }
    per_minute = (per_frame["low"] + per_frame["high"]) * 60 * FPS
    fixed = {
        "os_and_services": OS_AND_SERVICES,
        "cuda_context": CUDA_CONTEXT,
        "llm_weights": m["params"] * BYTES_PER_VALUE[weights],
        "vision_weights_f16": VISION_PARAMS[name] * 2,
        "activations": ACTIVATIONS[name],
        "headroom": HEADROOM,
    }
    left = ORIN_NANO_USABLE - sum(fixed.values())
    return {
        "model": name, "weights": weights, "low_type": low_type, "high_type": high_type,
        "tokens_per_frame": tpf, "ratio_low": RATIO_LOW, "ratio_high": RATIO_HIGH,
        "kv_bytes_per_token": {t: kv_bytes_per_token(m, t) for t in ("f16", "q8_0")},
        "bytes_per_frame": per_frame,
        "mib_per_minute": per_minute / MIB,
        "fixed_gib": {k: v / GIB for k, v in fixed.items()},
        "left_for_the_index_gib": left / GIB,
        "minutes": max(0.0, left / per_minute),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "jetson_memory_plan.json"))
    args = ap.parse_args()
    rows = [plan(name, w, low) for name, w in (("Qwen2.5-0.5B", "q8_0"), ("Qwen2.5-3B", "q8_0"), ("Qwen2.5-3B", "q4_0"),
                                               ("SmolVLM2-500M", "q8_0"))
            for low in ("f16", "q8_0")]
    out = {"device": "Jetson Orin Nano 8 GB (on paper: nothing here ran on a Jetson)", "usable_gib": ORIN_NANO_USABLE / GIB,
           "fps": FPS, "plans": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{'model':15s} {'weights':7s} {'L':5s} {'KV B/tok f16':>12s} {'MiB/min':>8s} {'fixed GiB':>9s} {'left GiB':>8s} {'minutes':>7s}")
    for r in rows:
        print(f"{r['model']:15s} {r['weights']:7s} {r['low_type']:5s} {r['kv_bytes_per_token']['f16']:12.0f} "
              f"{r['mib_per_minute']:8.1f} {sum(r['fixed_gib'].values()):9.2f} {r['left_for_the_index_gib']:8.2f} {r['minutes']:7.0f}")


if __name__ == "__main__":
    main()
