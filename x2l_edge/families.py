"""Which model + mmproj pairs the runtime runs (llama.cpp's two-file layout, docs/families.md §8): the checks
a pair passes before anything is encoded, each failure a FormatError naming what is missing."""
from __future__ import annotations

from . import _core

QWEN_PROJECTORS = ("qwen2vl_merger", "qwen2.5vl_merger")
IDEFICS3_PROJECTOR = "idefics3"  # SmolVLM2 / Idefics3: SigLIP + pixel shuffle, a llama LLM
INTERNVL_PROJECTOR = "internvl"  # InternVL 2.5 / 3: InternViT + pixel shuffle + MLP, a qwen2 LLM
SUPPORTED_PROJECTORS = QWEN_PROJECTORS + (IDEFICS3_PROJECTOR, INTERNVL_PROJECTOR, "mlp")  # mlp: tools/convert.py's LLaVA-style files


def media_module(session):
    """The module that lays out this model's media prompts (x2l_edge.qwen_vl, smolvlm or internvl), or
    None for the x2l-edge files whose frames go through Session.video_chunks."""
    if not session.has_vision:
        return None
    proj = session._vision_meta("clip.projector_type", "")
    if proj in QWEN_PROJECTORS:
        from . import qwen_vl

        return qwen_vl
    if proj == IDEFICS3_PROJECTOR:
        from . import smolvlm

        return smolvlm
    if proj == INTERNVL_PROJECTOR:
        from . import internvl

        return internvl
    return None


def check_pair(session) -> None:
    """FormatError unless session.mmproj is a vision file this runtime runs with session's LLM."""
    meta = session._vision_meta
    where = session.mmproj
    if meta("general.architecture") != "clip" or not meta("clip.has_vision_encoder", False):
        raise _core.FormatError(f"{where}: not an mmproj file (general.architecture = clip and "
                                "clip.has_vision_encoder = true expected)")
    gtype = meta("general.type")
    if gtype is not None and gtype != "mmproj":
        raise _core.FormatError(f"{where}: general.type is {gtype!r}, not 'mmproj'")
    proj = meta("clip.projector_type")
    if proj not in SUPPORTED_PROJECTORS:
        raise _core.FormatError(f"{where}: clip.projector_type {proj!r} is not supported (supported: "
                                f"{', '.join(SUPPORTED_PROJECTORS)})")
    if proj == "mlp" and meta("x2l.vision.kind") is None:
        # llama.cpp writes LLaVA mmproj files only with its legacy convert_image_encoder_to_gguf.py: its
        # convert_hf_to_gguf.py refuses LLaVA-1.5/1.6 (CLIP or SigLIP towers) and LLaVA-OneVision.
        raise _core.FormatError(f"{where}: an 'mlp' projector without x2l.vision.* keys is a llama.cpp LLaVA "
                                "mmproj (legacy convert_image_encoder_to_gguf.py), which x2l-edge does not run; "
                                "convert the Hugging Face LLaVA-OneVision checkpoint with tools/convert.py "
                                "into one GGUF instead")
    info = session.info
    dim = meta("clip.vision.projection_dim")
    if dim != info["n_embd"]:
        raise _core.FormatError(f"{where}: clip.vision.projection_dim {dim} differs from the LLM's width "
                                f"{info['n_embd']} ({session.path})")
    mrope = info.get("n_pos_axes", 1) == 3
    if (proj in QWEN_PROJECTORS) != mrope:
        raise _core.FormatError(f"{where}: projector {proj!r} needs an LLM with M-RoPE (general.architecture qwen2vl) "
                                f"and the reverse; {session.path} is {info['arch']!r}")
    if proj == "qwen2.5vl_merger" and meta("clip.vision.n_wa_pattern") is None:
        raise _core.FormatError(f"{where}: a Qwen2.5-VL mmproj lacks clip.vision.n_wa_pattern")
    if proj in (IDEFICS3_PROJECTOR, INTERNVL_PROJECTOR):
        family = media_module(session)
        for text in family.SPECIALS:
            ids = session.tokenize(text)
            if len(ids) != 1 or session._tok.token_bytes(ids[0]) != text.encode():
                raise _core.FormatError(f"{session.path}: the vocabulary has no {text} token, which an {proj} "
                                        f"({family.FAMILY_NAME}) mmproj's prompts need ({where})")
