"""The command line's contracts: generate's JSON lines, --version, help defaults, and bad input that ends in
one line naming the value and the fix (no traceback, nothing overwritten)."""

import json
import os
import subprocess
import sys
from typing import ClassVar

import pytest
from tiny_task import save_tiny_model, tiny_rows, write_csv

from zo2tier import cli


def _zo2tier(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "zo2tier", *args], capture_output=True, check=False, text=True, timeout=300,
                          cwd=cwd)


def _one_line_error(done, *fragments):
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    lines = [l for l in done.stderr.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    assert len(lines) == 1, done.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_generate_cli_contract(tmp_path):
    model = save_tiny_model(str(tmp_path / "m"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a third prompt\n\nand a fourth\n")
    done = _zo2tier("generate", "--model", model, "--prompt", "hello there", "--prompt", "good", "--prompts-file",
                    str(prompts), "--max-new-tokens", "5", "--greedy", "--device", "cpu",
                    "--budget", "device=1GiB,host=1GiB,disk=1GiB", "--disk-dir", str(tmp_path / "disk"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(l) for l in done.stdout.splitlines()]
    assert [l["prompt"] for l in lines] == ["hello there", "good", "a third prompt", "and a fourth"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    for line in lines:
        assert set(line) == {"prompt", "text", "tokens"}
        assert 1 <= len(line["tokens"]) <= 5
        assert line["text"] == tok.decode(line["tokens"], skip_special_tokens=True)  # the continuation only
    # greedy is repeatable, and sampling at a temperature runs
    again = _zo2tier("generate", "--model", model, "--prompt", "hello there", "--max-new-tokens", "5",
                     "--budget", "device=1GiB")
    assert json.loads(again.stdout.splitlines()[0]) == lines[0]
    hot = _zo2tier("generate", "--model", model, "--prompt", "x", "--max-new-tokens", "3", "--temperature", "0.8",
                   "--budget", "device=1GiB")
    assert hot.returncode == 0 and len(json.loads(hot.stdout)["tokens"]) <= 3


def test_version_help_and_module_entry():
    from zo2tier import __version__

    done = _zo2tier("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"zo2tier {__version__}"
    text = cli.build_parser().format_help()
    assert "larger than your GPU and RAM" in text and "argparse" not in text
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(sub) == {"plan", "convert", "export", "finetune", "generate"}
    for name, parser in sub.items():  # every flag with a value shows its default
        for action in parser._actions:
            if action.option_strings and action.help and action.default is not argparse_suppress() \
                    and not action.required and action.nargs != 0:
                assert "%(default)s" in parser.formatter_class(name).\
                    _get_help_string(action), (name, action.option_strings)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


@pytest.fixture
def task(tmp_path):
    model = save_tiny_model(str(tmp_path / "m"))
    train = write_csv(str(tmp_path / "train.csv"), tiny_rows(32, seed=0))
    test = write_csv(str(tmp_path / "test.csv"), tiny_rows(8, seed=1))
    return model, train, test


def _finetune(task, out, *extra):
    model, train, test = task
    return ["finetune", "--model", model, "--train", train, "--test", test, "--steps", "2", "--batch-size", "8",
            "--budget", "device=1GiB", "--out", str(out), "--no-progress", *extra]


def _main(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip()


def test_finetune_bad_input_is_one_line(task, tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("keep me")
    rc, err = _main(_finetune(task, existing), capsys)
    assert rc == 2 and "--out" in err and "is a file" in err and existing.read_text() == "keep me"
    rc, err = _main(_finetune(task, tmp_path / "o", "--steps", "0"), capsys)
    assert rc == 2 and err.endswith("--steps 0 must be an int >= 1")
    rc, err = _main(_finetune(task, tmp_path / "o", "--device", "cuda"), capsys)
    if not __import__("torch").cuda.is_available():
        assert rc == 2 and "--device 'cuda'" in err and "--device cpu" in err


def test_data_errors_name_the_file_and_the_fix(task, tmp_path, capsys):
    model, _train, test = task
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    rc, err = _main(_finetune((model, str(empty), test), tmp_path / "o1"), capsys)
    assert rc == 2 and "empty.csv has no data rows" in err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 au lait,positive\n".encode("latin-1"))
    rc, err = _main(_finetune((model, str(latin), test), tmp_path / "o2"), capsys)
    assert rc == 2 and "latin.csv is not utf-8 text" in err and "--encoding latin-1" in err
    rc, err = _main(_finetune(task, tmp_path / "o3", "--label-words", "positive=good,negative=bad",
                              "--label-column", "text"), capsys)
    assert rc == 2 and "none labelled" in err and "--label-column" in err


def test_rerun_into_an_existing_out_needs_resume_or_overwrite(task, tmp_path, capsys):
    out = tmp_path / "o"
    assert _main(_finetune(task, out), capsys)[0] == 0
    stamp = os.path.getmtime(out / "checkpoint" / "checkpoint.json")
    rc, err = _main(_finetune(task, out), capsys)
    assert rc == 2 and "already holds a fine-tune" in err and "--resume" in err and "--overwrite" in err
    assert os.path.getmtime(out / "checkpoint" / "checkpoint.json") == stamp  # untouched
    assert _main(_finetune(task, out, "--overwrite"), capsys)[0] == 0
    # the checkpoint is an engine checkpoint: ZOEngine.resume reads it
    from zo2tier import ZOEngine

    with ZOEngine.resume(out / "checkpoint") as engine:
        assert len(engine.log) == 2 and engine.extra_state["format"] == "zo2tier-finetune/2"


class _PieceTokenizer:
    """A stand-in tokenizer: known words are one token, 'terrible' is two pieces, anything else is <unk>."""

    unk_token, unk_token_id, bos_token_id, pad_token_id, eos_token_id = "<unk>", 1, None, 0, 0
    vocab: ClassVar[dict[str, int]] = {"<pad>": 0, "<unk>": 1, " great": 2, " terr": 3, "ible": 4, " It": 5, " was": 6, " film": 7}

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for word in text.replace(" ", "  ").split(" "):
            if not word:
                continue
            if word == "terrible":
                ids += [3, 4]
            else:
                ids.append(self.vocab.get(" " + word, 1))
        return {"input_ids": ids}

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_label_words_unknown_or_split_are_reported():
    from zo2tier.train.data import Example, LabelWords, Prompt, encode

    ex = [Example("good film", "positive"), Example("bad film", "negative")]
    with pytest.raises(ValueError, match=r"label word 'zzqx' maps to the unknown token '<unk>'"):
        encode(ex, Prompt("{text} It was", LabelWords.parse("positive=great,negative=zzqx")), _PieceTokenizer())
    with pytest.warns(UserWarning, match=r"label word 'terrible' is 2 tokens \[' terr', 'ible'\].*first token"):
        encode(ex, Prompt("{text} It was", LabelWords.parse("positive=great,negative=terrible")), _PieceTokenizer())


def test_convert_into_a_file_and_python_hints(tmp_path, capsys):
    model = save_tiny_model(str(tmp_path / "m"))
    target = tmp_path / "store.txt"
    target.write_text("keep")
    rc, err = _main(["convert", model, str(target)], capsys)
    assert rc == 2 and "is a file" in err and target.read_text() == "keep"
    assert cli.as_flags("some blocks are placed on disk but disk_dir is None; pass disk_dir='runs/disk'") == \
        "some blocks are placed on disk but disk_dir is None; pass --disk-dir runs/disk"


def test_export_takes_a_folder_or_a_store_and_writes_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zo2tier import convert

    model = save_tiny_model(str(tmp_path / "m"))
    convert(model, tmp_path / "store", progress=False)
    want = AutoModelForCausalLM.from_pretrained(model).state_dict()
    for src, out in ((model, tmp_path / "from-folder"), (str(tmp_path / "store"), tmp_path / "from-store")):
        rc, err = _main(["export", src, str(out)], capsys)
        assert rc == 0, err
        assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert all(__import__("torch").equal(got[k], want[k]) for k in want)
        AutoTokenizer.from_pretrained(out)


def test_an_os_error_is_one_line_not_a_traceback(task, tmp_path, capsys, monkeypatch):
    """A path the user may not write (permissions, a read-only file system) ends as one line, exit code 1."""
    from zo2tier import export_model

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "e"))

    monkeypatch.setattr(export_model, "export_model", read_only)
    rc, err = _main(["export", task[0], str(tmp_path / "e")], capsys)
    assert rc == 1 and err == f"zo2tier export: error: [Errno 30] Read-only file system: '{tmp_path / 'e'}'"


def test_a_negative_lr_in_e_notation_and_a_store_to_convert_get_their_own_messages(task, tmp_path, capsys):
    rc, err = _main(_finetune(task, tmp_path / "o", "--lr", "-1e-3"), capsys)
    assert rc == 2 and "--lr -0.001 is negative" in err
    from zo2tier.store.convert import convert

    convert(task[0], str(tmp_path / "store"), progress=False)
    rc, err = _main(["convert", str(tmp_path / "store"), str(tmp_path / "store2")], capsys)
    assert rc == 2 and "is already a zo2tier store" in err and not (tmp_path / "store2").exists()
