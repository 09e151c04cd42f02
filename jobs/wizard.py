"""What the launch wizard shows for the choices so far: models, variants, runtimes, the estimate against each GPU
type, and every option with its queue facts. Views render it; nothing here writes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db.models import Q, QuerySet

from catalog.estimate import Estimate, EstimateError, estimate, fit
from catalog.models import ClusterRuntime, GPUType, ModelCard, ModelVariant, VariantLocation
from catalog.plans import plans, request_for
from jobs.models import ClusterAccount
from jobs.queue import QueueView, queue_views

REMEMBERED = ("model", "quant", "runtime", "context", "walltime", "purpose", "notify", "idle_cancel")
RUNTIMES_FOR_FORMAT = {"gguf": ["llama.cpp", "ollama"], "ollama": ["ollama"], "safetensors": ["vllm"]}
DEFAULT_CONTEXT = 4096
DEFAULT_WALLTIME_MIN = 120
BATCH_PARALLEL = 4  # batch prompts run several requests at once


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


@dataclass
class WizardState:
    params: dict[str, Any]
    cards: list[ModelCard]
    tags: list[str]
    licenses: list[str]
    card: ModelCard | None = None
    variants: list[ModelVariant] = field(default_factory=list)
    variant: ModelVariant | None = None
    runtimes: list[str] = field(default_factory=list)
    runtime: str = ""
    context: int = DEFAULT_CONTEXT
    walltime: int = DEFAULT_WALLTIME_MIN
    purpose: str = "chat"
    notify: bool = False
    idle_cancel: int | None = None
    estimate: Estimate | None = None
    segments: list[Segment] = field(default_factory=list)
    bars: list[GPUBar] = field(default_factory=list)
    fitting: list[OptionRow] = field(default_factory=list)
    not_fitting: list[OptionRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.estimate is not None


def _int(value: Any, default: int, low: int, high: int) -> int:
    try:
        number = int(str(value))
    except (TypeError, ValueError):
        return default
    return max(low, min(high, number))


def _cards(params: dict[str, Any]) -> QuerySet[ModelCard]:
    cards = ModelCard.objects.filter(variants__isnull=False).distinct()
    if params.get("q"):
        text = str(params["q"])
        cards = cards.filter(Q(name__icontains=text) | Q(family__icontains=text) | Q(description__icontains=text))
    if params.get("tag"):
        cards = cards.filter(tags__icontains=str(params["tag"]))
    if params.get("license"):
        cards = cards.filter(license=str(params["license"]))
    if params.get("max_params_b"):
        with contextlib.suppress(ValueError):
            cards = cards.filter(params_b__lte=float(str(params["max_params_b"])))
    return cards.order_by("family", "params_b", "name")


def build(user: Any, params: Any, errors: list[str] | None = None) -> WizardState:
    params = {k: params.get(k) for k in params}
    all_cards = list(ModelCard.objects.all())
    state = WizardState(
        params=params,
        cards=list(_cards(params)),
        tags=sorted({t for c in all_cards for t in c.tag_list}),
        licenses=sorted({c.license for c in all_cards if c.license}),
        errors=list(errors or []),
    )
    state.card = ModelCard.objects.filter(name=params.get("model") or "").first()
    if state.card is None:
        return state
    state.variants = list(state.card.variants.order_by("size_gib"))
    state.variant = next((v for v in state.variants if v.quantization == params.get("quant")), None) or (
        state.variants[0] if state.variants else None
    )
    if state.variant is None:
        return state
    state.runtimes = _runtimes_for(state.variant)
    state.runtime = params.get("runtime") if params.get("runtime") in state.runtimes else ""
    state.runtime = state.runtime or (state.runtimes[0] if state.runtimes else "")
    state.context = _int(
        params.get("context"), min(DEFAULT_CONTEXT, state.card.max_context), 256, state.card.max_context
    )
    state.walltime = _int(params.get("walltime"), DEFAULT_WALLTIME_MIN, 1, 60 * 24 * 14)
    state.purpose = "batch" if params.get("purpose") == "batch" else "chat"
    state.notify = params.get("notify") in ("on", "1", "true", True)
    state.idle_cancel = _int(params.get("idle_cancel"), 0, 0, 60 * 24 * 14) or None
    if not state.runtime:
        state.errors.append(f"No cluster offers a runtime for {state.variant} yet.")
        return state
    parallel = BATCH_PARALLEL if state.purpose == "batch" else 1
    request = request_for(state.variant, state.runtime, state.context, parallel=parallel)
    try:
        state.estimate = estimate(request)
    except EstimateError as exc:
        state.errors.append(str(exc))
        return state
    _draw(state)
    usable: dict[int, list[ClusterAccount]] = {}

    def accounts_on(cluster: Any) -> list[ClusterAccount]:
        if cluster.pk not in usable:
            usable[cluster.pk] = ClusterAccount.usable_by(user, cluster)
        return usable[cluster.pk]

    def account_for(cluster: Any) -> ClusterAccount | None:
        return next(iter(accounts_on(cluster)), None)

    options = plans(request, state.variant)
    views = queue_views(options, state.walltime, account_for=account_for, ask_slurm=settings.PORTAL_WIZARD_ASKS_SLURM)
    views.sort(key=lambda v: (not v.recommended, not v.option.fit.fits, v.option.gpus, -v.option.fit.headroom_gib))
    for view in views:
        accounts = accounts_on(view.option.node_group.partition.cluster)
        if view.option.fit.fits:
            state.fitting.append(OptionRow(view, selectable=bool(accounts), accounts=accounts))
        else:
            state.not_fitting.append(OptionRow(view, selectable=False, why_not=_why_not(view, state)))
    return state


def _runtimes_for(variant: ModelVariant) -> list[str]:
    locations = VariantLocation.objects.filter(variant=variant)
    clusters = set(locations.values_list("cluster_id", flat=True))
    offered = set(ClusterRuntime.objects.filter(cluster_id__in=clusters).values_list("runtime__kind", flat=True))
    wanted = list(RUNTIMES_FOR_FORMAT.get(variant.format, []))
    if "ollama" in wanted and not locations.exclude(ollama_tag="").exists():
        wanted.remove("ollama")
    return [kind for kind in wanted if kind in offered]


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
    ]
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
    return f"needs {needed:.1f} GiB per GPU even as {shape}, {group.gpu_type.usable_gib:.1f} GiB usable{hint}"
