"""A GGUF file read tensor by tensor: memory-mapped by ``gguf.GGUFReader``, each tensor dequantized on its
own (``gguf.quants.dequantize``), so peak RSS is about the largest tensor in fp32, never the whole model.

Names and layouts follow transformers' own GGUF loader: the GGUF -> Hugging Face name map and the per-
architecture tensor processor (e.g. llama's q/k rows, which llama.cpp permutes for its rotary layout and
transformers permutes back) come from ``transformers.modeling_gguf_pytorch_utils``, so a streamed tensor is
equal to the one ``from_pretrained(dir, gguf_file=...)`` loads.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# processors that merge several GGUF tensors into one (MoE experts): they need the whole file at once
_MERGING = ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor")


class GGUFTensors:
    """The tensors of GGUF file ``path`` under the Hugging Face names of ``model`` (a skeleton, e.g. on meta,
    built from the file's config ``config``). Construction maps the file; :meth:`get` reads one tensor.

    Example::

        tensors = GGUFTensors("SmolLM2.Q4_1.gguf", config, skeleton)
        w = tensors.get("model.layers.0.self_attn.q_proj.weight")  # fp32, (576, 576)
    """

    def __init__(self, path: str, config: dict, model: torch.nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.path = os.path.abspath(path)
        self._reader = GGUFReader(self.path)  # np.memmap: pages come and go with the reads
        arch = read_field(self._reader, "general.architecture")[0]
        cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if cls.__name__ in _MERGING:
            raise ValueError(f"{path}: GGUF architecture {arch!r} merges expert tensors on load, which zo2tier "
                             "cannot stream yet; load it with transformers and save_pretrained it, then convert "
                             "that folder")
        self._processor = cls(config=config)
        self._to_hf = get_gguf_hf_weights_map(model, self._processor)
        self._tensors = {self._to_hf[t.name]: t for t in self._reader.tensors if t.name in self._to_hf}

    def keys(self):
        """The Hugging Face names this file holds."""
        return self._tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def nbytes_fp32(self, name: str) -> int:
        return int(np.prod(self._tensors[name].shape)) * 4

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to fp32, in the layout transformers loads it in."""
        t = self._tensors[name]
        result = self._processor.process(weights=_dequantize(t.data, t.tensor_type, int(t.n_elements)), name=t.name,
                                         tensor_key_mapping=self._to_hf, parsed_parameters={"tensors": {}, "config": {}})
        weights = result.weights
        if np.may_share_memory(weights, t.data):  # F32 tensors are views of the map: copy them out of it
            weights = np.array(weights, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))


_SLAB_BYTES = 16 << 20  # fp32 bytes dequantized at a time


def _dequantize(data: np.ndarray, qtype, numel: int) -> np.ndarray:
    """``gguf.dequantize`` of a quantized tensor's rows a slab at a time into one fp32 array: its numpy
    temporaries, several times what they dequantize, then stay the size of a slab instead of the tensor's."""
    from gguf import GGMLQuantizationType, dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or data.ndim < 2:
        return dequantize(data, qtype)
    rows = data.shape[0]
    step = max(1, _SLAB_BYTES // (4 * max(1, numel // rows)))
    out = None
    for a in range(0, rows, step):
        part = dequantize(data[a : a + step], qtype)
        if out is None:
            out = np.empty((rows, *part.shape[1:]), dtype=np.float32)
        out[a : a + len(part)] = part
    return out
