"""Where the initial weights come from: an in-memory model, or a checkpoint streamed tensor by tensor."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator

import torch
from torch import nn

from zo2tier.model.names import name_resolver, tied_names


class StateSource:
    """Reads one named tensor at a time, and lists the keys ``model.state_dict()`` had.

    ``buffer_keys()`` maps each state-dict key to ``None`` for a parameter (tied names included) or to
    ``(module, buffer_name)`` for a persistent buffer.
    """

    def __init__(self, model: nn.Module) -> None:
        self._keys: dict[str, tuple[nn.Module, str] | None] = {}
        modules = dict(model.named_modules())
        param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        for key in model.state_dict(keep_vars=True):
            if key in param_names:
                self._keys[key] = None
            else:
                owner, _, leaf = key.rpartition(".")
                self._keys[key] = (modules[owner] if owner else model, leaf)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def buffer_keys(self) -> dict[str, tuple[nn.Module, str] | None]:
        return dict(self._keys)


class _InMemory(StateSource):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._params = dict(model.named_parameters())

    def get(self, name: str) -> torch.Tensor:
        return self._params[name].detach().to("cpu", torch.float32)


def in_memory_source(model: nn.Module) -> StateSource:
    """Initial weights from the model's own parameters."""
    return _InMemory(model)


class _Checkpoint(StateSource):
    """Safetensors (single or sharded) or ``pytorch_model.bin``, read lazily, one tensor at a time."""

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__(model)
        self._where: dict[str, str] = {}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if files:
            from safetensors import safe_open

            self._open = lambda f: safe_open(f, framework="pt")
            for f in files:
                with safe_open(f, framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - a safetensors safe_open handle is not iterable
                        self._where[key] = f
            self._kind = "safetensors"
        elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
            f = os.path.join(path, "pytorch_model.bin")
            self._bin = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            self._where = {k: f for k in self._bin}
            self._kind = "bin"
        else:
            raise ValueError(
                f"{path!r} holds no *.safetensors and no pytorch_model.bin; give a Hugging Face model directory"
            )
        self._resolve = name_resolver(model)(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._resolve.tensor(name, self._read).to(torch.float32)  # experts saved apart: merged

    def _read(self, key: str) -> torch.Tensor:
        if self._kind == "bin":
            return self._bin[key]
        with self._open(self._where[key]) as handle:
            return handle.get_tensor(key)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside, new parameters are created on the meta device; buffers stay real (rotary tables, masks).

    A parameter that is already on meta is registered as it is: tying (``lm_head.weight =
    embed_tokens.weight``) assigns the embedding's meta parameter, and a fresh copy would untie the two."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _GGUF(StateSource):
    """A GGUF file, one tensor dequantized at a time (zo2tier.model.gguf)."""

    def __init__(self, model: nn.Module, tensors) -> None:
        super().__init__(model)
        self._tensors = tensors
        self._tied = tied_names(model)

    def get(self, name: str) -> torch.Tensor:
        for n in self._tied.get(name, [name]):
            if n in self._tensors:
                return self._tensors.get(n)
        raise KeyError(f"{self._tensors.path} has no tensor for parameter {name!r}")


def gguf_skeleton(config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM ``config`` describes, parameters on meta (tied weights tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **cfg), dtype=dtype)
    model.tie_weights()
    return model.eval()


def gguf_skeleton_and_source(file: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, StateSource]:
    """The model a GGUF file holds, parameters on meta, and a source that dequantizes one tensor at a time."""
    from zo2tier.model.gguf import GGUFTensors
    from zo2tier.model_ref import gguf_config

    config = gguf_config(file)
    model = gguf_skeleton(config, dtype or torch.float32)
    return model, _GGUF(model, GGUFTensors(file, config, model))


def pretrained_skeleton(path: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, StateSource]:
    """A model built from ``path``'s config with parameters on meta, and a lazy source of its weights.

    ``path``: a Hugging Face folder, or a GGUF file (or a folder holding one and no other weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zo2tier.model_ref import model_ref

    if os.path.exists(path) and model_ref(path).kind == "gguf":
        return gguf_skeleton_and_source(model_ref(path).gguf, dtype)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; give a Hugging Face model directory with config.json")
    config = AutoConfig.from_pretrained(path)
    if dtype is None:
        dtype = _config_dtype(path)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # params_on_meta swapped the tied Parameter objects apart; tie them again
    model.eval()
    return model, _Checkpoint(model, path)


def _config_dtype(path: str) -> torch.dtype:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
