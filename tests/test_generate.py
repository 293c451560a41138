"""Generation through the tiers: greedy tokens equal transformers' generate on the same weights."""

import pytest
import torch
from tiny_models import tiny_model

from zo2tier import ZOEngine


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_matches_transformers_with_blocks_on_every_tier(tmp_path, arch):
    ids, mask = _prompts()
    ref = tiny_model(arch).generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                    eos_token_id=5, pad_token_id=0)[:, ids.shape[1]:]
    model = tiny_model(arch)
    place = {n: ("device", "host", "disk")[i % 3] for i, n in enumerate(ZOEngine.block_names(model))}
    with ZOEngine(model, budget="device=1GiB,host=1GiB,disk=1GiB", placement=place, disk_dir=tmp_path) as engine:
        out = engine.generate(ids, mask, max_new_tokens=12, eos_token_id=5, pad_token_id=0)
    assert torch.equal(out, ref)


def test_greedy_follows_the_updates(tmp_path):
    """After a step, generation sees the updated weights (the same as a model loaded from the engine's state)."""
    ids, mask = _prompts()
    with ZOEngine(tiny_model("opt"), budget="device=1GiB", config=None) as engine:
        from zo2tier import MeZOConfig

        engine.config = MeZOConfig(lr=1.0, eps=1e-2)  # a big step, so the weights visibly change
        engine.step({"input_ids": ids, "attention_mask": mask})
        state = engine.state_dict()
        out = engine.generate(ids, mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    model = tiny_model("opt")
    model.load_state_dict(state)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                         pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(out, ref)


def test_sampling_is_repeatable_and_checks_its_settings(tmp_path):
    ids, mask = _prompts()
    with ZOEngine(tiny_model("llama"), budget="device=1GiB") as engine:
        a = engine.generate(ids, mask, max_new_tokens=5, temperature=1.5, seed=7)
        b = engine.generate(ids, mask, max_new_tokens=5, temperature=1.5, seed=7)
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="max_new_tokens=0 must be an int >= 1"):
            engine.generate(ids, mask, max_new_tokens=0)
        with pytest.raises(ValueError, match="temperature=-1.0 must be"):
            engine.generate(ids, mask, max_new_tokens=1, temperature=-1.0)


def test_kv_cache_size_and_place_are_checked():
    from zo2tier.generate import kv_cache_bytes

    model = tiny_model("llama")  # 4 layers, 2 KV heads of 8 dims
    assert kv_cache_bytes(model.config, batch=3, tokens=10, itemsize=4) == 2 * 4 * 3 * 10 * 2 * 8 * 4
    ids, mask = _prompts()
    with ZOEngine(tiny_model("llama"), budget="device=1GiB") as engine:
        with pytest.raises(ValueError, match="kv_cache='gpu' is unknown; use one of auto, device, host"):
            engine.generate(ids, mask, max_new_tokens=1, kv_cache="gpu")
        # on the CPU the device is host RAM: every place gives the same tokens
        a = engine.generate(ids, mask, max_new_tokens=4, kv_cache="host")
        assert torch.equal(a, engine.generate(ids, mask, max_new_tokens=4, kv_cache="device"))


def test_an_empty_prompt_and_one_past_the_positions_are_refused_up_front():
    from tiny_task import tiny_tokenizer

    from zo2tier.generate import generate_text

    tok = tiny_tokenizer()
    with ZOEngine(tiny_model("opt"), budget="device=1GiB") as engine:  # 64 learned positions
        with pytest.raises(ValueError, match="prompt 2 is empty"):
            generate_text(engine, tok, ["good film", ""], max_new_tokens=2)
        with pytest.raises(ValueError, match=r"prompt 1 \(2 tokens\) plus --max-new-tokens 63 exceeds the model's 64 "
                                             r"positions; lower --max-new-tokens to 62"):
            generate_text(engine, tok, ["good film"], max_new_tokens=63)
        assert len(generate_text(engine, tok, ["good film"], max_new_tokens=62)[0].tokens) <= 62
