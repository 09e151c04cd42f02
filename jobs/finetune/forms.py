"""What a researcher asks for when starting a fine-tune run: the one definition, which the page, `manage.py finetune
create` (whose flags are the fields) and actions.create() share.

Where it runs is a launch's: the fields are the launch form's own (jobs.sessions.forms.LaunchForm: model, quantisation,
cluster, partition, GPU type and count, account, walltime, CPUs, memory), and LaunchForm checks them, on the cluster's
transformers runtime, where the trainer runs: the account, the partition's accounts and time limit, the GPUs, the model
on the cluster, the user's limits and allocations. The method and hyperparameters come from FineTuneRun's columns
(their limits, labels and help), and the training data is checked line by line (data.py) before anything is created.

A run may train further from one of the user's own completed LoRA or QLoRA runs (`from`: its uuid or model name,
ft:...): it takes the parent's base variant and adapter shape (INHERITED), and where it ran unless it is told
otherwise, on the parent's cluster and cluster user, whose home holds the adapter.
"""

from __future__ import annotations

import copy
import math
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import IO, Any

from django import forms
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.db import models

from catalog.estimate import Estimate, EstimateError, Request, fit
from catalog.models import ClusterAccount, ClusterRuntime, GPUType, ModelCard, ModelVariant
from catalog.training import PurposeRequest, estimate_purpose
from jobs.batch import inputs
from jobs.finetune import data
from jobs.models import FineTuneRun, TrainingRuntime
from jobs.sessions.forms import LaunchForm, column_field, form_errors

TRAINING_RUNTIME = "transformers"  # the cluster's PyTorch environment: transformers, PEFT and TRL
# The launch's fields a fine-tune run has: where it runs and on what. (A run trains on one node.)
WHERE = ("model", "quant", "cluster", "partition", "gpu", "gpus", "account", "walltime", "cpus", "memory_gib")
HYPERPARAMETERS = (
    "method", "epochs", "learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
    "max_seq_length", "batch_size", "gradient_accumulation", "gradient_checkpointing", "checkpoint_every", "seed",
)  # fmt: skip
BF16_FROM = (8, 0)  # compute capability from which a GPU computes in bf16 (Ampere); fp16 before (V100: 7.0)
BOOLEANS = ("gradient_checkpointing",)  # a choice of on and off below: a flag left out keeps the default
SIGNAL_LEAD_MAX_S = 300  # Slurm's warning before the time limit: room for a checkpoint of a large model
PARENT = "from"  # the run whose adapter a run trains further: the page's ?from=, `finetune create --from`
# The adapter's shape, which a run that trains it further keeps: PEFT loads the parent's adapter_config.json, so
# another rank, alpha, dropout or set of target modules would be another adapter, not this one trained further.
INHERITED = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")
# Where the parent ran, which a run that trains it further takes unless it names a cluster: WHERE less its base.
PLACEMENT = tuple(name for name in WHERE if name not in ("model", "quant"))


def limits() -> inputs.Limits:
    return inputs.Limits(
        max_bytes=settings.PORTAL_FINETUNE_MAX_BYTES,
        max_line_bytes=settings.PORTAL_BATCH_MAX_LINE_BYTES,
        max_prompts=settings.PORTAL_FINETUNE_MAX_EXAMPLES,
    )


def precision_of(gpu: GPUType) -> str:
    """bf16 where the GPU type's compute capability has it (or is not recorded), fp16 before Ampere."""
    try:
        major, minor = (int(part) for part in gpu.compute_capability.split(".")[:2])
    except ValueError:
        return "bf16"
    return "bf16" if (major, minor) >= BF16_FROM else "fp16"


def signal_lead_s(walltime_min: int) -> int:
    """How long before the time limit Slurm warns the job (a tenth of the walltime, at most five minutes)."""
    return max(10, min(SIGNAL_LEAD_MAX_S, walltime_min * 6))


@dataclass
class Checked:
    """Training data that passed: the files the trainer reads (temporary) and what the run records about them."""

    train: IO[bytes]
    valid: IO[bytes] | None
    columns: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for f in (self.train, self.valid):
            if f is not None:
                f.close()


DATA = ("training_file", "validation_file", "validation_split", "data_format")


def _data_fields() -> dict[str, forms.Field]:
    return {
        "training_file": forms.FileField(
            label="training data", help_text='JSONL: chats ({"messages": [...]}) or {"prompt", "completion"}'
        ),
        "validation_file": forms.FileField(
            label="validation data", required=False, help_text="the same format; or a split of the training data"
        ),
        "validation_split": forms.FloatField(
            required=False,
            min_value=0.01,
            max_value=0.5,
            help_text="a fraction of the training data held out for the validation loss (without a validation file)",
        ),
        "data_format": forms.ChoiceField(
            required=False, choices=[("", "detect from the first line"), *((f, f) for f in data.FORMATS)]
        ),
    }


def continuable(user: User, model: str = "") -> models.QuerySet[FineTuneRun]:
    """The user's own runs whose adapters a run may train further (completed, LoRA or QLoRA), of `model` if named,
    newest first."""
    runs = FineTuneRun.objects.filter(owner=user, state=FineTuneRun.State.COMPLETED).exclude(
        method=FineTuneRun.Method.FULL
    )
    if model:
        runs = runs.filter(variant__model__name=model)
    return runs.select_related("variant__model", "owner", "cluster", "partition", "gpu_type", "account")


def own_run(user: User, name: str) -> FineTuneRun | None:
    """The user's own run that `name` names: its uuid, or its model name (FineTuneRun.model_name, ft:...); None for
    anything else, another user's run (shared or not) included."""
    runs = FineTuneRun.objects.filter(owner=user).select_related(
        "variant__model", "owner", "cluster", "partition", "gpu_type", "account"
    )
    parts = name.split(":")
    if len(parts) == 5 and parts[0] == "ft":
        _, base, owner, suffix, short = parts
        if owner != user.get_username() or len(short) != 8:
            return None
        found = runs.filter(variant__model__name=base, suffix=suffix)
        return next((run for run in found if run.model_name == name), None)
    try:
        return runs.filter(pk=uuid.UUID(name)).first()
    except ValueError:
        return None


def parent_refusal(run: FineTuneRun) -> str:
    """Why a run cannot train the run's adapter further; "" when it can."""
    name = run.model_name
    if run.state != FineTuneRun.State.COMPLETED:
        return f"{name} is {run.state}: only a completed run has an adapter to train further."
    if run.method == FineTuneRun.Method.FULL:
        return f"{name} fine-tuned the whole model: it has no adapter to train further; train from its base."
    return ""


def parent_values(run: FineTuneRun) -> dict[str, Any]:
    """The fields a run that trains the run's adapter further takes from it unless it is given them: the base
    variant, the method, the adapter's shape and where it ran (the form's initial values for ?from=)."""
    return {
        PARENT: str(run.pk),
        "model": run.variant.model.name,
        "quant": run.variant.quantization,
        "cluster": run.cluster.slug,
        "partition": run.partition.name,
        "gpu": run.gpu_type.name,
        "gpus": run.gpus_per_node,
        "account": run.account_id,
        "walltime": run.walltime_min,
        "cpus": run.cpus_per_node,
        "memory_gib": run.memory_gib,
        "method": run.method,
        **{name: getattr(run, name) for name in INHERITED},
    }


class FineTuneForm(forms.Form):
    """A fine-tune run: where (the launch's fields), how (the method and hyperparameters), on what (the data), and
    the run whose adapter it trains further, if any. Its fields are set below the class, from where each is
    defined."""

    checked: Checked | None = None
    estimate: Estimate | None = None

    def __init__(self, *args: Any, user: User, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        self.run_columns: dict[str, Any] = {}
        self.parent: FineTuneRun | None = None
        named = str(self.data.get(PARENT) or "").strip() if self.is_bound else ""
        if named:
            self.parent = own_run(user, named)
            if self.parent is not None:
                self.data = self._with_parents(self.parent)

    def _with_parents(self, parent: FineTuneRun) -> Any:
        """The data, with what it leaves out taken from the parent: its base and shape, and where it ran (but its
        CPUs and memory where the data names another partition or GPU type)."""
        data = self.data.copy()  # type: ignore[attr-defined]  # a QueryDict or a dict: both copy
        given = {name for name in self.fields if data.get(name) not in (None, "")}
        inherited = parent_values(parent)
        names = ["model", "quant", "method", *INHERITED]
        if data.get("cluster") in (None, "", parent.cluster.slug):  # another cluster is refused in clean()
            elsewhere = {"partition", "gpu"} & given  # the parent's CPUs and memory are its partition's share
            names += [n for n in PLACEMENT if not (elsewhere and n in ("cpus", "memory_gib"))]
        for name in names:
            if name not in given:
                data[name] = inherited[name]
        return data

    def clean_from(self) -> FineTuneRun | None:
        named = str(self.cleaned_data.get(PARENT) or "").strip()
        if not named:
            return None
        if self.parent is None:
            raise ValidationError(
                f"You have no fine-tune run {named!r}: a run trains further only from one of your own completed runs "
                "(by its uuid or its model name, ft:...), not from one shared with you."
            )
        why_not = parent_refusal(self.parent)
        if why_not:
            raise ValidationError(why_not)
        return self.parent

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if self.errors:
            return cleaned
        if self.parent is not None:
            self._check_parent(cleaned, self.parent)
        for name in HYPERPARAMETERS:  # left out: the column's default (the command line's flags are optional)
            if cleaned.get(name) in (None, ""):
                column = FineTuneRun._meta.get_field(name)
                assert isinstance(column, models.Field)
                cleaned[name] = column.get_default()
        launch = self._placement(cleaned)
        if launch is None:
            return cleaned
        objects = launch.objects
        if self.parent is not None:
            self._check_parents_home(objects["account"], self.parent)
        variant, gpu = launch.variant, objects["gpu_type"]
        assert isinstance(variant, ModelVariant) and isinstance(gpu, GPUType)
        install = ClusterRuntime.objects.get(cluster_id=objects["cluster"].pk, runtime_id=objects["runtime"].pk)
        self._check_method(cleaned, install, gpu)
        self.estimate = self._check_fits(cleaned, variant, gpu)
        checked = self._check_data(cleaned)
        per_step = cleaned["batch_size"] * cleaned["gradient_accumulation"] * cleaned["gpus"]
        where = launch.cleaned_data
        self.run_columns = {
            **{name: value for name, value in objects.items() if name != "runtime"},
            "runtime": install,
            "gpus_per_node": where["gpus"],
            "cpus_per_node": where["cpus"],
            "memory_gib": where["memory_gib"],
            "walltime_min": where["walltime"],
            "notify_email": cleaned["notify"],
            "suffix": cleaned["suffix"],
            **{name: cleaned[name] for name in HYPERPARAMETERS},
            **checked.columns,
            "planned_steps": data.planned_steps(checked.columns["train_examples"], per_step, cleaned["epochs"]),
            "precision": precision_of(gpu),
            "estimate_gib": round(max(self.estimate.per_gpu_gib), 3),
            "parent": self.parent,
        }
        self.checked = checked
        return cleaned

    def _check_parent(self, cleaned: dict[str, Any], parent: FineTuneRun) -> None:
        """A run that trains an adapter further is of the parent's base variant, by LoRA or QLoRA, with its shape."""
        name, problems = parent.model_name, {}
        variant = parent.variant
        if cleaned["model"] != variant.model.name or (
            cleaned.get("quant") and cleaned["quant"].lower() != variant.quantization.lower()
        ):
            problems["model"] = (
                f"{name} is an adapter of {variant.model.name} {variant.quantization}: a run that trains it further "
                "trains on that base."
            )
        if cleaned["cluster"] != parent.cluster.slug:
            problems["cluster"] = (
                f"{name}'s adapter is in the home of {parent.account.username} on {parent.cluster.name}: a run that "
                f"trains it further runs there (the portal copies no adapter between clusters)."
            )
        if cleaned["method"] == FineTuneRun.Method.FULL:
            problems["method"] = f"Training {name} further trains its adapter: choose LoRA or QLoRA, not full."
        for column in INHERITED:
            kept = getattr(parent, column)
            if cleaned[column] != kept:
                label = self.fields[column].label or column
                problems[column] = (
                    f"{name} has {label} {kept}: a run that trains it further keeps its adapter's shape (leave "
                    f"{column} out, or give {kept})."
                )
        if problems:
            raise ValidationError(problems)

    def _check_parents_home(self, account: Any, parent: FineTuneRun) -> None:
        """The parent's adapter is in its cluster user's home (on its cluster: _check_parent), where the job reads
        it."""
        assert isinstance(account, ClusterAccount)
        where = f"{parent.account.username} on {parent.cluster.name}"
        if account.cluster_id != parent.cluster_id or account.username != parent.account.username:
            raise ValidationError(
                {
                    "account": f"{parent.model_name}'s adapter is in the home of {where}: a run that trains it "
                    f"further runs as {parent.account.username} (that account, or a lab account of the same cluster "
                    "user)."
                }
            )

    def _placement(self, cleaned: dict[str, Any]) -> LaunchForm | None:
        """The launch form's checks of where it runs, on the cluster's PyTorch environment (the safetensors variant
        when no quantisation is named); its errors become this form's."""
        values = {name: cleaned.get(name) for name in WHERE}
        if not values["quant"]:
            located = ModelVariant.objects.filter(
                model__name=values["model"], format=ModelVariant.Format.SAFETENSORS
            ).order_by("-size_gib")
            chosen = located.filter(locations__cluster__slug=values["cluster"]).first() or located.first()
            values["quant"] = chosen.quantization if chosen else ""
        elif (
            ModelCard.objects.filter(name=values["model"]).exists()
            and not ModelVariant.objects.filter(
                model__name=values["model"],
                quantization__iexact=values["quant"],
                format=ModelVariant.Format.SAFETENSORS,
            ).exists()
        ):
            self.add_error("quant", "Fine-tuning trains from safetensors weights; choose a safetensors variant.")
            return None
        if values["gpus"] != 1:
            # The trainer is one process on one GPU: several GPUs would need torchrun with DDP or FSDP, which the
            # estimate (a split of layers) does not size either.
            self.add_error("gpus", "A fine-tune run trains on one GPU; ask for 1.")
            return None
        launch = LaunchForm({**values, "runtime": TRAINING_RUNTIME, "nodes": 1}, user=self.user)
        if not launch.is_valid():
            for name, errors in form_errors(launch).error_dict.items():
                self.add_error(name if name in self.fields else None, errors)
            return None
        return launch

    def _check_method(self, cleaned: dict[str, Any], install: ClusterRuntime, gpu: GPUType) -> None:
        if cleaned["method"] != FineTuneRun.Method.QLORA:
            return
        training = TrainingRuntime.objects.filter(runtime=install).first()
        if gpu.vendor != GPUType.Vendor.NVIDIA:
            raise ValidationError({"method": f"QLoRA needs bitsandbytes on CUDA; {gpu.display_name} is no NVIDIA GPU."})
        if training is None or not training.cuda_bitsandbytes:
            raise ValidationError(
                {
                    "method": f"QLoRA needs bitsandbytes built for CUDA, and {install.cluster.name}'s PyTorch "
                    "environment (its transformers runtime) does not have it, as far as its catalog says (an admin "
                    "records it under Training environments). Choose LoRA, which needs no bitsandbytes."
                }
            )

    def _check_fits(self, cleaned: dict[str, Any], variant: ModelVariant, gpu: GPUType) -> Estimate:
        """The estimator's fine-tune figures (catalog/training.py) against the GPU's usable memory."""
        serving = Request(
            arch=variant.model.architecture,
            quant="bf16",
            runtime=TRAINING_RUNTIME,
            context=cleaned["max_seq_length"],
            parallel=cleaned["batch_size"],
            gpus_per_node=cleaned["gpus"],
        )
        request = PurposeRequest(
            serving,
            purpose=cleaned["method"],
            lora_rank=cleaned["lora_rank"],
            lora_targets=cleaned["target_modules"],
            gradient_checkpointing=cleaned["gradient_checkpointing"],
        )
        try:
            est = estimate_purpose(request)
        except EstimateError as exc:
            raise ValidationError({"method": str(exc)}) from None
        fitted = fit(est, gpu.usable_gib)
        if not fitted.fits:
            raise ValidationError(
                {
                    "batch_size": f"{cleaned['method']} of {variant} needs about {fitted.needed_gib:.1f} GiB on the "
                    f"GPU at this batch size and sequence length; {gpu.display_name} has {gpu.usable_gib:.1f} GiB "
                    "usable. Lower the batch size (and raise the gradient accumulation), shorten the sequences, turn "
                    "gradient checkpointing on, or choose a larger GPU."
                }
            )
        return est

    def _check_data(self, cleaned: dict[str, Any]) -> Checked:
        """The training file, and the validation file or split, checked line by line: nothing starts on a bad file."""
        upload, valid_upload = cleaned["training_file"], cleaned.get("validation_file")
        split = cleaned.get("validation_split")
        if valid_upload is not None and split:
            raise ValidationError({"validation_split": "Give a validation file or a split, not both."})
        fmt = cleaned.get("data_format") or ""
        train = self._checked(upload, "training_file", fmt)
        fmt = train.columns["data_format"]
        valid: IO[bytes] | None = None
        columns = {**train.columns, "valid_examples": 0}
        if valid_upload is not None:
            checked = self._checked(valid_upload, "validation_file", fmt)
            valid, columns["valid_examples"] = checked.train, checked.columns["train_examples"]
        elif split:
            if train.columns["train_examples"] < 2:
                raise ValidationError({"validation_split": "A split needs at least two examples."})
            kept = tempfile.TemporaryFile()  # noqa: SIM115 -- handed on in Checked, closed by its user
            valid = tempfile.TemporaryFile()  # noqa: SIM115
            held = data.split(train.train, kept, valid, train.columns["train_examples"], split, cleaned["seed"])
            train.train.close()
            train.train = kept
            columns["train_examples"] -= held
            columns["valid_examples"] = held
            kept.seek(0)
            columns["dataset_sha256"] = data.sha256_of(kept)
        for f in (train.train, valid):
            if f is not None:
                f.seek(0)
        return Checked(train.train, valid, columns)

    def _checked(self, upload: UploadedFile, name: str, fmt: str) -> Checked:
        out = tempfile.TemporaryFile()  # noqa: SIM115 -- handed on in Checked, closed by its user
        upload.seek(0)
        try:
            summary = data.check(upload, out, limits(), fmt)
        except inputs.InputError as exc:
            out.close()
            problems = [f"line {n}: {m}" if n else m for n, m in exc.errors]
            if exc.more:
                problems.append(f"... and {exc.more} more lines with errors")
            raise ValidationError({name: problems}) from None
        out.seek(0)
        columns = {
            "name": (upload.name or "training.jsonl")[:200],
            "data_format": summary.format,
            "train_examples": summary.examples,
            "dataset_sha256": summary.sha256,
        }
        return Checked(out, None, columns)


FineTuneForm.base_fields = FineTuneForm.declared_fields = {
    **{name: copy.deepcopy(LaunchForm.base_fields[name]) for name in WHERE},
    **{name: column_field(FineTuneRun, name, required=False) for name in HYPERPARAMETERS if name not in BOOLEANS},
    # On unless turned off: a choice, so that leaving it out (a flag not given) keeps the default.
    "gradient_checkpointing": forms.TypedChoiceField(
        choices=[("on", "on: less memory, about 30% slower"), ("off", "off")],
        coerce=lambda v: v == "on",
        required=False,
        empty_value=None,
        initial="on",
        label="gradient checkpointing",
    ),
    **_data_fields(),
    "suffix": column_field(FineTuneRun, "suffix"),
    "notify": column_field(FineTuneRun, "notify_email"),
    PARENT: forms.CharField(
        required=False,
        max_length=200,
        label="train further from",
        help_text="one of your completed LoRA or QLoRA runs, by its uuid or model name (ft:...): its base, adapter "
        "shape and cluster",
    ),
}


def steps_text(examples: int, per_step: int, epochs: int) -> str:
    """How the planned steps come about, for the pages."""
    per_epoch = math.ceil(examples / max(1, per_step))
    return f"{epochs} epoch{'s' if epochs != 1 else ''} x {per_epoch} step{'s' if per_epoch != 1 else ''}"
