"""ZOTrainer: a Trainer script switches to tiered MeZO by changing the class and passing budgets."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from tiny_task import tiny_rows, tiny_tokenizer
from transformers import DataCollatorForLanguageModeling, TrainingArguments

from zo2tier import MeZOConfig, ZOEngine
from zo2tier.train.hf_trainer import ZOTrainer


def _dataset(n=16):
    tok = tiny_tokenizer()
    rows = [tok(r["text"] + " It was " + ("great" if r["label"] == "positive" else "terrible"))
            for r in tiny_rows(n)]
    return tok, [{"input_ids": r["input_ids"]} for r in rows]


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path / "hf"), "max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 8, "logging_steps": 2, "eval_strategy": "steps", "eval_steps": 3,
            "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0}
    return TrainingArguments(**(base | kw))


def _record_steps(engine):
    """Wrap ``engine.step`` to keep a copy of each batch and learning rate it is given."""
    calls, step = [], engine.step

    def recording_step(batch, *, lr=None, loss_fn=None):
        calls.append(({k: v.clone() for k, v in batch.items()}, lr))
        return step(batch, lr=lr, loss_fn=loss_fn)

    engine.step = recording_step
    return calls


def test_train_evaluate_save(tmp_path):
    tok, data = _dataset()
    trainer = ZOTrainer(model=tiny_model("llama"), args=_args(tmp_path), train_dataset=data, eval_dataset=data,
                        data_collator=DataCollatorForLanguageModeling(tok, mlm=False), processing_class=tok,
                        budget="device=1GiB,host=1GiB,disk=1GiB", disk_dir=str(tmp_path / "disk"),
                        placement={f"model.layers.{i}": t for i, t in enumerate(["device", "host", "disk", "disk"])})
    calls = _record_steps(trainer.engine)
    out = trainer.train()
    assert out.global_step == 6
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["learning_rate"] > 0 for h in logged)
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2  # steps 3 and 6
    # the Trainer's default schedule: linear decay from learning_rate to 0 over max_steps, no warmup
    assert [lr for _, lr in calls] == pytest.approx([1e-3 * (6 - s) / 6 for s in range(6)], rel=1e-12)
    first8 = trainer.evaluate(eval_dataset=data[:8])["eval_loss"]
    trainer.save_model(str(tmp_path / "final"))
    trainer.close()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    batch = DataCollatorForLanguageModeling(tok, mlm=False)(data[:8])
    with torch.no_grad():
        loss = reloaded(**batch).loss
    assert float(loss) == pytest.approx(first8, rel=1e-4)

    # the saved weights are exactly those of a plain engine (every block on the device) given the same
    # batches and learning rates with the same MeZOConfig: the Trainer adds scheduling, not a different step
    initial = tiny_model("llama").state_dict()
    config = MeZOConfig(lr=1e-3, eps=1e-3, weight_decay=0.0, seed=0)
    with ZOEngine(tiny_model("llama"), budget="device=1GiB", device="cpu", config=config) as reference:
        for batch, lr in calls:
            reference.step(batch, lr=lr)
        expected = reference.state_dict()
    saved = reloaded.state_dict()
    assert saved.keys() == expected.keys()
    for key in expected:
        assert torch.equal(saved[key], expected[key]), key
    assert any(not torch.equal(expected[k], initial[k]) for k in initial)  # and the steps moved the weights


@pytest.mark.parametrize("setting, match", [
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"activation_checkpointing": True}, "checkpointing"),
    ({"torch_compile": True}, "torch_compile"),
])  # fmt: skip
def test_settings_that_need_gradients_are_refused(tmp_path, setting, match):
    _tok, data = _dataset(4)
    with pytest.raises(ValueError, match=match):
        ZOTrainer(model=tiny_model("llama"), args=_args(tmp_path, **setting), train_dataset=data,
                  budget="device=1GiB")


def test_fp16_amp_is_refused():
    from types import SimpleNamespace

    from zo2tier.train.hf_trainer import check_training_args

    with pytest.raises(ValueError, match="fp16/bf16"):
        check_training_args(SimpleNamespace(gradient_accumulation_steps=1, fp16=True))
    with pytest.raises(ValueError, match="deepspeed"):
        check_training_args(SimpleNamespace(gradient_accumulation_steps=1, deepspeed="ds.json"))


def test_resume_from_its_own_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """A Trainer save holds an engine checkpoint; a new trainer resumes from it (no replay from step 0)."""
    tok, data = _dataset()
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    place = {f"model.layers.{i}": t for i, t in enumerate(["device", "host", "disk", "disk"])}

    def trainer(name, **kw):
        args = _args(tmp_path / name, save_strategy="steps", save_steps=3, eval_strategy="no",
                     lr_scheduler_type="constant", **kw)  # the cut run stops at 3 of 6 steps: same schedule
        return ZOTrainer(model=tiny_model("llama"), args=args, train_dataset=data, data_collator=collator,
                         processing_class=tok, budget="device=1GiB,host=1GiB,disk=1GiB",
                         disk_dir=str(tmp_path / name / "disk"), placement=place)

    full = trainer("full")
    full.train()
    want = full.evaluate(eval_dataset=data[:8])["eval_loss"]
    full.close()
    cut = trainer("cut", max_steps=3)
    cut.train()
    cut.close()
    resumed = trainer("cut")
    out = resumed.train(resume_from_checkpoint=True)
    assert out.global_step == 6
    assert resumed.engine.extra_state["global_step"] == 3
    assert resumed.evaluate(eval_dataset=data[:8])["eval_loss"] == want
    resumed.close()


def test_model_given_as_a_path_is_streamed_and_saved_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, data = _dataset()
    tiny_model("llama").save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    t = ZOTrainer(model=str(tmp_path / "src"), args=_args(tmp_path, max_steps=2, eval_strategy="no"),
                  train_dataset=data, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                  budget="device=1GiB")
    t.train()
    t.save_model(str(tmp_path / "final"))
    t.close()
    assert (tmp_path / "final" / "model.safetensors.index.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    AutoTokenizer.from_pretrained(tmp_path / "final")
