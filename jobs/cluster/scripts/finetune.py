"""A fine-tune run's trainer (docs/finetune.md): transformers, PEFT and TRL's SFTTrainer on the cluster's PyTorch
environment, started by finetune.sh with the run's files in its directory. It decides, where a test can reach it:

- the device and precision: the GPU's (bf16 where it has it, else fp16), fp32 on a node without CUDA;
- whether the method can run here: QLoRA needs CUDA and bitsandbytes, and stops with the reason if either is missing
  (never a quiet fallback to LoRA);
- where to go on from: the newest whole checkpoint (one torn by a kill mid-save is removed), so a requeued job
  trains exactly the planned steps in all (max_steps); else, for a run that trains another run's adapter further,
  that adapter (PEFT's, with its own shape), else a new LoRA adapter;
- when to stop early: at Slurm's warning (USR1, from finetune.sh) or TERM, with a checkpoint saved at that step;
- the base model's validation loss: evaluated once before the first step (step 0, where LoRA's B matrices are zero,
  so the adapter changes nothing yet; a parent's adapter is switched off for it), and kept from the progress file by
  a start that goes on from a checkpoint.

It writes its progress (step, epoch, losses, tokens/s, peak memory, the loss curve, and at the end the adapter's
record) to a JSON file, atomically, which the portal reads as hostile input. Exit codes: 0 every planned step
trained and the adapter written; 75 stopped at a warning after saving a checkpoint (the job requeues itself);
1 failed, with the reason in the error file. The heavy imports are inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from typing import Any

STOPPED = 75
MAX_POINTS = 200  # the loss curve the progress file keeps: thinned, never longer
TARGETS = {
    "all": "all-linear",
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qv": ["q_proj", "v_proj"],
}
METHODS = ("lora", "qlora", "full")
# The run's settings the portal writes (finetune.json), each with its type; anything else there is refused.
SETTINGS: dict[str, type | tuple[type, ...]] = {
    "run": str,
    "parent": str,  # the run whose adapter this one trains further, "" for a new adapter
    "method": str,
    "planned_steps": int,
    "learning_rate": (int, float),
    "lora_rank": int,
    "lora_alpha": int,
    "lora_dropout": (int, float),
    "target_modules": str,
    "max_seq_length": int,
    "batch_size": int,
    "gradient_accumulation": int,
    "gradient_checkpointing": bool,
    "checkpoint_every": int,
    "seed": int,
    "precision": str,
    "data_format": str,
}
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes")


class Failure(Exception):
    """The run cannot go on; the message is the reason the portal shows."""


def read_settings(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot read the run's settings: {exc}") from None
    if not isinstance(data, dict) or set(data) != set(SETTINGS):
        raise Failure("the run's settings are not the portal's")
    for key, kind in SETTINGS.items():
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise Failure(f"the run's setting {key} is not a {kind}")
    if data["method"] not in METHODS or data["target_modules"] not in TARGETS:
        raise Failure("the run's method or target modules are not the portal's")
    if data["precision"] not in ("bf16", "fp16") or min(data["planned_steps"], data["batch_size"]) < 1:
        raise Failure("the run's precision or steps are not the portal's")
    if data["parent"] and (not _UUID.fullmatch(data["parent"]) or data["method"] == "full"):
        raise Failure("the run's parent is not the portal's")
    return data


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def adapter_source(settings: dict[str, Any], parent: str, resume: tuple[str, int] | None) -> str | None:
    """Where the adapter it trains starts from: its own newest checkpoint when it goes on (a requeued run that trains
    a parent's adapter further goes on from its own steps), else the parent's adapter directory, which finetune.sh
    names for a run with a parent and only then, else nowhere (a new adapter)."""
    if bool(parent) != bool(settings["parent"]):
        raise Failure("the run's parent and the adapter the job names do not agree")
    if parent and os.path.basename(os.path.dirname(os.path.normpath(parent))) != settings["parent"]:
        raise Failure("the job names another run's adapter than the run's parent")
    if resume is not None:
        return resume[0]
    if not parent:
        return None
    if not os.path.isfile(os.path.join(parent, "adapter_config.json")):
        raise Failure(f"the adapter of the run it trains further, {settings['parent']}, is not in {parent}")
    return parent


def precision_for(planned: str, cuda: bool, bf16_supported: bool) -> str:
    """What the trainer computes in: the GPU's planned precision (fp16 where the GPU turns out to lack bf16), fp32 on
    a node without CUDA (a CPU has no fast half precision to train in)."""
    if not cuda:
        return "fp32"
    return "bf16" if planned == "bf16" and bf16_supported else "fp16"


def check_method(method: str, cuda: bool, bitsandbytes: bool) -> None:
    """QLoRA quantises the base model with bitsandbytes, which needs CUDA: refuse it here rather than train another
    way than the one asked for."""
    if method != "qlora":
        return
    if not cuda:
        raise Failure("QLoRA needs a CUDA GPU for bitsandbytes' 4-bit base model; this node has none")
    if not bitsandbytes:
        raise Failure("QLoRA needs bitsandbytes, which this environment does not have")


_CHECKPOINT = re.compile(r"checkpoint-([0-9]{1,9})")


def whole(path: str, step: int) -> bool:
    """A checkpoint a kill did not tear: its trainer state (written last) says its step, its optimizer is there."""
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    optimizer = os.path.isfile(os.path.join(path, "optimizer.pt"))
    return isinstance(state, dict) and state.get("global_step") == step and optimizer


def last_checkpoint(folder: str) -> tuple[str, int] | None:
    """The newest whole checkpoint and its step; newer torn ones are removed, so the trainer never trips on them."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return None
    found = sorted(
        ((int(m.group(1)), os.path.join(folder, name)) for name in names if (m := _CHECKPOINT.fullmatch(name))),
        reverse=True,
    )
    for step, path in found:
        if whole(path, step):
            return path, step
        shutil.rmtree(path, ignore_errors=True)
    return None


def write_atomically(path: str, data: dict[str, Any]) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"), allow_nan=False)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _number(value: Any, digits: int = 5) -> float | None:
    return round(float(value), digits) if isinstance(value, (int, float)) and math.isfinite(value) else None


def curve(history: list[dict[str, Any]], limit: int = MAX_POINTS) -> list[list[Any]]:
    """[step, training loss, validation loss] from the trainer's log history, one point a step that has either,
    thinned evenly to at most `limit` points (the last one always kept)."""
    points: dict[int, list[Any]] = {}
    for entry in history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        point = points.setdefault(step, [step, None, None])
        if "loss" in entry:
            point[1] = _number(entry["loss"])
        if "eval_loss" in entry:
            point[2] = _number(entry["eval_loss"])
    ordered = [points[step] for step in sorted(points)]
    if len(ordered) <= limit:
        return ordered
    stride = len(ordered) / (limit - 1)
    thinned = [ordered[int(i * stride)] for i in range(limit - 1)]
    return [*thinned, ordered[-1]]


def last_of(history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return _number(entry[key])
    return None


def earlier_base_loss(path: str) -> float | None:
    """The base model's validation loss an earlier start of this run measured, from its progress file."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    value = report.get("base_valid_loss") if isinstance(report, dict) else None
    return _number(value) if not isinstance(value, bool) else None


def peak_memory_gib(cuda: bool) -> float:
    if cuda:
        import torch

        return float(torch.cuda.max_memory_allocated()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


class Stop:
    """Slurm's warning (USR1) or TERM: the trainer saves a checkpoint at the end of the step and stops."""

    def __init__(self) -> None:
        self.signal = 0
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


def train(settings: dict[str, Any], args: argparse.Namespace, stop: Stop) -> int:  # pragma: no cover - the e2e tests
    import datasets
    import torch
    import transformers
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    try:
        import bitsandbytes  # noqa: F401

        has_bnb = cuda
    except ImportError:
        has_bnb = False
    method = settings["method"]
    check_method(method, cuda, has_bnb)
    precision = precision_for(settings["precision"], cuda, cuda and torch.cuda.is_bf16_supported())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    os.makedirs(args.checkpoints, exist_ok=True)
    resume = last_checkpoint(args.checkpoints)
    start_step = resume[1] if resume else 0
    source = adapter_source(settings, args.parent, resume) if settings["parent"] or args.parent else None

    load: dict[str, Any] = {"local_files_only": True}
    if method == "qlora":
        load["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        load["device_map"] = {"": 0}
    # LoRA's frozen base in the compute precision; full fine-tuning keeps fp32 weights under mixed precision.
    load["dtype"] = torch.float32 if method == "full" else dtype
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **load)
    peft_config = None
    if source is not None:
        # The adapter it trains further (or its own checkpoint of it), with the shape it was saved with; the
        # trainer's resume then loads that checkpoint's optimizer and scheduler as for any run.
        model = PeftModel.from_pretrained(model, source, is_trainable=True)
    elif method != "full":
        peft_config = LoraConfig(
            r=settings["lora_rank"],
            lora_alpha=settings["lora_alpha"],
            lora_dropout=float(settings["lora_dropout"]),
            target_modules=TARGETS[settings["target_modules"]],
            task_type="CAUSAL_LM",
        )
    files = {"train": args.train}
    if os.path.isfile(args.valid):
        files["validation"] = args.valid
    data = datasets.load_dataset("json", data_files=files)
    every = settings["checkpoint_every"]
    config = SFTConfig(
        output_dir=args.checkpoints,
        max_steps=settings["planned_steps"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation"],
        learning_rate=float(settings["learning_rate"]),
        gradient_checkpointing=settings["gradient_checkpointing"],
        max_length=settings["max_seq_length"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,  # the newest and the one before it, in case the newest is torn
        eval_strategy="steps" if "validation" in files else "no",
        eval_steps=every,
        include_num_input_tokens_seen="non_padding",
        seed=settings["seed"],
        data_seed=settings["seed"],
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    progress = Progress(args, settings, stop, cuda, precision, start_step)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[progress],
    )
    origin = source or (resume[0] if resume else "")
    print(f"finetune.py: {method} on {'cuda' if cuda else 'cpu'} in {precision}, steps {start_step + 1} to "
          f"{settings['planned_steps']}" + (f" from {origin}" if origin else ""), flush=True)  # fmt: skip
    progress.base_valid_loss = earlier_base_loss(args.progress)
    if "validation" in files and progress.base_valid_loss is None and not resume:
        # Step 0: the base model on the validation data, for the compare page's base against adapter.
        progress.evaluating_base = True
        if source is not None:  # the parent's adapter is trained already: its base without it
            with trainer.model.disable_adapter():
                progress.base_valid_loss = _number(trainer.evaluate().get("eval_loss"))
        else:
            progress.base_valid_loss = _number(trainer.evaluate().get("eval_loss"))
        progress.evaluating_base = False
        print(f"finetune.py: the base model's validation loss is {progress.base_valid_loss}", flush=True)
    trainer.train(resume_from_checkpoint=resume[0] if resume else None)
    step = trainer.state.global_step
    if step < settings["planned_steps"]:
        if stop.signal and step > start_step:
            progress.write("stopped")
            return STOPPED
        raise Failure(f"stopped at step {step} of {settings['planned_steps']} before making a step of its own")
    if "validation" in files:
        trainer.evaluate()
    trainer.save_state()  # trainer_state.json beside the checkpoints: every step's loss, once each
    staging = args.adapter + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(staging)
    shutil.rmtree(args.adapter, ignore_errors=True)
    os.replace(staging, args.adapter)
    progress.write("completed", result=progress.record(trainer.state.log_history, sorted(os.listdir(args.adapter))))
    return 0


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback

        return TrainerCallback  # type: ignore[no-any-return]
    except ImportError:  # the unit tests, on the portal's own Python
        return object


class Progress(_callback_base()):  # type: ignore[misc]
    """Writes the progress file on every log (each step) and turns a stop signal into a checkpoint at the step."""

    def __init__(
        self, args: argparse.Namespace, settings: dict[str, Any], stop: Stop, cuda: bool, precision: str, start: int
    ) -> None:
        self.path, self.settings, self.stop, self.cuda = args.progress, settings, stop, cuda
        self.precision, self.start_step, self.restarts = precision, start, args.restarts
        self.history: list[dict[str, Any]] = []
        self.step, self.epoch, self.tokens = start, 0.0, 0
        self.began = time.monotonic()
        self.tokens_at_start: int | None = None
        self.base_valid_loss: float | None = None
        self.evaluating_base = False  # the evaluation at step 0: not a step, and no start of the clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.stop.signal:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if self.evaluating_base:
            return control
        self.history, self.step, self.epoch = state.log_history, state.global_step, state.epoch or 0.0
        self.tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        if self.tokens_at_start is None:
            self.tokens_at_start, self.began = self.tokens, time.monotonic()
        self.write("running")
        return control

    def tokens_per_s(self) -> float:
        elapsed = time.monotonic() - self.began
        done = self.tokens - (self.tokens_at_start or 0)
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def record(self, history: list[dict[str, Any]], files: list[str]) -> dict[str, Any]:
        """The adapter's record: final losses, the libraries it was trained with, where and in what."""
        return {
            "train_loss": last_of(history, "loss"),
            "valid_loss": last_of(history, "eval_loss"),
            "steps": self.step,
            "tokens": self.tokens,  # input tokens trained on, padding left out, over every start (the trainer's state)
            "versions": versions(),
            "precision": self.precision,
            "device": "cuda" if self.cuda else "cpu",
            "files": files[:20],
        }

    def write(self, state: str, result: dict[str, Any] | None = None) -> None:
        report = {
            "state": state,
            "step": self.step,
            "planned_steps": self.settings["planned_steps"],
            "epoch": _number(self.epoch, 4),
            "train_loss": last_of(self.history, "loss"),
            "valid_loss": last_of(self.history, "eval_loss"),
            "base_valid_loss": self.base_valid_loss,
            "tokens_per_s": _number(self.tokens_per_s(), 1),
            "peak_memory_gib": _number(peak_memory_gib(self.cuda), 3),
            "precision": self.precision,
            "device": "cuda" if self.cuda else "cpu",
            "restarts": self.restarts,
            "resumed_from": self.start_step or None,
            "points": curve(self.history),
            "updated_at": int(time.time()),
        }
        if result is not None:
            report["result"] = result
        write_atomically(self.path, report)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model", "config", "train", "valid", "progress", "checkpoints", "adapter", "error"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--restarts", type=int, default=0)
    parser.add_argument("--parent", default="", help="the adapter directory of the run this one trains further")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stop = Stop()
    try:
        return train(read_settings(args.config), args, stop)
    except Failure as exc:
        message = str(exc)
    except Exception as exc:  # the libraries' own errors: the reason goes to the portal, the trace to the log
        import traceback

        traceback.print_exc()
        message = f"the trainer failed: {type(exc).__name__}: {exc}"
    print(f"finetune.py: {message}", file=sys.stderr, flush=True)
    with open(args.error + ".tmp", "w", encoding="utf-8") as f:
        f.write(message[:1900] + "\n")
    os.replace(args.error + ".tmp", args.error)
    return 1


if __name__ == "__main__":
    sys.exit(main())
