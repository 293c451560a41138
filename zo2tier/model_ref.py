"""What a model path names, parsed once at the edge: a zo2tier store, a Hugging Face folder, a GGUF file or a
bare config. Every front end (finetune, plan, export, generate, ``ZOEngine.from_pretrained``, ZOTrainer)
takes any of the four, through :func:`model_ref`.

A store is a complete model: besides its blocks it keeps the tokenizer, the generation config, the chat
template and a ``config.json`` with ``architectures`` in ``STORE/hf/`` (written by ``zo2tier convert``).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

KINDS = ("store", "hf", "gguf", "config")
HF_FILES_DIR = "hf"  # a store's tokenizer, generation config and config.json live in STORE/hf
# files a Hugging Face folder carries besides its weights, copied as they are into stores and exports
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
               "generation_config.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ModelRef:
    """A model path, classified. ``path`` is absolute; ``gguf`` is the GGUF file for ``kind == "gguf"``."""

    path: str
    kind: str
    gguf: str | None = None

    @property
    def files_dir(self) -> str | None:
        """The folder holding the tokenizer files (None for a GGUF, which carries them inside, and a config)."""
        if self.kind == "store":
            return os.path.join(self.path, HF_FILES_DIR)
        return self.path if self.kind == "hf" else None

    def config_dict(self) -> dict[str, Any]:
        """The model's config as a dict (``model_type`` and ``architectures`` included), read without weights."""
        if self.kind == "store":
            from zo2tier.store.format import read_manifest

            return dict(read_manifest(self.path).config)
        if self.kind == "gguf":
            return gguf_config(self.gguf)
        file = self.path if self.kind == "config" else os.path.join(self.path, "config.json")
        with open(file, encoding="utf-8") as f:
            return json.load(f)

    def tokenizer(self):
        """The model's tokenizer (``AutoTokenizer``); raises ValueError naming the model and the fix."""
        from transformers import AutoTokenizer

        if self.kind == "gguf":
            folder, name = os.path.split(self.gguf)
            return AutoTokenizer.from_pretrained(folder, gguf_file=name)
        where = self.files_dir
        if where is None or not any(os.path.exists(os.path.join(where, f)) for f in MODEL_FILES[:8]):
            fix = ("re-convert it with `zo2tier convert SRC STORE` from a source that has one (convert copies "
                   "the tokenizer into STORE/hf; stores converted before it did have none)" if self.kind == "store" else
                   "give a Hugging Face folder with tokenizer files, a GGUF, or a store converted from one")
            raise ValueError(f"model {self.path!r} has no tokenizer; {fix}")
        return AutoTokenizer.from_pretrained(where)


def model_ref(path: str | os.PathLike) -> ModelRef:
    """Classify ``path``: a store (has manifest.json), a GGUF file (or a folder whose only weights are one
    .gguf), a Hugging Face folder (config.json), or a config.json file. Raises FileNotFoundError/ValueError
    naming the path and what to give instead."""
    from zo2tier.store.format import MANIFEST

    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r} does not exist; give a zo2tier store, a Hugging Face folder, "
                                "a .gguf file or a config.json")
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return ModelRef(path, "gguf", path)
        if path.lower().endswith(".json"):
            return ModelRef(path, "config")
        raise ValueError(f"model {path!r} is a file but neither a .gguf nor a config.json; give a zo2tier store, "
                         "a Hugging Face folder, a .gguf file or a config.json")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return ModelRef(path, "store")
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    has_weights = glob.glob(os.path.join(path, "*.safetensors")) or os.path.exists(
        os.path.join(path, "pytorch_model.bin"))
    if ggufs and not has_weights:
        if len(ggufs) > 1:
            raise ValueError(f"{path!r} holds {len(ggufs)} .gguf files; pass the one you want, e.g. {ggufs[0]}")
        return ModelRef(path, "gguf", ggufs[0])
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelRef(path, "hf")
    from zo2tier.store.lock import MARKER

    if os.path.exists(os.path.join(path, MARKER)):
        raise ValueError(f"{path!r} holds zo2tier files but no manifest.json: a convert into it did not finish, or "
                         "it is a scratch disk folder; run `zo2tier convert SRC` into it again, or give another model")
    raise ValueError(f"{path!r} has no config.json, no manifest.json and no .gguf; give a zo2tier store, a "
                     "Hugging Face folder, a .gguf file or a config.json")


def gguf_config(file: str) -> dict[str, Any]:
    """The Hugging Face config of a GGUF file (metadata only; no tensor is read), with ``architectures``."""
    st = os.stat(file)
    return dict(_gguf_config(os.path.abspath(file), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_config(file: str, size: int, mtime_ns: int) -> dict[str, Any]:
    from transformers import AutoConfig

    folder, name = os.path.split(file)
    config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    config.pop("quantization_config", None)
    return with_architectures(config)


def with_architectures(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``architectures`` set to its causal-LM class when it names none."""
    if config.get("architectures"):
        return config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    return config if name is None else {**config, "architectures": [name]}


def max_positions(config: dict[str, Any]) -> int | None:
    """The most token positions the model's config allows (``max_position_embeddings``, GPT-2's
    ``n_positions``; a multimodal config's ``text_config``), or None where it names none."""
    config = {**(config.get("text_config") or {}), **config}
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def copy_tokenizer_files(ref: ModelRef, out_dir: str) -> list[str]:
    """Copy (or, for a GGUF, derive) ``ref``'s tokenizer files, generation config and chat template into
    ``out_dir``; its config.json is left alone. Returns the file names written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if ref.kind == "gguf":
        from transformers import GenerationConfig, PretrainedConfig

        tok = ref.tokenizer()
        written += [os.path.basename(f) for f in tok.save_pretrained(out_dir)]
        gen = GenerationConfig.from_model_config(PretrainedConfig(**gguf_config(ref.gguf)))
        gen.save_pretrained(out_dir)
        written.append("generation_config.json")
    elif ref.files_dir is not None and os.path.isdir(ref.files_dir):
        for name in MODEL_FILES:
            src = os.path.join(ref.files_dir, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
                written.append(name)
    return sorted(set(written) - {"config.json"})


def write_model_files(ref: ModelRef, out_dir: str, *, config: dict[str, Any] | None = None) -> list[str]:
    """Copy (or, for a GGUF, derive) the tokenizer files, generation config and chat template of ``ref`` into
    ``out_dir``, and write ``config.json`` (``config``, default the model's, with ``architectures``).

    Returns the file names written. A model without a tokenizer gets only its config (no error)."""
    written = copy_tokenizer_files(ref, out_dir)
    doc = with_architectures(dict(config if config is not None else ref.config_dict()))
    doc.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    return written + ["config.json"]
