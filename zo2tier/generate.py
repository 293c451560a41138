"""Text generation through the tiers: the model's own forward with a KV cache, every block streamed once per
decoding step for the whole batch.

Prompts are batched with left padding. The first step (prefill) runs the prompts; each later step runs the
batch's last tokens against the cache. The cache lives on the compute device; on a GPU where it would not fit
(``kv_cache="auto"``: its bytes against the free memory, less a margin), or with ``kv_cache="host"``, it is
kept in host RAM and each layer's part is brought up as the layer runs (transformers' offloaded
``DynamicCache``). Greedy decoding picks the argmax token; sampling divides the logits by ``temperature`` and draws with
a seeded generator, so a run is repeatable. Rows that produced an end-of-sequence token are padded until
every row is done, as ``transformers``' ``generate`` does, so greedy output matches it token for token.

Example::

    with ZOEngine.from_pretrained("stores/opt-13b", budget="device=20GiB,host=64GiB") as engine:
        for g in generate_text(engine, tokenizer, ["The capital of France is"], max_new_tokens=8):
            print(g.text)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

KV_CACHE_PLACES = ("auto", "device", "host")
_KV_MARGIN_BYTES = 1 << 30  # GPU memory left free besides the cache: activations, logits


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy (argmax); > 0 samples with ``seed``.
    ``kv_cache``: where the KV cache lives, ``"device"``, ``"host"`` or ``"auto"`` (the device if it fits)."""

    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1, e.g. 32")
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0: greedy)")
        if self.kv_cache not in KV_CACHE_PLACES:
            raise ValueError(f"kv_cache={self.kv_cache!r} is unknown; use one of {', '.join(KV_CACHE_PLACES)}")


def kv_cache_bytes(config: Any, batch: int, tokens: int, itemsize: int) -> int:
    """Bytes of the keys and values of ``batch`` sequences of ``tokens`` tokens over every layer."""
    heads = getattr(config, "num_attention_heads", 0) or 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(1, heads)
    return 2 * config.num_hidden_layers * batch * tokens * kv_heads * head_dim * itemsize


def _initial_cache(engine, batch: int, tokens: int, place: str):
    """None (the model makes its cache beside its hidden states) or an empty cache offloaded to host RAM."""
    if engine.device.type != "cuda" or place == "device":
        return None  # on the CPU the device is host RAM already
    if place == "auto":
        need = kv_cache_bytes(engine.model.config, batch, tokens, engine.compute_dtype.itemsize)
        free_bytes, _ = torch.cuda.mem_get_info(engine.device)
        if need + _KV_MARGIN_BYTES <= free_bytes:
            return None
    from transformers import DynamicCache

    return DynamicCache(config=engine.model.config, offloading=True)


@dataclass(frozen=True)
class Generation:
    """One prompt's result: ``text`` is the continuation only; ``tokens`` its token ids."""

    prompt: str
    text: str
    tokens: list[int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def generate_ids(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 sampling: Sampling, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
    """New token ids (B, <= max_new_tokens) after left-padded ``input_ids`` (B, T), through ``engine.forward``.

    Stops early once every row has produced an end-of-sequence token; finished rows get ``pad_token_id``."""
    device = engine.device
    ids = input_ids.to(device)
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask).to(device)
    eos = torch.tensor([] if eos_token_id is None else
                       [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    params = inspect.signature(engine.model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_key = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x names it cache
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers builds them
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    cache = _initial_cache(engine, ids.shape[0], ids.shape[1] + sampling.max_new_tokens, sampling.kv_cache)
    step_ids, step_pos, out = ids, positions, []
    for _ in range(sampling.max_new_tokens):
        result = engine.forward(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                use_cache=True, **{cache_key: cache}, **extra)
        cache, logits = result[cache_key], result.logits[:, -1, :].float()  # (B, V)
        token = _choose(logits, sampling.temperature, gen)
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token)
        if eos.numel():
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
        step_ids = token[:, None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        step_pos = step_pos[:, -1:] + 1
    return torch.stack(out, dim=1)


def _choose(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def generate_text(engine, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0, batch_size: int = 32, kv_cache: str = "auto") -> list[Generation]:
    """Generate a continuation for each prompt, ``batch_size`` prompts per batch (left padding)."""
    if not prompts:
        raise ValueError("no prompts given; pass --prompt TEXT or --prompts-file FILE")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    sampling = Sampling(max_new_tokens, temperature, seed, kv_cache)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    gen_cfg = getattr(engine.model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    _check_lengths(engine, tokenizer, prompts, max_new_tokens)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True)
        new = generate_ids(engine, enc["input_ids"], enc["attention_mask"], sampling=sampling, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id)
        for prompt, row in zip(chunk, new.tolist()):
            row = _until_eos(row, eos)
            results.append(Generation(prompt, tokenizer.decode(row, skip_special_tokens=True), row))
    return results


def _check_lengths(engine, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse an empty prompt, and a prompt plus ``max_new_tokens`` past the model's positions, before any
    decoding (a learned position table would fail mid-way)."""
    from zo2tier.model_ref import max_positions

    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i + 1} is empty (it encodes to no tokens); give it some text")
    limit = max_positions(engine.model.config.to_dict())
    longest = max(lengths)
    if limit is not None and longest + max_new_tokens > limit:
        i = lengths.index(longest)
        raise ValueError(f"prompt {i + 1} ({lengths[i]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                         f"model's {limit} positions; lower --max-new-tokens to {max(0, limit - lengths[i])} or less")


def _until_eos(row: list[int], eos: int | Sequence[int] | None) -> list[int]:
    """The tokens up to and including the first end-of-sequence token (the padding after it dropped)."""
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row
