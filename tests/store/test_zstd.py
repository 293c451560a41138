"""zstd on the disk tier is invisible: same losses and weights as the plain run, a lossless convert round trip,
a corrupted frame named, and stores of format v1 (and checkpoints without frame layouts) still open."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import zo2tier
from zo2tier.store.blockstore import BlockStore, StoreCorruptError
from zo2tier.store.format import StoreFormatError, read_manifest
from zo2tier.store.zstd import Zstd, parse_compress

BIG = {"device": "1GiB", "host": "1GiB", "disk": "1GiB"}
CFG = zo2tier.MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=3)
SMALL_FRAMES = Zstd(frame_bytes=4096)  # several frames per tiny block, so the frame threads really split it


def _all_disk(model):
    return {n: "disk" for n in zo2tier.ZOEngine.block_names(model)}


def _run(tmp_path, storage, compress, steps=4):
    model = tiny_model("llama")
    with zo2tier.ZOEngine(model, budget=BIG, disk_dir=tmp_path, config=CFG, placement=_all_disk(model),
                          storage={"disk": storage}, compress=compress, write_back_every=2) as engine:
        losses = [(r.loss_plus, r.loss_minus) for r in (engine.step(tiny_batch(seed=s)) for s in range(steps))]
        state = engine.state_dict()
        layouts = [engine.store.entry(r.index).zstd for r in engine.table if r.tier == "disk"]
    return losses, state, layouts


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_compressed_disk_tier_equals_plain(tmp_path, storage):
    ref_losses, ref_state, plain = _run(tmp_path / "plain", storage, None)
    losses, state, layouts = _run(tmp_path / "zstd", storage, SMALL_FRAMES)
    assert losses == ref_losses
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    assert all(x is None for x in plain)
    assert layouts and all(x is not None and len(x.frames) > 1 for x in layouts)
    with open(tmp_path / "zstd" / "manifest.json") as f:
        manifest = json.load(f)
    with open(tmp_path / "plain" / "manifest.json") as f:
        plain_manifest = json.load(f)
    assert manifest["version"] == 2 and plain_manifest["version"] == 1


def test_convert_from_store_round_trip_and_resume(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    report = zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False, compress=SMALL_FRAMES)
    m = read_manifest(str(tmp_path / "store"))
    assert all(b.zstd is not None for b in m.blocks[:-1]) and m.blocks[-1].zstd is None
    assert report.store_bytes < sum(b.nbytes for b in m.blocks)
    again = zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False, compress=SMALL_FRAMES)
    assert again.n_written == 0  # resumable and idempotent as before
    with pytest.raises(ValueError, match="other options"):
        zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    ref = model.state_dict()
    with zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG, config=CFG, placement=_all_disk(model)) as e:
        assert e.compress == SMALL_FRAMES  # taken from the store
        for key, value in e.state_dict().items():
            assert torch.equal(value, ref[key]), key  # fp32, lossless
        for s in range(3):
            e.step(tiny_batch(seed=s))
        e.save_checkpoint(tmp_path / "ck")
        e.step(tiny_batch(seed=3))
        want = e.state_dict()
    with zo2tier.ZOEngine.resume(tmp_path / "ck") as e:
        assert e.compress == SMALL_FRAMES
        e.step(tiny_batch(seed=3))
        for key, value in e.state_dict().items():
            assert torch.equal(value, want[key]), key


def test_plain_store_opened_with_compress_is_rewritten_compressed(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    assert read_manifest(str(tmp_path / "store")).to_json()["version"] == 1  # nothing compressed: still v1
    with zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG, placement=_all_disk(model),
                                     compress="zstd") as e:
        ref = model.state_dict()
        for key, value in e.state_dict().items():
            assert torch.equal(value, ref[key]), key
    m = read_manifest(str(tmp_path / "store"))
    assert all(b.zstd is not None for b in m.blocks[:-1])


@pytest.mark.parametrize("where", ["open", "disk read"])
def test_corrupted_frame_names_block_file_and_frame(tmp_path, where):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False, compress=SMALL_FRAMES)
    entry = read_manifest(str(tmp_path / "store")).blocks[1]
    path = os.path.join(tmp_path / "store", entry.file)
    engine = None
    if where == "disk read":
        engine = zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG, placement=_all_disk(model))
    with open(path, "r+b") as f:  # a byte inside frame 1
        f.seek(entry.zstd.slot_bytes + 10)
        b = f.read(1)
        f.seek(entry.zstd.slot_bytes + 10)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(StoreCorruptError) as err:
        if engine is None:
            zo2tier.ZOEngine.from_store(tmp_path / "store", budget=BIG)
        else:
            engine.step(tiny_batch())
    msg = str(err.value)
    assert entry.name in msg and path in msg and "zstd frame 1" in msg and "checksum" in msg
    with (
        BlockStore.open(tmp_path / "store", lock=engine is None) as s,
        pytest.raises(StoreCorruptError, match="zstd frame 1"),
    ):
        s.verify(1)
    if engine is not None:  # let go without close(), which would write back through the damaged block
        from zo2tier.tiers.store_dir import release_disk_dir

        engine.tiers.close()
        engine.store.close()
        release_disk_dir(engine.disk_dir)


def test_checkpoint_states_of_v1_still_adopt(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    with BlockStore.open(tmp_path / "store") as s:
        old = [e.state()[:5] for e in s.entries]  # a checkpoint written before format v2
        s.adopt(old)
        assert all(e.zstd is None for e in s.entries)


def test_unknown_version_and_compress_values_are_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    zo2tier.convert(tmp_path / "hf", tmp_path / "store", progress=False)
    path = tmp_path / "store" / "manifest.json"
    with open(path) as f:
        data = json.load(f)
    data["version"] = 3
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(StoreFormatError, match="version 3.*reads versions 1, 2"):
        BlockStore.open(tmp_path / "store")
    with pytest.raises(ValueError, match="'lz4' is unknown; use 'zstd' or 'none'"):
        parse_compress("lz4")
    with pytest.raises(ValueError, match="only the disk tier"):
        parse_compress({"host": "zstd"})
    with pytest.raises(ValueError, match="multiple of 4096"):
        Zstd(frame_bytes=1000)
    assert parse_compress(None) is None and parse_compress({"disk": "zstd"}) == Zstd()


def test_cli_compress_flag(tmp_path, capsys):
    from zo2tier import cli

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "store"), "--compress", "zstd",
                     "--no-progress"]) == 0
    assert all(b.zstd is not None for b in read_manifest(str(tmp_path / "store")).blocks[:-1])
    assert cli.main(["plan", str(tmp_path / "hf"), "--budget", "device=300KB,disk=1GiB", "--storage", "disk=bf16",
                     "--compress", "zstd", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "zstd-compressed" in out and "at ratio 0.780" in out and "zstd_h100.json" in out
    assert "estimated GPU peak (1x2048 tokens): " in out  # planned bytes + context, logits, loss, activations
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "s2"), "--compress", "lz4"])
    assert exit_.value.code == 2
    assert "argument --compress: compress='lz4' is unknown; use 'zstd' or 'none'" in capsys.readouterr().err
