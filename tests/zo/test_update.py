"""The chunked causal-LM loss gives the very floats of ``F.cross_entropy`` on an fp32 copy of the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zo2tier.distributed import per_sample_token_losses
from zo2tier.zo import update
from zo2tier.zo.update import causal_lm_loss, next_token_log_probs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The loss as it was before chunking: one fp32 copy of all the shifted logits."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction=reduction)


def _case(b: int, t: int, v: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 4).to(dtype)  # (B, T, V)
    labels = torch.randint(0, v, (b, t), generator=g)  # (B, T)
    last = labels[:, -1].clone()
    labels[:, :3] = -100  # a prompt
    labels[torch.rand(b, t, generator=g) < 0.2] = -100  # and scattered unlabelled positions
    labels[:, -1] = last  # at least one labelled position per row (none labelled: see the NaN test)
    return logits, labels


def _assert_same(logits: torch.Tensor, labels: torch.Tensor) -> None:
    want = _reference(logits, labels)
    got = F.nll_loss(*next_token_log_probs(logits, labels), ignore_index=-100)
    assert torch.equal(got, want), (got.item(), want.item())
    assert causal_lm_loss(logits, labels) == want.item()
    want_sums = _reference(logits, labels, "none").view(labels.shape[0], -1).double().sum(dim=1)
    got_sums, counts = per_sample_token_losses(logits, labels)
    assert torch.equal(got_sums, want_sums)
    assert torch.equal(counts, (labels[:, 1:] != -100).sum(dim=1).double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 7), (2, 5, 11), (3, 40, 97), (2, 1030, 50), (1, 600, 32000)])
def test_chunked_loss_equals_full_fp32_cross_entropy(shape, dtype):
    _assert_same(*_case(*shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows", [1, 3, 8])
@pytest.mark.parametrize("t", [8, 9, 10, 25])  # T-1 one short of, at, one past and far past a chunk boundary
def test_chunk_boundaries_do_not_change_a_bit(monkeypatch, chunk_rows, t, dtype):
    monkeypatch.setattr(update, "LOSS_CHUNK_ROWS", chunk_rows)
    _assert_same(*_case(3, t, 33, dtype, seed=t))


def test_default_chunk_boundary():
    t = update.LOSS_CHUNK_ROWS + 1  # T-1 rows: exactly one chunk, then one past it
    for extra in (0, 1):
        _assert_same(*_case(1, t + extra, 19, torch.float16, seed=extra))


def test_nothing_labelled_is_nan_and_bad_labels_still_raise():
    logits = torch.randn(2, 5, 7)
    assert math.isnan(causal_lm_loss(logits, torch.full((2, 5), -100)))
    assert math.isnan(causal_lm_loss(logits[:, :1], torch.zeros(2, 1, dtype=torch.long)))  # T = 1
    for bad in (7, -3):
        labels = torch.zeros(2, 5, dtype=torch.long)
        labels[1, 2] = bad
        with pytest.raises((RuntimeError, IndexError)):
            causal_lm_loss(logits, labels)
