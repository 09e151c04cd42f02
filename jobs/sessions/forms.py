"""What a researcher asks for when launching a session: the one definition of a launch.

`ChoicesForm` is what the wizard's first step asks: the model, its runtime, and how the session should run.
`LaunchForm` adds where it runs: the option the researcher picks (cluster, partition, GPUs, account) and the
node resources. Every field says where a session keeps its value (`kept`): a column of LLMSession, whose limits,
label and help text the field takes, or the path to a catalog object's key. From that one declaration:

- the wizard's GET step validates ChoicesForm and renders its fields; each option's launch form carries every
  LaunchForm field as a hidden input (`HiddenLaunch`);
- the launch POST, `manage.py sessions launch` (whose flags are the fields) and actions.launch() validate
  LaunchForm, and `session_columns()` turns it into the session's columns;
- relaunch, the wizard's remembered choices and `sessions show --json` read a session back (`values_of`).

A new launch field: declare it here, add its column to LLMSession, make the migration. Nothing else changes.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib.auth.models import User
from django.core import validators
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q, QuerySet
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from catalog import runtime_rules
from catalog.models import (
    Cluster,
    ClusterAccount,
    ClusterRuntime,
    GPUType,
    ModelCard,
    ModelVariant,
    Partition,
    VariantLocation,
)
from catalog.quant import canonical_quant
from jobs.allocations import check as allocations
from jobs.models import LIVE_STATES, FineTuneRun, FineTuneShare, LLMSession, Purpose, reaching
from jobs.sessions import limits

DEFAULT_CONTEXT = 4096  # tokens, or the model's maximum when that is less
MAX_ADAPTERS = 8  # LoRA adapters one session loads

_RANGE_VALIDATORS = (validators.MinValueValidator, validators.MaxValueValidator, validators.MaxLengthValidator)


def kept(path: str, field: forms.Field | None = None, **overrides: Any) -> forms.Field:
    """A launch field and where a session keeps its value.

    `path` is a column of LLMSession, or a dotted path from the session to a catalog object's key
    ("cluster.slug"). Without `field`, the field is made from the column: its type, limits, label, help text,
    default and choices; `overrides` change any of them.
    """
    if field is None:
        field = column_field(LLMSession, path, **overrides)
    field.kept_as = path  # type: ignore[attr-defined]
    return field


def column_field(model: type[models.Model], name: str, **overrides: Any) -> forms.Field:
    """A form field made from a model's column: its type, limits (from its validators), label, help text, default
    and choices; `overrides` change any of them. (A fine-tune run's hyperparameters come from their columns so.)"""
    column = model._meta.get_field(name)
    assert isinstance(column, models.Field)
    limits: dict[str, Any] = {}
    for validator in column.validators:
        if isinstance(validator, validators.MinValueValidator):
            limits["min_value"] = max(validator.limit_value, limits.get("min_value", validator.limit_value))
        elif isinstance(validator, validators.MaxValueValidator):
            limits["max_value"] = min(validator.limit_value, limits.get("max_value", validator.limit_value))
    others = [v for v in column.validators if not isinstance(v, _RANGE_VALIDATORS)]
    field = column.formfield(**limits, validators=others, **overrides)
    assert field is not None
    return field


def kept_as(field: forms.Field) -> str:
    return str(getattr(field, "kept_as", ""))


def values_of(session: LLMSession, form_class: type[forms.Form]) -> dict[str, Any]:
    """The session's value of every field of the form, read back through where each field is kept."""
    return {
        name: functools.reduce(getattr, kept_as(field).split("."), session)
        for name, field in form_class.base_fields.items()
    }


class ContextInput(forms.NumberInput):
    """The context length as a number with a slider beside it over the model's range."""

    def render(self, name: str, value: Any, attrs: dict[str, Any] | None = None, renderer: Any = None) -> SafeString:
        number = super().render(name, value, attrs, renderer)
        field_id = (attrs or {}).get("id") or self.attrs.get("id") or f"id_{name}"
        slider = format_html(
            '<input id="{}_range" type="range" min="{}" max="{}" step="{}" value="{}" aria-label="Context length '
            'slider" oninput="this.previousElementSibling.value=this.value">',
            field_id,
            self.attrs.get("min", ""),
            self.attrs.get("max", ""),
            self.attrs.get("step", ""),
            "" if value is None else value,
        )
        return number + slider


def _error(field: str, message: str) -> ValidationError:
    return ValidationError({field: message})


class NamesField(forms.CharField):
    """Names as a comma-separated list, or several values of the field (the command line's repeated flag): a tuple
    of the names, each once, in their order."""

    repeatable = True  # manage.py sessions launch takes the flag more than once

    def to_python(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        return super().to_python(value)

    def clean(self, value: Any) -> tuple[str, ...]:
        text = super().clean(value)
        return tuple(dict.fromkeys(name.strip() for name in str(text or "").split(",") if name.strip()))

    def prepare_value(self, value: Any) -> Any:
        return ",".join(value) if isinstance(value, list | tuple) else value


class ChoicesForm(forms.Form):
    """The model, its runtime, and how the session runs: the wizard's first step."""

    model = kept("variant.model.name", forms.CharField(max_length=120, label="Model"))
    quant = kept(
        "variant.quantization",
        forms.CharField(max_length=20, required=False, label="Quantisation", help_text="default: the smallest"),
    )
    runtime = kept(
        "runtime.kind",
        forms.ChoiceField(
            choices=runtime_rules.CHOICES, required=False, label="Runtime", help_text="default: the first offered"
        ),
    )
    context = kept("context_length", required=False, initial=None, widget=ContextInput(attrs={"step": 256}))
    purpose = kept("purpose", required=False)
    walltime = kept("walltime_min", required=False)
    idle_cancel = kept("idle_cancel_min")
    notify = kept("notify_email")
    no_staging = kept("skip_staging")
    alias = kept("alias")

    card: ModelCard
    variant: ModelVariant

    def __init__(self, *args: Any, user: User | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not self.errors:
            self._choose_model(data)
            self._check_runtime_serves(data)
            self._check_alias(data)
        return data

    def _check_alias(self, data: dict[str, Any]) -> None:
        """An alias names one live session: scripts that use it must not be switched to another model unawares. It is
        no catalog model's name (in any case): that name already means "my newest running session of this model", and
        an alias spelt the same would stand in for it."""
        if not data.get("alias"):
            return
        if ModelCard.objects.filter(name__iexact=data["alias"]).exists():
            raise _error(
                "alias",
                f"{data['alias']!r} is a model in the catalog, which scripts name by that name already; choose "
                "another alias.",
            )
        if self.user is None:
            return
        holder = LLMSession.objects.filter(owner=self.user, alias=data["alias"], state__in=LIVE_STATES).first()
        if holder is not None:
            raise _error(
                "alias",
                f"Your {holder.state} session {str(holder.pk)[:8]} answers to {data['alias']!r}; choose another "
                "alias, or cancel that session first.",
            )

    def _choose_model(
        self, data: dict[str, Any], cluster: Cluster | None = None, partition: Partition | None = None
    ) -> None:
        """The card and variant (the smallest without a quantisation), the context (a default, the model's limit),
        the runtime (the first one offered for the variant), the walltime, and the purpose's parallel slots. Once
        the cluster and partition are known, the defaults are what they offer."""
        card = ModelCard.objects.filter(name=data["model"]).first()
        if card is None:
            raise _error("model", f"There is no model {data['model']!r} in the catalog.")
        variants = ModelVariant.objects.filter(model=card).select_related("model")
        if data.get("quant"):
            try:
                data["quant"] = canonical_quant(data["quant"])
            except KeyError:
                raise _error("quant", f"Unknown quantisation {data['quant']!r}.") from None
            variant = variants.filter(quantization=data["quant"]).first()
        else:
            located = variants.filter(locations__cluster=cluster) if cluster else variants
            variant = located.order_by("size_gib").first() or variants.order_by("size_gib").first()
        if variant is None:
            raise _error("model", f"There is no {card.name} {data.get('quant') or 'variant'} in the catalog.")
        self.card, self.variant = card, variant
        data["quant"] = variant.quantization
        data["context"] = data.get("context") or min(DEFAULT_CONTEXT, card.max_context)
        if data["context"] > card.max_context:
            raise _error("context", f"{card.name} supports at most {card.max_context}.")
        if not data.get("runtime"):
            offered = available_runtimes(variant, cluster)
            if not offered:
                raise _error("runtime", f"No cluster offers a runtime for {variant} yet.")
            data["runtime"] = offered[0]
        data["purpose"] = data.get("purpose") or Purpose.CHAT
        default_walltime = partition.default_walltime_min if partition else self.fields["walltime"].initial
        data["walltime"] = data.get("walltime") or default_walltime
        data["parallel"] = data.get("parallel") or Purpose(data["purpose"]).parallel

    def _check_runtime_serves(self, data: dict[str, Any]) -> None:
        rules = runtime_rules.rules_for(data["runtime"])
        if not rules.serves(self.variant.format):
            raise _error(
                "runtime", f"{rules.kind} {rules.serves_text}; {self.variant} is a {self.variant.format} model."
            )
        if data["purpose"] == Purpose.EMBEDDINGS and not rules.serves_embeddings:
            able = ", ".join(kind for kind in runtime_rules.kinds_with("serves_embeddings"))
            raise _error("purpose", f"{rules.label} cannot serve embeddings; choose {able}.")


class LaunchForm(ChoicesForm):
    """A whole launch: the choices, where the session runs, and its node resources. Capacity (free GPUs and nodes)
    is Slurm's to judge at submit."""

    cluster = kept("cluster.slug", forms.SlugField())
    partition = kept("partition.name", forms.CharField(max_length=64))
    gpu = kept("gpu_type.name", forms.CharField(max_length=50, label="GPU type"))
    gpus = kept("gpus_per_node", label="GPUs per node")
    nodes = kept("nodes", required=False)
    account = kept(
        "account.pk",
        forms.IntegerField(required=False, help_text="which of your accounts on the cluster (default: your own)"),
    )
    parallel = kept("parallel", required=False, initial=None)
    cpus = kept("cpus_per_node", required=False, label="CPUs per node", help_text="default: the GPUs' share")
    memory_gib = kept("memory_gib", required=False, label="memory per node (GiB)", help_text="default: the GPUs' share")
    adapter = kept(
        "adapter_names",
        NamesField(
            required=False, max_length=2000, label="LoRA adapters",
            help_text="fine-tune runs' adapters to load, by their model names (ft:...), comma-separated",
        ),
    )  # fmt: skip

    # The catalog objects clean() found, by the session column that holds them; the fine-tune runs whose adapters
    # the session loads (kept as LLMSession.adapters, set once the session exists).
    objects: dict[str, models.Model]
    adapters: list[FineTuneRun]

    def __init__(self, *args: Any, user: User, **kwargs: Any) -> None:
        super().__init__(*args, user=user, **kwargs)
        self.objects = {}
        self.adapters = []

    def clean(self) -> dict[str, Any]:
        data = forms.Form.clean(self) or {}
        if self.errors:
            return data
        cluster = Cluster.objects.filter(slug=data["cluster"]).first()
        if cluster is None:
            raise _error("cluster", f"There is no cluster {data['cluster']!r}.")
        if not cluster.host_key.strip():
            raise _error("cluster", f"{cluster.name} has no pinned SSH host key yet; ask an admin.")
        assert self.user is not None  # a LaunchForm is always somebody's
        usable = ClusterAccount.usable_by(self.user, cluster)
        if not usable:
            raise _error("cluster", f"You have no account on {cluster.name}; ask an admin to add one.")
        account = next((a for a in usable if a.pk == data["account"]), None) if data.get("account") else usable[0]
        if account is None:
            raise _error("account", f"That is not one of your accounts on {cluster.name}.")
        partition = Partition.objects.filter(cluster=cluster, name=data["partition"]).first()
        if partition is None:
            raise _error("partition", f"{cluster.name} has no partition {data['partition']!r}.")
        gpu = GPUType.objects.filter(name=data["gpu"]).first()
        group = partition.node_groups.filter(gpu_type=gpu).order_by("-gpus_per_node").first() if gpu else None
        if gpu is None or group is None:
            raise _error("gpu", f"Partition {partition.name} offers no {data['gpu']!r} GPUs.")
        if not partition.takes(account.effective_slurm_account):
            charged = account.effective_slurm_account or "no Slurm account"
            raise _error(
                "partition",
                f"{partition.name} takes jobs of the Slurm accounts {', '.join(partition.allowed_account_list)} only; "
                f"this one would be charged to {charged}.",
            )
        self._choose_model(data, cluster, partition)
        if data["walltime"] > partition.max_walltime_min:
            raise _error("walltime", f"{partition.name} allows at most {partition.max_walltime_min} minutes.")
        location = VariantLocation.objects.filter(variant=self.variant, cluster=cluster).first()
        if location is None:
            raise _error("model", f"{self.variant} is not available on {cluster.name}.")
        install = ClusterRuntime.objects.select_related("runtime").filter(
            cluster=cluster, runtime__kind=data["runtime"]
        )
        cluster_runtime = install.first()
        if cluster_runtime is None:
            raise _error("runtime", f"{cluster.name} does not offer {data['runtime']}.")
        self._check_runtime_serves(data)
        self._check_alias(data)
        data["nodes"] = data.get("nodes") or 1
        _check_runtime_fits(cluster_runtime, location, data["nodes"], data["gpus"])
        limits.check(self.user, cluster, data["gpus"] * data["nodes"])
        self.adapters = self._check_adapters(data, cluster_runtime, account)
        allocations.check_launch(self.user, account, cluster, data["gpus"] * data["nodes"], data["walltime"])
        cpus, memory_gib = group.share_for(data["gpus"])
        data["cpus"] = data.get("cpus") or cpus
        data["memory_gib"] = data.get("memory_gib") or memory_gib
        self.objects = {
            "cluster": cluster,
            "account": account,
            "partition": partition,
            "gpu_type": gpu,
            "variant": self.variant,
            "runtime": cluster_runtime.runtime,
        }
        return data

    def _check_adapters(
        self, data: dict[str, Any], cluster_runtime: ClusterRuntime, account: ClusterAccount
    ) -> list[FineTuneRun]:
        """The fine-tune runs the `adapter` names, each a completed LoRA or QLoRA run of this model, the caller's or
        shared with them, its adapter in the home of this cluster user (the run's directory), for a runtime that
        loads adapters; else the reason."""
        names: tuple[str, ...] = data.get("adapter") or ()
        if not names:
            return []
        why_not = why_no_adapters(cluster_runtime.runtime.rules, data["purpose"])
        if why_not:
            raise _error("adapter", why_not)
        if len(names) > MAX_ADAPTERS:
            raise _error("adapter", f"A session loads at most {MAX_ADAPTERS} adapters.")
        assert self.user is not None
        mine = {run.model_name: run for run in runs_of(self.user)}
        runs = []
        for name in names:
            run = mine.get(name)
            if run is None:
                raise _error(
                    "adapter",
                    f"You have no fine-tune run named {name!r}, and nobody shares one of that name with you; the "
                    "fine-tune runs' page lists yours and those shared with you.",
                )
            why_not = adapter_refusal(run, self.card, account)
            if why_not:
                raise _error("adapter", why_not)
            runs.append(run)
        return runs

    def session_columns(self) -> dict[str, Any]:
        """What the session keeps: each plain field under its column, and the catalog objects clean() found (the
        adapters are the launch's to set once the session exists: `adapters`)."""
        columns: dict[str, Any] = dict(self.objects)
        for name, field in self.fields.items():
            path = kept_as(field)
            if "." not in path and not isinstance(field, NamesField):
                columns[path] = self.cleaned_data.get(name)
        return columns


def why_no_adapters(rules: runtime_rules.RuntimeRules, purpose: str) -> str:
    """Why a session of this runtime and purpose loads no LoRA adapters; "" when it may."""
    if not rules.lora:
        able = " or ".join(runtime_rules.RUNTIMES[kind].label for kind in runtime_rules.kinds_with("lora"))
        return f"{rules.label} cannot load LoRA adapters; choose {able}."
    if purpose == Purpose.EMBEDDINGS:
        return "An embeddings session loads no LoRA adapters."
    return ""


def runs_of(user: User) -> QuerySet[FineTuneRun]:
    """The fine-tune runs whose adapters the user may name in a launch: their own, and completed runs others share
    with them in a grant in force (jobs/finetune/sharing.py); with what their model names and refusals read."""
    shared = FineTuneShare.objects.filter(reaching(user)).values("run")
    runs = FineTuneRun.objects.filter(Q(owner=user) | Q(pk__in=shared, state=FineTuneRun.State.COMPLETED))
    return runs.select_related("variant__model", "owner", "account", "cluster")


def adapter_refusal(run: FineTuneRun, card: ModelCard, account: ClusterAccount | None = None) -> str:
    """Why a session of this model, submitted through this account (through any, when None), cannot load the run's
    adapter; "" when it can: a completed LoRA or QLoRA run of the model on the account's cluster (in another cluster
    user's home, the submit copies it into the account's)."""
    name = run.model_name
    if run.state != FineTuneRun.State.COMPLETED:
        return f"{name} is {run.state}: only a completed run has an adapter to load."
    if run.method == FineTuneRun.Method.FULL:
        return f"{name} fine-tuned the whole model: it has no adapter to load."
    if run.variant.model_id != card.pk:
        return f"{name} is an adapter of {run.variant.model.name}, not of {card.name}."
    if account is not None and run.cluster_id != account.cluster_id:
        # A session's job reads the adapter in its own cluster user's home: the submit copies it there from another
        # cluster user's home of the same cluster (jobs/sessions/adapter_copies.py), never from another cluster.
        return (
            f"{name}'s adapter is on {run.cluster.name}: launch on that cluster (the portal copies an adapter between "
            "cluster users' homes of one cluster, not between clusters), or download it from the run's page."
        )
    return ""


def loadable_adapters(user: User, card: ModelCard) -> list[FineTuneRun]:
    """The fine-tune runs (the user's and those shared with them) whose adapters a session of this model may load (on
    the runs' own clusters): what the launch's `adapter` accepts, newest first."""
    return [run for run in runs_of(user).order_by("-created_at") if not adapter_refusal(run, card)]


class HiddenLaunch:
    """A wizard option's Launch button: every LaunchForm field as a hidden input carrying these values, and the
    account as a menu when the user has several. Written straight from LaunchForm's fields, as its widgets would
    render them: a LaunchForm made and rendered for each of a page's options was half the wizard's time
    (bench/wizard.py)."""

    def __init__(self, values: dict[str, Any], accounts: list[tuple[int, str]] | None = None) -> None:
        self.values = values
        self.accounts = accounts if accounts and len(accounts) > 1 else []

    def _pairs(self) -> list[tuple[str, str | None]]:
        pairs = []
        for name, field in LaunchForm.base_fields.items():
            if name == "account" and self.accounts:
                continue
            value = self.values.get(name, field.initial)
            pairs.append((name, _HIDDEN.format_value(field.prepare_value(value() if callable(value) else value))))
        return pairs

    def hidden_inputs(self) -> SafeString:
        return format_html_join(
            "", '<input type="hidden" name="{}"{}>',
            ((name, format_html(' value="{}"', value) if value is not None else "") for name, value in self._pairs()),
        )  # fmt: skip

    def query(self) -> str:
        """The same values as a query string (the batch page's link)."""
        return urlencode([(name, value or "") for name, value in self._pairs()])

    def account_menu(self) -> SafeString:
        return forms.Select(choices=self.accounts).render("account", self.values.get("account"))


_HIDDEN = forms.HiddenInput()


def _check_runtime_fits(cluster_runtime: ClusterRuntime, location: VariantLocation, nodes: int, gpus: int) -> None:
    rules = cluster_runtime.runtime.rules
    heads = location.variant.model.attention_heads
    if rules.splits_heads and heads % gpus:
        raise _error(
            "gpus", f"{rules.kind} splits the {heads} attention heads over the GPUs: {gpus} does not divide them."
        )
    if rules.needs_ollama_tag and not location.ollama_tag:
        raise _error("runtime", f"{location.variant} has no ollama tag on this cluster.")
    if nodes > 1 and not rules.multi_node:
        raise _error("nodes", rules.one_node_only() + ".")
    if nodes > 1 and rules.rpc_binary and not cluster_runtime.rpc_binary:
        raise _error("nodes", f"This cluster has no ggml-rpc-server for {rules.kind} across nodes.")


def available_runtimes(variant: ModelVariant, cluster: Cluster | None = None) -> list[str]:
    """The runtimes that serve this variant on some cluster that holds it (or on this one), in the rules table's
    order."""
    locations = VariantLocation.objects.filter(variant=variant, **({"cluster": cluster} if cluster else {}))
    clusters = set(locations.values_list("cluster_id", flat=True))
    offered = set(ClusterRuntime.objects.filter(cluster_id__in=clusters).values_list("runtime__kind", flat=True))
    tagged = locations.exclude(ollama_tag="").exists()
    return [kind for kind in runtime_rules.runtimes_for(variant.format, tagged) if kind in offered]


def form_errors(form: forms.Form) -> ValidationError:
    """A form's errors as one ValidationError, as actions.launch() raises them."""
    return ValidationError(form.errors.as_data())
