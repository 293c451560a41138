"""Where ``zo2tier convert`` reads weights: one tensor at a time, as fp32 chunks, never a whole model.

- safetensors (single or sharded): the header is parsed here and each chunk is read with ``pread`` into a
  reused buffer, so neither mmap nor a whole tensor ever counts against the converter's RSS;
- ``pytorch_model.bin``: ``torch.load(mmap=True)``, sliced;
- a GGUF file, memory-mapped, one tensor dequantized at a time (zo2tier.model.gguf);
- random init from a config: a normal(0, initializer_range) chunk keyed by (seed, tensor, chunk) for
  weights, ones for norm weights (zeros for Gemma's 1+w norms), zeros for biases. Honest for speed and
  memory, not for accuracy.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from collections.abc import Iterator

import torch

_ST = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class TensorSource:
    """Named tensors, read as flat fp32 chunks of at most ``chunk_numel`` elements."""

    kind = "tensors"

    def dtype_of(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def chunks(self, name: str, numel: int, chunk_numel: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


class SafetensorsSource(TensorSource):
    kind = "safetensors"

    def __init__(self, files: list[str], resolve) -> None:
        self._files = files
        self._index: dict[str, tuple[str, torch.dtype, int, int]] = {}  # key -> (file, dtype, start, end)
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _ST:
                    continue  # integer buffers and the like: not parameters
                start, end = meta["data_offsets"]
                self._index[key] = (f, _ST[meta["dtype"]], 8 + n + start, 8 + n + end)
        self._resolve = resolve(self._index)
        self._buf: bytearray | None = None

    def dtype_of(self, name: str) -> torch.dtype:
        return self._index[self._resolve.dtype_key(name)][1]

    def common_dtype(self) -> torch.dtype:
        sizes: dict[torch.dtype, int] = {}
        for _, dtype, start, end in self._index.values():
            sizes[dtype] = sizes.get(dtype, 0) + end - start
        return max(sizes, key=sizes.get)

    def chunks(self, name: str, numel: int, chunk_numel: int) -> Iterator[torch.Tensor]:
        if self._resolve.merge(name) is not None:  # experts saved apart: built whole, as transformers loads them
            yield from _chunked(name, self._resolve.tensor(name, self._whole), numel, chunk_numel)
            return
        file, dtype, start, end = self._index[self._resolve(name)]
        item = torch.empty((), dtype=dtype).element_size()
        if end - start != numel * item:
            raise ValueError(f"tensor {name} in {file} has {(end - start) // item} elements; the config wants {numel}")
        step = chunk_numel * item
        if self._buf is None or len(self._buf) < step:
            self._buf = bytearray(step)
        view = memoryview(self._buf)
        fd = os.open(file, os.O_RDONLY)
        try:
            pos = start
            while pos < end:
                n = min(step, end - pos)
                got = 0
                while got < n:
                    r = os.preadv(fd, [view[got:n]], pos + got)
                    if r <= 0:
                        raise OSError(f"{file} ended early while reading {name}; the file is truncated")
                    got += r
                yield torch.frombuffer(self._buf, dtype=dtype, count=n // item).float()
                pos += n
        finally:
            os.close(fd)

    def _whole(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._index[key][0], framework="pt") as handle:
            return handle.get_tensor(key)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": {os.path.basename(f): os.path.getsize(f) for f in self._files}}


def _chunked(name: str, tensor: torch.Tensor, numel: int, chunk_numel: int) -> Iterator[torch.Tensor]:
    flat = tensor.reshape(-1)
    if flat.numel() != numel:
        raise ValueError(f"tensor {name} has {flat.numel()} elements; the config wants {numel}")
    for a in range(0, numel, chunk_numel):
        yield flat[a : a + chunk_numel].float()


class DictSource(TensorSource):
    """Tensors already loaded (or mmap-ed): ``pytorch_model.bin``."""

    def __init__(self, tensors: dict[str, torch.Tensor], resolve, kind: str, files: list[str]) -> None:
        self._tensors = tensors
        self._resolve = resolve(tensors)
        self.kind = kind
        self._files = files

    def dtype_of(self, name: str) -> torch.dtype:
        return self._tensors[self._resolve.dtype_key(name)].dtype

    def common_dtype(self) -> torch.dtype:
        return next(t.dtype for t in self._tensors.values() if t.is_floating_point())

    def chunks(self, name: str, numel: int, chunk_numel: int) -> Iterator[torch.Tensor]:
        yield from _chunked(name, self._resolve.tensor(name, self._tensors.__getitem__), numel, chunk_numel)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": {os.path.basename(f): os.path.getsize(f) for f in self._files}}


class GGUFSource(TensorSource):
    """A GGUF file, one tensor dequantized at a time (zo2tier.model.gguf)."""

    kind = "gguf"

    def __init__(self, tensors, resolve) -> None:
        self._tensors = tensors
        self._resolve = resolve(set(tensors.keys()))
        self._cached: tuple[str, torch.Tensor] | None = None

    def dtype_of(self, name: str) -> torch.dtype:
        return torch.float32

    def common_dtype(self) -> torch.dtype:
        return torch.float32

    def chunks(self, name: str, numel: int, chunk_numel: int) -> Iterator[torch.Tensor]:
        flat = self._tensors.get(self._resolve(name)).reshape(-1)
        if flat.numel() != numel:
            raise ValueError(f"tensor {name} of {self._tensors.path} has {flat.numel()} elements; the config wants {numel}")
        for a in range(0, numel, chunk_numel):
            yield flat[a : a + chunk_numel]

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": {os.path.basename(self._tensors.path): os.path.getsize(self._tensors.path)}}


class RandomSource(TensorSource):
    """Random init of a config's shapes, generated chunk by chunk, the same bytes on every run."""

    kind = "random"

    def __init__(self, config: dict, dtype: torch.dtype, seed: int, decay: dict[str, bool]) -> None:
        self._std = float(config.get("initializer_range", 0.02) or 0.02)
        self._zero_norm = str(config.get("model_type", "")).startswith("gemma")
        self._dtype, self._seed, self._decay = dtype, seed, decay

    def dtype_of(self, name: str) -> torch.dtype:
        return self._dtype

    def chunks(self, name: str, numel: int, chunk_numel: int) -> Iterator[torch.Tensor]:
        key = zlib.crc32(name.encode()) ^ (self._seed << 32)
        for i, a in enumerate(range(0, numel, chunk_numel)):
            n = min(chunk_numel, numel - a)
            if name.endswith("bias"):
                yield torch.zeros(n)
            elif not self._decay.get(name, True):  # norm weights
                yield torch.zeros(n) if self._zero_norm else torch.ones(n)
            else:
                g = torch.Generator().manual_seed((key + 1_000_003 * i) % (1 << 63))
                yield torch.randn(n, generator=g).mul_(self._std).to(self._dtype).float()

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "seed": self._seed}


def safetensors_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))
