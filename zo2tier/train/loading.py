"""Where a fine-tune's model comes from (a Hugging Face directory or a GGUF file) and where it goes.

GGUF files are read offline through ``transformers`` (needs the ``gguf`` package). A GGUF-loaded model
carries a ``quantization_config`` that ``save_pretrained`` refuses, so it is rebuilt from its config and
given the de-quantized state dict.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch


def find_gguf(path: str) -> str | None:
    """``path`` if it is a ``.gguf`` file; the one ``.gguf`` in ``path`` if it is a directory without
    safetensors; else None."""
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return path
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.safetensors")):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(found) > 1:
            raise ValueError(f"{path!r} holds {len(found)} .gguf files; pass the one you want as --model FILE")
        return found[0] if found else None
    return None


def load_gguf(path: str, *, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, de-quantized, as a plain ``PreTrainedModel`` with no
    ``quantization_config``. The whole model is in host RAM: use it for small models, or convert once
    with :func:`gguf_to_hf_dir` and stream the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or loaded.dtype)
    model.load_state_dict(state, strict=False)  # tied weights appear once or twice depending on the family
    model.tie_weights()
    del loaded, state
    return model.eval(), tokenizer


def gguf_to_hf_dir(path: str, out_dir: str, *, dtype: torch.dtype | None = None) -> str:
    """Convert a GGUF file into a Hugging Face directory (config, safetensors, tokenizer); returns out_dir.

    Skips the work when ``out_dir`` already holds a finished conversion of the same file.
    """
    stamp = os.path.join(out_dir, "zo2tier_source.json")
    source = {"gguf": os.path.abspath(path), "bytes": os.path.getsize(path)}
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == source:
                return out_dir
    model, tokenizer = load_gguf(path, dtype=dtype)
    save_hf_dir(out_dir, model.state_dict(), model.config, tokenizer)
    with open(stamp, "w") as f:
        json.dump(source, f)
    return out_dir


def save_hf_dir(out_dir: str, state: dict[str, torch.Tensor], config: Any, tokenizer: Any | None) -> None:
    """Write ``state`` as ``model.safetensors`` with ``config.json`` (and the tokenizer) into ``out_dir``,
    loadable by ``AutoModelForCausalLM.from_pretrained`` and ``ZOEngine.from_pretrained``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for key, t in state.items():  # a tied weight is stored once, under its first name (as HF does)
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.detach().to("cpu").contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config.dtype = next(iter(dtypes))
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
