"""Every way the catalog offers to run a model variant: (cluster, partition, GPU type, GPUs per node, nodes) with the
smallest layout that fits each node group, its per-GPU use and headroom; and what sessions of it measured on this
site, beside the estimate (site_measured, compared in catalog/measured.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from catalog import measured
from catalog.estimate import Estimate, EstimateError, Layout, Request, estimate, fit, smallest_layout
from catalog.models import ClusterRuntime, ModelVariant, NodeGroup, SiteMeasurement, VariantLocation
from catalog.runtime_rules import rules_for


@dataclass(frozen=True)
class Option(Layout):
    """A layout (GPUs per node, nodes, its estimate and fit) of a runtime on one node group of the catalog."""

    node_group: NodeGroup
    runtime: str

    @property
    def label(self) -> str:
        group = self.node_group
        where = f"{group.partition.cluster.slug}/{group.partition.name}"
        shape = f"{self.gpus_per_node} x {group.gpu_type.name}"
        return f"{where}: {shape}" + (f" x {self.nodes} nodes" if self.nodes > 1 else "")


def request_for(
    variant: ModelVariant,
    runtime: str,
    context: int,
    parallel: int = 1,
    kv_type: str = "f16",
    flash_attn: bool | None = None,
) -> Request:
    """The estimator's request for a catalog variant; the file size stands in for bits per weight when known."""
    known_size = variant.size_gib if variant.format == ModelVariant.Format.GGUF else None
    return Request(
        arch=variant.model.architecture,
        quant=variant.quantization,
        runtime=runtime,
        context=context,
        parallel=parallel,
        kv_type=kv_type,
        flash_attn=flash_attn,
        file_size_gib=known_size,
    )


def plans(
    request: Request,
    variant: ModelVariant | None = None,
    available_only: bool = True,
    estimator: Callable[[Request], Estimate] | None = None,
) -> list[Option]:
    """One option per node group: its smallest fitting layout, or its largest layout marked as not fitting.

    With a variant and available_only, only clusters that hold the variant and offer the runtime count. Order:
    fitting options first, fewest GPUs, then most headroom. `estimator` sizes a purpose other than serving
    (catalog/training.py); such a plan needs the model's files on the cluster, not the runtime installed there."""
    sized = estimator or estimate
    sized(request)  # raise EstimateError for an impossible request before looking at any GPU
    # Node groups discovery no longer finds in Slurm are not offered (catalog/discover.py marks them).
    groups = NodeGroup.objects.select_related("partition__cluster", "gpu_type").filter(
        missing_since__isnull=True, partition__missing_since__isnull=True
    )
    if variant is not None and available_only:
        located = VariantLocation.objects.filter(variant=variant)
        if estimator is not None:  # a plan needs the model's files there, in whichever variant
            located = VariantLocation.objects.filter(variant__model=variant.model)
        clusters = set(located.values_list("cluster_id", flat=True))
        if estimator is None:
            offering = ClusterRuntime.objects.filter(runtime__kind=request.runtime)
            clusters &= set(offering.values_list("cluster_id", flat=True))
        groups = groups.filter(partition__cluster_id__in=clusters)
    options: list[Option] = []
    for group in groups:
        usable = group.gpu_type.usable_gib
        try:
            layout = smallest_layout(request, usable, group.gpus_per_node, group.node_count, estimator=estimator)
        except EstimateError:
            continue
        if layout is not None:
            options.append(
                Option(layout.gpus_per_node, layout.nodes, layout.estimate, layout.fit, group, request.runtime)
            )
            continue
        nodes = group.node_count if rules_for(request.runtime).multi_node else 1
        try:
            est = sized(replace(request, gpus_per_node=group.gpus_per_node, nodes=nodes))
        except EstimateError:
            continue
        options.append(Option(group.gpus_per_node, nodes, est, fit(est, usable), group, request.runtime))
    return sorted(options, key=lambda o: (not o.fit.fits, o.gpus, -o.fit.headroom_gib, o.label))


def smallest_per_gpu_type(options: list[Option]) -> list[Option]:
    """The first fitting option of each GPU type (options come sorted smallest first)."""
    seen: set[str] = set()
    chosen = []
    for option in options:
        if option.fit.fits and option.node_group.gpu_type.name not in seen:
            seen.add(option.node_group.gpu_type.name)
            chosen.append(option)
    return chosen


def site_measured(request: Request, variant: ModelVariant) -> measured.Beside:
    """The site's measurements beside an estimate of a catalog variant: the medians of the newest sessions of the same
    variant and runtime (memory for the request's context and parallel requests, per GPU type and layout; speed per
    GPU type) and the estimator's error on them. One query."""
    rows = SiteMeasurement.objects.filter(variant=variant, runtime=request.runtime).select_related("gpu_type")
    return measured.compare(request, [row.run() for row in rows[: measured.NEWEST]])


@dataclass(frozen=True)
class Checked:
    """One choice the site measured (variant, runtime, context, parallel requests) on one GPU type and layout."""

    variant: ModelVariant
    runtime: str
    context: int
    parallel: int
    figures: measured.SiteFigures

    @property
    def label(self) -> str:
        return f"{self.variant.model.name} {self.variant.quantization}, {self.runtime}, context {self.context}" + (
            f" x {self.parallel}" if self.parallel > 1 else ""
        )


def check_measured() -> list[Checked]:
    """Every choice the site measured, beside the estimate for it (`estimate --check-measured`); the caller picks
    those the estimator is off on (figures.off). One query, however many sessions."""
    rows = SiteMeasurement.objects.select_related("gpu_type", "variant__model").order_by(
        "variant__model__name", "variant__quantization", "runtime", "-measured_at"
    )
    runs: dict[tuple[int, str], list[measured.Run]] = defaultdict(list)
    choices: dict[tuple[int, str], set[tuple[int, int]]] = defaultdict(set)
    variants: dict[int, ModelVariant] = {}
    for row in rows.iterator(chunk_size=2000):
        key = (row.variant_id, row.runtime)
        if len(runs[key]) < measured.NEWEST:
            runs[key].append(row.run())
            choices[key].add((row.context, row.parallel))
            variants[row.variant_id] = row.variant
    checked = []
    for (variant_id, runtime), found in runs.items():
        variant = variants[variant_id]
        for context, parallel in sorted(choices[(variant_id, runtime)]):
            request = request_for(variant, runtime, context, parallel=parallel)
            checked += [
                Checked(variant, runtime, context, parallel, figures)
                for figures in measured.compare(request, found).figures
            ]
    return checked
