"""``ZOTrainer``: a drop-in ``transformers.Trainer`` that trains with tiered MeZO instead of backprop.

Change the class and pass budgets; the rest of a Trainer script stays::

    trainer = ZOTrainer(model=model, args=TrainingArguments(output_dir="runs/hf", max_steps=1000,
                                                            learning_rate=1e-6, per_device_train_batch_size=16),
                        train_dataset=train, eval_dataset=dev, data_collator=collator,
                        budget="device=8GiB,host=32GiB,disk=200GiB", disk_dir="runs/disk")
    trainer.train(); trainer.evaluate(); trainer.save_model("runs/hf/final")

What carries over from ``TrainingArguments``: ``learning_rate`` with the Trainer's scheduler
(``lr_scheduler_type``, warmup), ``weight_decay``, ``seed``, ``max_steps``/``num_train_epochs``, batch sizes,
logging/eval/save intervals and callbacks. Settings that only make sense with gradients
(gradient accumulation, fp16/bf16 AMP, DeepSpeed, FSDP, activation checkpointing, torch.compile,
DataParallel over several GPUs, auto batch size) raise a ValueError that says what to do instead.
``max_grad_norm`` is ignored: there is no gradient to clip.

``model`` may also be a path (a zo2tier store, a Hugging Face folder or a GGUF): the engine then streams it
into its tiers and the model is never whole in RAM. ``save_model`` exports block by block (sharded
safetensors, the tokenizer). Each Trainer save writes an engine checkpoint to ``checkpoint-N/zo2tier``;
``train(resume_from_checkpoint=True)`` (the latest) or ``="OUT/checkpoint-N"`` continues from it.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerState
from transformers.trainer_utils import EvalPrediction, TrainOutput

from zo2tier.budget import BudgetLike
from zo2tier.config import MeZOConfig
from zo2tier.engine import ZOEngine
from zo2tier.zo.update import causal_lm_loss

ENGINE_DIR = "zo2tier"  # the engine checkpoint inside a Trainer checkpoint folder


def check_training_args(args: Any) -> None:
    """Raise ValueError for ``TrainingArguments`` that do not apply to zeroth-order training."""
    if args is None:
        return
    if getattr(args, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: MeZO has no gradients "
                         "to accumulate; set it to 1 and raise per_device_train_batch_size instead")
    if getattr(args, "fp16", False) or getattr(args, "bf16", False):
        raise ValueError("fp16/bf16 mixed precision (AMP, grad scaler) does not apply to MeZO, which runs forward "
                         "passes only; drop fp16=/bf16= and load the model in the dtype you want "
                         "(e.g. from_pretrained(..., dtype=torch.bfloat16))")
    if getattr(args, "deepspeed", None):
        raise ValueError("deepspeed does not apply: ZOTrainer places weights on device/host/disk itself; "
                         "drop deepspeed= and pass budget=")
    if getattr(args, "fsdp", None):
        raise ValueError("fsdp does not apply: ZOTrainer places weights on device/host/disk itself; "
                         "drop fsdp= and pass budget=")
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        raise ValueError("activation (gradient) checkpointing does not apply: MeZO keeps no activations for a "
                         "backward pass; set it to False")
    if getattr(args, "torch_compile", False):
        raise ValueError("torch_compile is not supported by ZOTrainer's block proxies; set it to False")
    if getattr(args, "auto_find_batch_size", False):
        raise ValueError("auto_find_batch_size is not supported; set per_device_train_batch_size")
    if getattr(args, "n_gpu", 1) > 1:
        raise ValueError(f"{args.n_gpu} GPUs are visible and Trainer would use DataParallel; ZOTrainer drives "
                         "one device: set CUDA_VISIBLE_DEVICES to one GPU")


class _NoOpOptimizer(torch.optim.Optimizer):
    """Holds the learning rate for the Trainer's scheduler; MeZO applies the update itself."""

    def __init__(self, lr: float) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": lr})

    def step(self, closure: Callable | None = None) -> None:
        return None


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is one tiered MeZO-SGD step (see the module docstring).

    Extra keywords: ``budget`` (``"device=8GiB,host=32GiB,disk=200GiB"``), ``disk_dir``, ``eps`` (1e-3),
    ``perturbation`` (``"gaussian"``), ``storage``, ``placement``, ``write_back_every``, and ``zo_loss_fn``
    (``loss_fn(logits, batch) -> float``; default: the causal-LM loss on ``batch["labels"]``).
    """

    def __init__(self, model: Any = None, args: Any = None, *, budget: BudgetLike, disk_dir: str | None = None,
                 eps: float = 1e-3, perturbation: str = "gaussian", storage: Mapping[str, str] | None = None,
                 placement: Mapping[str, str] | None = None, write_back_every: int | None = None,
                 zo_loss_fn: Callable[[torch.Tensor, Mapping[str, Any]], float] | None = None, **kwargs: Any):
        check_training_args(args)
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError("optimizers= does not apply: MeZO is the optimizer; use learning_rate and "
                             "lr_scheduler_type in TrainingArguments")
        if model is None:
            raise ValueError("ZOTrainer needs model=; model_init is not supported")
        self._model_ref = None
        if isinstance(model, (str, os.PathLike)):  # streamed from a store, a folder or a GGUF into the tiers
            from zo2tier.planning import planned_model

            self._model_ref = os.fspath(model)
            model = planned_model(self._model_ref).skeleton  # on meta: the Trainer's handle, never loaded
        super().__init__(model=model, args=args, **kwargs)
        check_training_args(self.args)
        config = MeZOConfig(lr=self.args.learning_rate, eps=eps, weight_decay=self.args.weight_decay,
                            seed=self.args.seed, perturbation=perturbation)
        self._engine_kwargs = {"budget": budget, "disk_dir": disk_dir, "device": self.args.device, "config": config,
                               "storage": storage, "placement": placement, "write_back_every": write_back_every}
        self._engine: ZOEngine | None = None
        self.zo_loss_fn = zo_loss_fn

    @property
    def engine(self) -> ZOEngine:
        """The tiered engine, built at first use (so ``train(resume_from_checkpoint=...)`` in a new process
        builds it from the checkpoint, never a fresh copy over the checkpoint's disk tier)."""
        if self._engine is None:
            if self._model_ref is not None:
                self._engine = ZOEngine.from_pretrained(self._model_ref, **self._engine_kwargs)
            else:
                self._engine = ZOEngine(self.model, **self._engine_kwargs)
        return self._engine

    def _move_model_to_device(self, model: Any, device: Any) -> None:
        pass  # the engine places every block in its tier

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = _NoOpOptimizer(self.args.learning_rate)
        return self.optimizer

    # ---- training -----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, **kwargs: Any) -> TrainOutput:
        """Run MeZO over the train dataloader with the Trainer's schedule, callbacks, logging and saving."""
        args = self.args
        start = self._resume(resume_from_checkpoint) if resume_from_checkpoint else 0
        loader = self.get_train_dataloader()
        per_epoch = len(loader)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        self.create_optimizer_and_scheduler(num_training_steps=max_steps)
        self.state = TrainerState(is_local_process_zero=self.is_local_process_zero(),
                                  is_world_process_zero=self.is_world_process_zero())
        self.state.max_steps, self.state.num_train_epochs = max_steps, math.ceil(max_steps / per_epoch)
        self.state.compute_steps(args, max_steps)
        self.state.global_step = start
        if start:  # the schedule where the checkpoint left it (the no-op optimizer steps first, as in _zo_step)
            self.optimizer.step()
        for _ in range(start):
            self.lr_scheduler.step()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        t0, total_loss, since_log, epoch = time.perf_counter(), 0.0, [], start // per_epoch
        skip = start % per_epoch  # batches of the resumed epoch already trained on
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
            for i, inputs in enumerate(loader):
                if skip:
                    skip -= 1
                    continue
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                loss = self._zo_step(self._prepare_inputs(inputs))
                total_loss += loss
                since_log.append(loss)
                self.state.global_step += 1
                self.state.epoch = epoch + (i + 1) / per_epoch
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                since_log = self._maybe_log_eval_save(since_log)
                if self.control.should_training_stop or self.state.global_step >= max_steps:
                    break
            epoch += 1
            self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
            since_log = self._maybe_log_eval_save(since_log)
        seconds = time.perf_counter() - t0
        metrics = {"train_runtime": seconds, "train_steps_per_second": self.state.global_step / max(seconds, 1e-9),
                   "train_loss": total_loss / max(1, self.state.global_step)}
        self.log(metrics)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _zo_step(self, inputs: Mapping[str, Any]) -> float:
        lr = self.lr_scheduler.get_last_lr()[0]
        result = self.engine.step(inputs, lr=lr, loss_fn=self.zo_loss_fn)
        self.optimizer.step()  # a no-op; keeps torch's scheduler-order check quiet
        self.lr_scheduler.step()
        self._last_lr, self._last_g = lr, result.projected_grad
        return 0.5 * (result.loss_plus + result.loss_minus)

    def _maybe_log_eval_save(self, since_log: list[float]) -> list[float]:
        if self.control.should_log and since_log:
            self.log({"loss": sum(since_log) / len(since_log), "learning_rate": self._last_lr,
                      "projected_grad": self._last_g})
            since_log = []
            self.control.should_log = False
        if self.control.should_evaluate:
            self.evaluate()
            self.control.should_evaluate = False
        if self.control.should_save:
            out = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            self.save_model(out, _internal_call=True)
            self.engine.save_checkpoint(os.path.join(out, ENGINE_DIR),
                                        extra_state={"global_step": self.state.global_step})
            self.state.save_to_json(os.path.join(out, "trainer_state.json"))
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            self.control.should_save = False
        return since_log

    # ---- evaluation and saving ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Unperturbed loss (and ``compute_metrics``) over the eval set, through the tiers."""
        loader = self.get_eval_dataloader(eval_dataset)
        total, n, preds, labels = 0.0, 0, [], []
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            logits = self.engine.logits(inputs)
            rows = logits.shape[0]
            if self.zo_loss_fn is not None:
                total += float(self.zo_loss_fn(logits, inputs)) * rows
            elif "labels" in inputs:
                total += causal_lm_loss(logits, inputs["labels"].to(logits.device)) * rows
            n += rows
            if self.compute_metrics is not None:
                out = logits
                if self.preprocess_logits_for_metrics is not None:
                    out = self.preprocess_logits_for_metrics(logits, inputs.get("labels"))
                preds.append(out.detach().cpu())
                labels.append(inputs["labels"].cpu() if "labels" in inputs else None)
        metrics = {f"{metric_key_prefix}_loss": total / max(1, n)}
        if self.compute_metrics is not None and preds:
            have_labels = all(lab is not None for lab in labels)
            found = self.compute_metrics(EvalPrediction(predictions=torch.cat(preds).numpy(),
                                                        label_ids=torch.cat(labels).numpy() if have_labels else None))
            metrics.update({k if k.startswith(metric_key_prefix) else f"{metric_key_prefix}_{k}": v
                            for k, v in found.items()})
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("ZOTrainer.predict is not supported; call trainer.engine.logits(batch) per batch")

    def _resume(self, checkpoint: str | bool) -> int:
        """Rebuild the engine from a checkpoint this trainer saved; returns its global step."""
        if checkpoint is True:
            found = [d for d in os.listdir(self.args.output_dir) if re.fullmatch(r"checkpoint-\d+", d)] \
                if os.path.isdir(self.args.output_dir) else []
            if not found:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir!r} holds no checkpoint-N "
                                 "folder; train without it, or pass a checkpoint folder")
            checkpoint = os.path.join(self.args.output_dir, max(found, key=lambda d: int(d.split("-")[1])))
        where = os.path.join(os.fspath(checkpoint), ENGINE_DIR)
        if not os.path.isfile(os.path.join(where, "checkpoint.json")):
            raise ValueError(f"{checkpoint!r} holds no ZOTrainer engine checkpoint ({ENGINE_DIR}/checkpoint.json); "
                             "pass a checkpoint-N folder a ZOTrainer saved")
        if self._engine is not None:
            self._engine.close()
        self._engine = ZOEngine.resume(where, device=self.args.device)
        return int(self._engine.extra_state["global_step"])

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from zo2tier.model_ref import copy_tokenizer_files, model_ref

        out = output_dir or self.args.output_dir
        self.engine.export(out)  # streamed, one block at a time
        if self.processing_class is not None:
            self.processing_class.save_pretrained(out)
        elif getattr(self, "_model_ref", None):
            copy_tokenizer_files(model_ref(self._model_ref), out)
        torch.save(self.args, os.path.join(out, "training_args.bin"))

    def close(self) -> None:
        """Write back pending updates and stop the engine's I/O threads."""
        if self._engine is not None:
            self._engine.close()
