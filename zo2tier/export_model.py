"""``zo2tier export``: any model (a store, a Hugging Face folder, a GGUF) -> a Hugging Face folder, streamed.

The output is sharded safetensors with ``model.safetensors.index.json``, a ``config.json`` naming its
``architectures``, and the tokenizer, generation config and chat template; it loads with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. A store is read block by
block (its pending updates replayed); a folder or GGUF goes through an engine whose layers all sit in a
temporary disk tier, so at most one layer and the embeddings are in RAM at a time.
"""

from __future__ import annotations

import os
import tempfile

from zo2tier.model_ref import copy_tokenizer_files, model_ref

_ALL_ON_DISK = "device=64TiB,host=0,disk=64TiB"  # the placement below decides; the budget only has to allow it


def export_model(model: str | os.PathLike, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 << 30) -> str:
    """Write ``model`` as a Hugging Face folder in ``out_dir`` (new or empty); returns its path.

    Example::

        zo2tier.export_model("runs/ft/disk", "exports/tuned")  # a fine-tune's store
    """
    from zo2tier.store.export import export_store

    ref = model_ref(model)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"OUT_DIR {out_dir!r} is a file; give a new or empty directory")
    if ref.kind == "store":
        return export_store(ref.path, out_dir, max_shard_bytes=max_shard_bytes)
    if ref.kind == "config":
        raise ValueError(f"{ref.path!r} is a config without weights; `zo2tier convert {ref.path} STORE` gives it "
                         "random weights, then export STORE")
    from zo2tier.engine import ZOEngine
    from zo2tier.model.blocks import describe
    from zo2tier.planning import planned_model

    names = describe(planned_model(ref.path).skeleton).block_names
    os.makedirs(out_dir, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix=".zo2tier-export-", dir=os.path.dirname(out_dir)) as tmp,
        ZOEngine.from_pretrained(ref.gguf or ref.path, budget=_ALL_ON_DISK, disk_dir=tmp,
                                 placement={n: "disk" for n in names}) as engine,
    ):
        engine.export(out_dir, max_shard_bytes=max_shard_bytes)
    copy_tokenizer_files(ref, out_dir)
    return out_dir
