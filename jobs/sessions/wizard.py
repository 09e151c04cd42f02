"""What the launch wizard shows for the choices so far: models, variants, runtimes, the estimate against each GPU
type, and every option with its queue facts. Choices are read and checked by the launch form (forms.ChoicesForm),
so the wizard accepts exactly what a launch accepts. Views render it; nothing here writes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Q, QuerySet
from django.http import QueryDict
from django.template.defaultfilters import floatformat
from django.utils.html import format_html_join
from django.utils.safestring import SafeString, mark_safe

from catalog import runtime_rules
from catalog.confidence import purpose_confidence
from catalog.estimate import Estimate, EstimateError, Request, estimate, fit
from catalog.measured import Beside, SiteFigures, Speed
from catalog.models import Cluster, ClusterAccount, GPUType, ModelCard, ModelVariant
from catalog.plans import Option, plans, request_for, site_measured
from catalog.toolcalls import ToolCalls, session_tool_calls
from catalog.training import PURPOSES, TRAINING, PurposeRequest, estimate_purpose
from jobs.cluster.capacity import QueueView, queue_views
from jobs.models import FineTuneRun, Pace, Purpose, measured_pace
from jobs.sessions.forms import (
    ChoicesForm,
    HiddenLaunch,
    LaunchForm,
    adapter_refusal,
    available_runtimes,
    loadable_adapters,
    why_no_adapters,
)

# The model list's filters: wizard-only, not part of a launch.
FILTERS = ("q", "tag", "license", "max_params_b")
# Purposes the wizard plans but does not launch (catalog/training.py): the estimate, the bar and where it fits.
PLANS = {name: label for name, label in PURPOSES.items() if name != "inference"}
PURPOSE_CHOICES = [*Purpose.choices, *((name, f"{label} — plan only") for name, label in PLANS.items())]
# A plan's runtime: fine-tuning runs on PyTorch; RAG serves the chat model with the runtime chosen.
TRAINING_RUNTIME = "transformers"


@dataclass(frozen=True)
class Segment:
    label: str
    gib: float
    percent: float
    css: str
    offset: float  # percent of the bar before this segment


@dataclass(frozen=True)
class GPUBar:
    gpu: GPUType
    usable_gib: float
    marker_percent: float
    fits_one: bool


@dataclass
class OptionRow:
    view: QueueView
    selectable: bool
    why_not: str = ""
    accounts: list[ClusterAccount] = field(default_factory=list)
    launch: HiddenLaunch | None = (
        None  # the option's launch: every field hidden, but the account when there are several
    )
    pace: Pace | None = None  # for batch runs: what finished runs of the variant on this GPU type did
    # A fine-tune plan the portal runs (one GPU, an account that may use the partition): the new run's page, with
    # where it runs filled in (docs/finetune.md).
    finetune_query: str = ""
    measured: SiteFigures | None = None  # what sessions of the same choices measured in this layout
    speed: Speed | None = None  # how fast sessions of the variant and runtime answered on this GPU type


@dataclass
class WizardState:
    form: ChoicesForm  # step 1 as the researcher filled it in, with its errors
    filters: dict[str, str]
    cards: list[ModelCard]
    tags: list[str]
    licenses: list[str]
    card: ModelCard | None = None
    variant: ModelVariant | None = None
    values: dict[str, Any] = field(default_factory=dict)  # the choices as a launch takes them, defaults filled in
    estimate: Estimate | None = None
    segments: list[Segment] = field(default_factory=list)
    bars: list[GPUBar] = field(default_factory=list)
    fitting: list[OptionRow] = field(default_factory=list)
    not_fitting: list[OptionRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    plan: str = ""  # a purpose the wizard sizes but does not launch (PLANS), or ""
    confidence: str = ""  # how sure the estimate is: the nearest published measurements and the error on them
    measured: Beside | None = None  # what sessions of the same choices measured here, and the error on it
    tools: ToolCalls | None = None  # whether a session of the choices calls tools (not asked of embeddings)
    # The user's fine-tune runs whose adapters a session of the choices may load (none: the runtime or purpose loads
    # none), and those chosen, which every option's launch carries.
    adapters: list[FineTuneRun] = field(default_factory=list)
    chosen_adapters: list[FineTuneRun] = field(default_factory=list)

    @property
    def adapter_menu(self) -> SafeString:
        """The adapters as checkboxes in step 1 (a GET form: they work without JavaScript), each box before its label
        as the page's other checkboxes are (Django's widget puts the box inside a label, which a long name wraps)."""
        chosen = {run.model_name for run in self.chosen_adapters}
        return format_html_join(
            "",
            '<div class="check"><input type="checkbox" name="adapter" value="{}" id="id_adapter_{}"{}> '
            '<label for="id_adapter_{}">{}</label></div>',
            ((run.model_name, i, mark_safe(" checked") if run.model_name in chosen else "", i, run.model_name)
             for i, run in enumerate(self.adapters)),
        )  # fmt: skip

    @property
    def adapter_field(self) -> forms.Field:
        return LaunchForm.base_fields["adapter"]

    @property
    def ready(self) -> bool:
        return self.estimate is not None


def _cards(filters: dict[str, str]) -> QuerySet[ModelCard]:
    cards = ModelCard.objects.filter(variants__isnull=False).distinct()
    if filters["q"]:
        text = filters["q"]
        cards = cards.filter(Q(name__icontains=text) | Q(family__icontains=text) | Q(description__icontains=text))
    if filters["tag"]:
        cards = cards.filter(tags__icontains=filters["tag"])
    if filters["license"]:
        cards = cards.filter(license=filters["license"])
    if filters["max_params_b"]:
        with contextlib.suppress(ValueError):
            cards = cards.filter(params_b__lte=float(filters["max_params_b"]))
    return cards.order_by("family", "params_b", "name")


def build(user: User, params: Mapping[str, Any], errors: list[str] | None = None) -> WizardState:
    """The wizard for these GET (or refused POST) parameters: step 1 checked by ChoicesForm, then the estimate
    and the options for the choices it accepts (a field it refuses falls back to its default and says why)."""
    data = {name: params.get(name) for name in params if name not in FILTERS}
    filters = {name: str(params.get(name) or "") for name in FILTERS}
    # A plan's choices are checked as a chat session's (the model, quantisation, context), then sized as the plan.
    plan = str(data.get("purpose") or "")
    plan = plan if plan in PLANS else ""
    if plan:
        data["purpose"] = Purpose.CHAT
    all_cards = list(ModelCard.objects.all())
    cards = list(_cards(filters))
    card = next((c for c in all_cards if c.name == data.get("model")), None)
    state = WizardState(
        form=ChoicesForm(data if card else None, user=user, initial={"purpose": plan} if plan else None),
        filters=filters,
        cards=cards,
        tags=sorted({t for c in all_cards for t in c.tag_list}),
        licenses=sorted({c.license for c in all_cards if c.license}),
        card=card,
        errors=list(errors or []),
        plan=plan,
    )
    _offer_models(state.form, cards, card)
    _offer_purposes(state.form, plan)
    if card is None:
        return state
    variants = list(card.variants.order_by("size_gib"))
    # The quantisation and runtime menus change with the model: a choice the new model does not offer falls back
    # to the first one it does, as the menus show.
    variant = next((v for v in variants if v.quantization == data.get("quant")), variants[0] if variants else None)
    runtimes = available_runtimes(variant) if variant else []
    if data.get("runtime") not in runtimes:
        data.pop("runtime", None)
    data["quant"] = variant.quantization if variant else data.get("quant")
    state.form = ChoicesForm(data, user=user)
    _offer_models(state.form, cards, card)
    _offer_variants(state.form, card, variants, runtimes)
    _offer_purposes(state.form, plan)
    if not state.form.is_valid():
        # The page shows each error beside its field; the estimate goes on with that field's default.
        fallback = ChoicesForm({k: v for k, v in data.items() if k not in state.form.errors}, user=user)
        if not fallback.is_valid():
            return state
        state.values, state.variant = fallback.cleaned_data, fallback.variant
    else:
        state.values, state.variant = state.form.cleaned_data, state.form.variant
    if state.values["purpose"] != Purpose.EMBEDDINGS:
        state.tools = session_tool_calls(state.values["runtime"], card.tool_call_parser, card.family)
    _offer_adapters(state, user, params)
    _estimate_and_options(state, user)
    return state


def _offer_models(form: ChoicesForm, cards: list[ModelCard], chosen: ModelCard | None) -> None:
    shown = cards if chosen is None or chosen in cards else [*cards, chosen]
    choices = [("", f"choose a model ({len(cards)} match)")]
    choices += [(c.name, f"{c.name} · {floatformat(c.params_b, -2)}B · {c.license or 'licence?'}") for c in shown]
    form.fields["model"].widget = forms.Select(choices=choices, attrs={"required": True})


def _offer_adapters(state: WizardState, user: User, params: Mapping[str, Any]) -> None:
    """The adapters the launch form would accept for these choices, and which of them the parameters choose (as a
    launch names them: checkboxes, or a refused launch's comma list)."""
    if state.plan or why_no_adapters(runtime_rules.rules_for(state.values["runtime"]), state.values["purpose"]):
        return
    assert state.card is not None
    state.adapters = loadable_adapters(user, state.card)
    values = params.getlist("adapter") if isinstance(params, QueryDict) else params.get("adapter")
    try:
        names = set(state.adapter_field.clean(values))
    except forms.ValidationError:
        names = set()
    state.chosen_adapters = [run for run in state.adapters if run.model_name in names]


def _offer_purposes(form: ChoicesForm, plan: str) -> None:
    """The session purposes and the plans. The form checks a plan's choices as a chat's; once it has, the plan is
    put back so that the menu shows it chosen."""
    form.fields["purpose"].widget = forms.Select(choices=PURPOSE_CHOICES)
    if plan and form.is_bound:
        form.is_valid()  # checked (and cached) with the chat purpose first
        form.data = {**form.data, "purpose": plan}


def _offer_variants(form: ChoicesForm, card: ModelCard, variants: list[ModelVariant], runtimes: list[str]) -> None:
    form.fields["quant"].widget = forms.Select(
        choices=[
            (v.quantization, f"{v.quantization} · {v.get_format_display()} · {v.size_gib:.1f} GiB") for v in variants
        ]
    )
    labels = dict(runtime_rules.CHOICES)
    form.fields["runtime"].widget = forms.Select(choices=[(r, labels[r]) for r in runtimes] or [("", "none available")])
    context = form.fields["context"]
    context.widget.attrs["max"] = card.max_context
    context.help_text = f"up to {card.max_context}"


def _estimate_and_options(state: WizardState, user: User) -> None:
    values, variant = state.values, state.variant
    assert variant is not None
    request = request_for(variant, values["runtime"], values["context"], parallel=values["parallel"])
    sized = None
    if state.plan:
        request, sized = _plan_request(state.plan, request)
    try:
        state.estimate = (sized or estimate)(request)
    except EstimateError as exc:
        state.errors.append(str(exc))
        return
    _draw(state)
    state.confidence = purpose_confidence(PurposeRequest(request, state.plan or "inference")).summary()
    if not state.plan:
        state.measured = site_measured(request, variant)
    usable: dict[int, list[ClusterAccount]] = {}

    def accounts_on(cluster: Cluster) -> list[ClusterAccount]:
        if cluster.pk not in usable:
            usable[cluster.pk] = ClusterAccount.usable_by(user, cluster)
        return usable[cluster.pk]

    def account_for(cluster: Cluster) -> ClusterAccount | None:
        return next(iter(accounts_on(cluster)), None)

    options = plans(request, variant, estimator=sized)
    views = queue_views(
        options,
        values["walltime"],
        account_for=account_for,
        ask_slurm=settings.PORTAL_WIZARD_ASKS_SLURM,
        asker=user.pk,
    )
    views.sort(key=lambda v: (not v.recommended, not v.option.fit.fits, v.option.gpus, -v.option.fit.headroom_gib))
    choices = {name: values.get(name) for name in ChoicesForm.base_fields}
    choices["adapter"] = tuple(run.model_name for run in state.chosen_adapters)
    paces: dict[int, Pace | None] = {}
    for view in views:
        partition = view.option.node_group.partition
        everyone = accounts_on(partition.cluster)
        accounts = [a for a in everyone if partition.takes(a.effective_slurm_account)]
        if view.option.fit.fits and state.plan:
            row = OptionRow(view, selectable=False, why_not=_plan_note(state, view.option))
            if state.plan in TRAINING and view.option.gpus_per_node * view.option.nodes == 1 and accounts:
                row.finetune_query = _finetune_query(view, choices, state.plan)
            state.fitting.append(row)
        elif view.option.fit.fits:
            # The launch's own limits, shown where they apply rather than after a refused Launch.
            too_long = values["walltime"] > partition.max_walltime_min
            why_not = f"{partition.name} allows at most {partition.max_walltime_min} minutes" if too_long else ""
            if everyone and not accounts:
                why_not = f"{partition.name} takes only the Slurm accounts {', '.join(partition.allowed_account_list)}"
            # The chosen adapters are in a cluster user's home: only that user's accounts on that cluster load them.
            refused = [_adapters_refused(state, a) for a in accounts]
            if accounts and all(refused) and not why_not:
                why_not = refused[0].rstrip(".")
            accounts = [a for a, why in zip(accounts, refused, strict=True) if not why]
            if state.form.errors:  # the options are for the defaults the estimate fell back on, not a launch
                why_not = "correct the choices above to launch"
            launch = _launch(view, choices, accounts) if accounts and not why_not else None
            row = OptionRow(view, selectable=launch is not None, why_not=why_not, accounts=accounts, launch=launch)
            if state.measured is not None:
                gpu_name = view.option.node_group.gpu_type.name
                row.measured = state.measured.for_layout(gpu_name, view.option.gpus_per_node, view.option.nodes)
                row.speed = state.measured.speeds.get(gpu_name)
            if values.get("purpose") == "batch":
                gpu = view.option.node_group.gpu_type
                if gpu.pk not in paces:
                    paces[gpu.pk] = measured_pace(variant, gpu)
                row.pace = paces[gpu.pk]
            state.fitting.append(row)
        else:
            state.not_fitting.append(OptionRow(view, selectable=False, why_not=_why_not(view, state)))


def _adapters_refused(state: WizardState, account: ClusterAccount) -> str:
    """Why a launch through this account cannot load the chosen adapters (the launch form's reason), or ""."""
    assert state.card is not None
    reasons = (adapter_refusal(run, state.card, account) for run in state.chosen_adapters)
    return next((why for why in reasons if why), "")


def _plan_request(plan: str, request: Request) -> tuple[Request, Callable[[Request], Estimate]]:
    """A plan's request and estimator: fine-tuning from the model's bf16 weights on PyTorch (QLoRA quantises them on
    load), with the context as the sequence length and a micro-batch of one; RAG as chosen."""
    if plan in TRAINING:
        request = replace(request, quant="bf16", runtime=TRAINING_RUNTIME, parallel=1, file_size_gib=None)

    def sized(r: Request) -> Estimate:
        return estimate_purpose(PurposeRequest(r, plan))

    return request, sized


def _plan_note(state: WizardState, option: Option) -> str:
    """Where a plan fits, with the Slurm resources to ask for in one's own job: nothing to launch from here."""
    group = option.node_group
    ask = f"--partition={group.partition.name} --nodes={option.nodes} --gres=gpu:{group.gpu_type.gres_type}:"
    ask += str(option.gpus_per_node)
    if state.plan in TRAINING:
        return f"A plan: fine-tuning runs as your own Slurm job (sbatch {ask})."
    return f"A plan: launch the chat model and an embeddings session, or one job holding both (sbatch {ask})."


def _finetune_query(view: QueueView, choices: dict[str, Any], plan: str) -> str:
    group = view.option.node_group
    where = {"model": choices.get("model") or "", "cluster": group.partition.cluster.slug,
             "partition": group.partition.name, "gpu": group.gpu_type.name, "gpus": 1, "method": plan,
             "walltime": choices.get("walltime") or ""}  # fmt: skip
    return urlencode(where)


def _launch(view: QueueView, choices: dict[str, Any], accounts: list[ClusterAccount]) -> HiddenLaunch:
    option = view.option
    group = option.node_group
    where = {
        "cluster": group.partition.cluster.slug,
        "partition": group.partition.name,
        "gpu": group.gpu_type.name,
        "gpus": option.gpus_per_node,
        "nodes": option.nodes,
        "account": accounts[0].pk,
    }
    return HiddenLaunch({**choices, **where}, [(a.pk, _account_label(a)) for a in accounts])


def _account_label(account: ClusterAccount) -> str:
    label = account.username + (f" ({account.label})" if account.label else "")
    slurm_account = account.effective_slurm_account
    return label + (f", Slurm account {slurm_account}" if slurm_account else "")


def _draw(state: WizardState) -> None:
    """The memory bar on one GPU: segments scaled to the larger of the need and the biggest GPU, GPU markers."""
    est = state.estimate
    assert est is not None
    gpus = list(GPUType.objects.filter(node_groups__isnull=False).distinct().order_by("-memory_gib"))
    scale = max([est.max_gpu_gib] + [g.usable_gib for g in gpus]) or 1.0
    parts = [
        ("weights", est.weights_gib - est.host_gib, "seg-weights"),
        ("KV cache", est.kv_cache_gib, "seg-kv"),
        ("compute", est.compute_gib, "seg-compute"),
        ("overhead", est.overhead_gib, "seg-overhead"),
        *((label, gib, "seg-purpose") for label, gib in est.extra_gib),  # a plan's own parts
    ]
    parts = [part for part in parts if part[1] > 0]
    offset = 0.0
    for label, gib, css in parts:
        state.segments.append(Segment(label, gib, 100 * gib / scale, css, offset))
        offset += 100 * gib / scale
    state.bars = [GPUBar(g, g.usable_gib, 100 * g.usable_gib / scale, fit(est, g.usable_gib).fits) for g in gpus]


def _why_not(view: QueueView, state: WizardState) -> str:
    option = view.option
    group = option.node_group
    needed = option.fit.needed_gib
    shape = f"{option.gpus_per_node} x {group.gpu_type.name}" + (
        f" on {option.nodes} nodes" if option.nodes > 1 else ""
    )
    alternatives = [bar for bar in state.bars if bar.fits_one]
    hint = f"; 1 x {alternatives[0].gpu.name} would do" if alternatives else ""
    rules = runtime_rules.rules_for(option.runtime)
    if group.node_count > 1 and rules.one_node_because:  # more nodes would fit, but the portal will not span them
        hint += f"; {rules.one_node_only()}"
    budget = needed + option.fit.headroom_gib  # what the runtime may use of the card (vLLM takes a fraction)
    return f"needs {needed:.1f} GiB per GPU even as {shape}, {budget:.1f} GiB usable{hint}"
