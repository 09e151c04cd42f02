from __future__ import annotations

from typing import Any, TypeVar

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import BaseModelAdmin
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db.models import Count, Exists, Model, OuterRef, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from catalog import architecture
from catalog import discover as discovery
from catalog import scan as scanning
from catalog.add_model import add, add_all, cluster_reader, inspect
from catalog.inventory import DiscoverError
from catalog.models import (
    CODE_PERMISSION,
    RUNS_CODE,
    TRUST_PERMISSION,
    Cluster,
    ClusterAccount,
    ClusterRuntime,
    GPUType,
    ModelCard,
    ModelVariant,
    NodeGroup,
    Partition,
    Runtime,
    SiteMeasurement,
    VariantLocation,
)
from catalog.yaml_io import CatalogImportError
from portal import ssh

NO_NETWORKS = (
    "No compute-node networks are set for this cluster (Compute nodes): the portal sends no request to any of its "
    "sessions, so their chat and API wait until you set them. Give the networks the nodes' addresses are in, and "
    "only those: where a server listens is reported through its owner's own account, and the portal goes only where "
    "these networks allow."
)


# Said where staff without the permission meet the fields it guards (catalog/models/runs_code.py).
NOT_CODE = (
    "Changing what runs as every researcher (runtime programs, modules, flags, Slurm binaries, model locations and "
    'staging paths) needs the permission "Can change what runs as every researcher", which a superuser grants.'
)


_M = TypeVar("_M", bound=Model)


def may_change_code(request: HttpRequest) -> bool:
    return request.user.has_perm(CODE_PERMISSION)


class RunsCodeReadOnly(BaseModelAdmin[_M]):
    """RUNS_CODE's fields are read-only to staff without CODE_PERMISSION: they run as every researcher on the cluster,
    which change permission on the model does not entrust to anyone."""

    def get_readonly_fields(self, request: HttpRequest, obj: _M | None = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        if may_change_code(request):
            return fields
        return [*fields, *(name for name in RUNS_CODE[self.model] if name not in fields)]


class PartitionInline(admin.TabularInline[Partition, Cluster]):
    model = Partition
    extra = 0
    fields = ["name", "max_walltime_min", "default_walltime_min", "is_debug", "allowed_accounts", "allowed_qos",
              "missing_since"]  # fmt: skip
    readonly_fields = ["missing_since"]
    show_change_link = True


class ClusterRuntimeInline(RunsCodeReadOnly[ClusterRuntime], admin.TabularInline[ClusterRuntime, Cluster]):
    model = ClusterRuntime
    extra = 0
    fields = ["runtime", "modules", "binary", "rpc_binary", "model_dir", "extra_flags"]

    def has_add_permission(self, request: HttpRequest, obj: Cluster | None = None) -> bool:
        """A runtime on a cluster is a program every researcher runs: adding one is choosing it."""
        return may_change_code(request) and super().has_add_permission(request, obj)


@admin.register(Cluster)
class ClusterAdmin(RunsCodeReadOnly[Cluster], admin.ModelAdmin[Cluster]):
    list_display = [
        "name",
        "slug",
        "login_host",
        "ssh_port",
        "node_access",
        "host_key_pinned",
        "partition_count",
        "drift_seen",
        "queue_figures",
        "nodes_reachable",
    ]
    list_filter = ["node_access"]
    search_fields = ["name", "slug", "login_host", "notes"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [PartitionInline, ClusterRuntimeInline]
    fieldsets = [
        (None, {"fields": ["name", "slug", "notes"]}),
        ("Login host", {"fields": ["login_host", "ssh_port", "host_key"]}),
        ("Compute nodes", {"fields": ["node_access", "node_networks"]}),
        ("Slurm", {"fields": ["default_account", "slurm_cluster", "slurm_bin_dir", "status_account"]}),
        ("Site-wide reads", {"fields": ["site_reads"]}),
        ("Staging weights on node-local storage", {"fields": ["stage_to", "stage_keep"]}),
        ("Per-user limits", {"fields": ["max_sessions_per_user", "max_gpus_per_user"]}),
        ("Discovery", {"fields": ["discovered_at", "discovered_with", "drift"]}),
    ]
    readonly_fields = ["discovered_at", "discovered_with", "drift", "site_reads"]

    change_form_template = "admin/catalog/cluster/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Cluster]:
        readers = ClusterAccount.objects.filter(ClusterAccount.reads_for_site_q(), cluster=OuterRef("pk"))
        return super().get_queryset(request).annotate(n_partitions=Count("partitions"), has_reader=Exists(readers))

    def get_form(
        self, request: HttpRequest, obj: Cluster | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm[Cluster]]:
        """The status account is one of this cluster's own service or trusted accounts (a new cluster has none)."""
        form = super().get_form(request, obj, change, **kwargs)
        field = form.base_fields.get("status_account")
        if isinstance(field, forms.ModelChoiceField):
            readers = ClusterAccount.objects.filter(ClusterAccount.reads_for_site_q(), cluster=obj)
            field.queryset = readers if obj else ClusterAccount.objects.none()
        return form

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.discover)
        scan = self.admin_site.admin_view(self.scan_models)
        return [
            path("<int:pk>/discover/", view, name="catalog_cluster_discover"),
            path("<int:pk>/scan/", scan, name="catalog_cluster_scan"),
            *super().get_urls(),
        ]

    def discover(self, request: HttpRequest, pk: int) -> HttpResponse:
        """What the cluster's Slurm says against the catalog (GET: read, change nothing); POST applies it through the
        YAML import, as `manage.py catalog discover --yes` does."""
        cluster = get_object_or_404(Cluster, pk=pk)
        if not self.has_change_permission(request, cluster):
            return HttpResponseRedirect(reverse("admin:catalog_cluster_changelist"))
        assert isinstance(request.user, User)  # admin_view let only signed-in staff through
        context: dict[str, Any] = {**self.admin_site.each_context(request), "title": f"Discover {cluster.name}",
                                   "opts": self.model._meta, "cluster": cluster}  # fmt: skip
        try:
            account = discovery.account_for(request.user, cluster)
            plan = discovery.plan(cluster, discovery.read_slurm(account))
            if request.method == "POST":
                report = discovery.apply(plan, account, may_change_code=may_change_code(request))
                messages.success(request, f"{cluster.name}: " + ("; ".join(report.lines()) or "nothing to change"))
                return HttpResponseRedirect(reverse("admin:catalog_cluster_change", args=[cluster.pk]))
        except CatalogImportError as exc:
            context["error"] = "Nothing was changed: " + "; ".join(e.message for e in exc.errors)
            return TemplateResponse(request, "admin/catalog/cluster/discover.html", context)
        except (ValidationError, ssh.SSHError, DiscoverError) as exc:
            context["error"] = "; ".join(getattr(exc, "messages", [str(exc)]))
            return TemplateResponse(request, "admin/catalog/cluster/discover.html", context)
        context["plan"] = plan
        return TemplateResponse(request, "admin/catalog/cluster/discover.html", context)

    def scan_models(self, request: HttpRequest, pk: int) -> HttpResponse:
        """Scan directories on the cluster for models, as your cluster account (GET: the form): "preview" shows what
        would be added, updated or skipped and changes nothing; "apply" adds it, as `manage.py catalog scan` does."""
        cluster = get_object_or_404(Cluster, pk=pk)
        if not self.has_change_permission(request, cluster):
            return HttpResponseRedirect(reverse("admin:catalog_cluster_changelist"))
        assert isinstance(request.user, User)  # admin_view let only signed-in staff through
        form = ScanForm(request.POST or None)
        context: dict[str, Any] = {**self.admin_site.each_context(request), "title": f"Scan {cluster.name} for models",
                                   "opts": self.model._meta, "cluster": cluster, "form": form}  # fmt: skip
        if request.method == "POST" and form.is_valid():
            applying = "apply" in request.POST
            if applying and not may_change_code(request):
                # What a scan adds is where every researcher's jobs load a model from.
                form.add_error("paths", f"Nothing was applied: {NOT_CODE}")
                return TemplateResponse(request, "admin/catalog/cluster/scan.html", context)
            try:
                found = scanning.scan(form.cleaned_data["paths"], cluster_reader(request.user, cluster))
                outcomes = add_all(found.models, cluster, dry_run=not applying)
            except (ValidationError, ssh.SSHError) as exc:
                form.add_error("paths", "; ".join(getattr(exc, "messages", [str(exc)])))
            else:
                context["lines"], context["summary"] = scanning.report(found, outcomes)
                context["applied"] = applying
                if applying:
                    messages.success(request, f"{cluster.name}: {context['summary']}.")
        return TemplateResponse(request, "admin/catalog/cluster/scan.html", context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """A cluster without compute-node networks gets a warning on its page: none of its sessions is sent a request
        (docs/security.md, what a job reports is checked)."""
        cluster = self.get_object(request, object_id)
        if request.method == "GET" and cluster is not None and not cluster.node_networks.strip():
            messages.warning(request, NO_NETWORKS)
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(boolean=True, description="nodes reachable")
    def nodes_reachable(self, obj: Cluster) -> bool:
        """Whether the portal sends sessions' requests anywhere on this cluster: only with its node networks set."""
        return bool(obj.node_networks.strip())

    @admin.display(boolean=True, description="host key pinned")
    def host_key_pinned(self, obj: Cluster) -> bool:
        return bool(obj.host_key.strip())

    @admin.display(boolean=True, description="matches Slurm")
    def drift_seen(self, obj: Cluster) -> bool | None:
        """Unknown (None) until discovered; False when the last discovery found differences."""
        return None if obj.discovered_at is None else not obj.drift

    @admin.display(boolean=True, description="queue figures")
    def queue_figures(self, obj: Cluster) -> bool:
        """Whether idle GPUs and pending demand are read at all: only with a service or trusted account."""
        return bool(getattr(obj, "has_reader", False))  # annotated by get_queryset

    @admin.display(description="site-wide reads")
    def site_reads(self, obj: Cluster) -> str:
        """Which account reads what everyone sees (docs/security.md), or that the read is off and why."""
        if obj.pk is None:
            return "Add a service account, or mark an account trusted, once the cluster exists."
        reader = ClusterAccount.site_reader(obj)
        status = obj.status_account
        lines = [
            f"Queue figures (idle GPUs, pending jobs in the wizard and on the home page): read with {reader}."
            if reader
            else "Queue figures: OFF. No service account and no account marked trusted for site-wide reads on this "
            "cluster, so its queue is not read and the wizard and the home page show it as unknown. A researcher's "
            "own account is never used: its user controls what its shell prints.",
            "Status account: none; every account polls its own jobs."
            if status is None
            else f"Status account: {status}."
            if status.reads_for_site
            else f"Status account: NOT USED. {status.not_for_site('the status listing')}; every account polls "
            "its own jobs.",
            "Mapped groups read here must name a service or trusted account (Groups in the admin guide).",
        ]
        return "\n".join(lines)

    @admin.display(description="partitions", ordering="n_partitions")
    def partition_count(self, obj: Cluster) -> int:
        return int(getattr(obj, "n_partitions", 0))  # annotated by get_queryset


class NodeGroupInline(admin.TabularInline[NodeGroup, Partition]):
    model = NodeGroup
    extra = 0
    fields = ["gpu_type", "gpus_per_node", "node_count", "cpus_per_node", "ram_gib", "missing_since"]
    readonly_fields = ["missing_since"]


@admin.register(Partition)
class PartitionAdmin(admin.ModelAdmin[Partition]):
    list_display = ["name", "cluster", "max_walltime_min", "default_walltime_min", "is_debug", "missing_since"]
    list_filter = ["cluster", "is_debug", ("missing_since", admin.EmptyFieldListFilter)]
    readonly_fields = ["missing_since"]
    search_fields = ["name", "cluster__name", "cluster__slug"]
    list_select_related = ["cluster"]
    inlines = [NodeGroupInline]


@admin.register(GPUType)
class GPUTypeAdmin(admin.ModelAdmin[GPUType]):
    list_display = [
        "name",
        "display_name",
        "gres_type",
        "memory_gib",
        "reserved_gib",
        "compute_capability",
        "vendor",
    ]
    list_filter = ["vendor"]
    search_fields = ["name", "display_name", "gres_type"]


@admin.register(NodeGroup)
class NodeGroupAdmin(admin.ModelAdmin[NodeGroup]):
    list_display = ["partition", "gpu_type", "gpus_per_node", "node_count", "cpus_per_node", "ram_gib"]
    list_filter = ["gpu_type", "partition__cluster"]
    search_fields = ["partition__name", "partition__cluster__slug", "gpu_type__name"]
    list_select_related = ["partition__cluster", "gpu_type"]


@admin.register(Runtime)
class RuntimeAdmin(RunsCodeReadOnly[Runtime], admin.ModelAdmin[Runtime]):
    list_display = ["kind", "display_name", "default_flags"]
    search_fields = ["kind", "display_name"]


@admin.register(ClusterRuntime)
class ClusterRuntimeAdmin(RunsCodeReadOnly[ClusterRuntime], admin.ModelAdmin[ClusterRuntime]):
    list_display = ["runtime", "cluster", "modules", "binary", "rpc_binary"]
    list_filter = ["runtime", "cluster"]
    search_fields = ["cluster__slug", "modules", "binary"]
    list_select_related = ["runtime", "cluster"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return may_change_code(request) and super().has_add_permission(request)


class ModelVariantInline(admin.TabularInline[ModelVariant, ModelCard]):
    model = ModelVariant
    extra = 0
    fields = ["quantization", "format", "size_gib"]
    show_change_link = True


@admin.register(ModelCard)
class ModelCardAdmin(admin.ModelAdmin[ModelCard]):
    list_display = [
        "name",
        "family",
        "params_b",
        "layers",
        "kv_heads",
        "max_context",
        "license",
        "variant_count",
    ]
    list_filter = ["family", "license"]
    search_fields = ["name", "family", "tags", "description"]
    inlines = [ModelVariantInline]
    fieldsets = [
        (None, {"fields": ["name", "family", architecture.SIZE_FIELD, "license", "tags", "description"]}),
        (
            "Architecture",
            {"fields": [architecture.SHAPE_FIELDS[i : i + 3] for i in range(0, len(architecture.SHAPE_FIELDS), 3)]},
        ),
        ("Tool calling", {"fields": ["tool_call_parser"]}),
    ]

    change_list_template = "admin/catalog/modelcard/change_list.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ModelCard]:
        return super().get_queryset(request).annotate(n_variants=Count("variants"))

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.add_from_file)
        return [path("add-from-file/", view, name="catalog_modelcard_add_from_file"), *super().get_urls()]

    def add_from_file(self, request: HttpRequest) -> HttpResponse:
        """Read a GGUF header or an HF config.json (here, or on a cluster as the admin's account) into the catalog."""
        if not self.has_add_permission(request):
            return HttpResponseRedirect(reverse("admin:catalog_modelcard_changelist"))
        form = AddFromFileForm(request.POST or None, may_locate=may_change_code(request))
        if request.method == "POST" and form.is_valid():
            cluster = form.cleaned_data["cluster"]
            assert isinstance(request.user, User)  # admin_view let only signed-in staff through
            try:
                reader = cluster_reader(request.user, cluster) if cluster else None
                found = inspect(form.cleaned_data["path"], reader)
                added = add(found, form.cleaned_data["path"], cluster, form.cleaned_data["name"] or None)
            except (ValidationError, ssh.SSHError) as exc:
                form.add_error("path", "; ".join(getattr(exc, "messages", [str(exc)])))
            else:
                what = ", ".join(added.created) or "updated"
                messages.success(
                    request, f"{added.card.name} {added.variant.quantization} from {found.source}: {what}."
                )
                return HttpResponseRedirect(reverse("admin:catalog_modelcard_change", args=[added.card.pk]))
        context = {**self.admin_site.each_context(request), "title": "Add a model from a file", "form": form,
                   "opts": self.model._meta}  # fmt: skip
        return TemplateResponse(request, "admin/catalog/modelcard/add_from_file.html", context)

    @admin.display(description="variants", ordering="n_variants")
    def variant_count(self, obj: ModelCard) -> int:
        return int(getattr(obj, "n_variants", 0))  # annotated by get_queryset


class AddFromFileForm(forms.Form):
    path = forms.CharField(
        max_length=500, help_text="Absolute path of a .gguf file, or of a directory with config.json (Hugging Face)."
    )
    cluster = forms.ModelChoiceField(
        Cluster.objects.all(),
        required=False,
        help_text="Read the path on this cluster (as your cluster account) and record it as the model's location. "
        "Empty: read it on the portal host.",
    )
    name = forms.CharField(max_length=120, required=False, help_text="Model card name (default: from the file).")

    def __init__(self, *args: Any, may_locate: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.may_locate = may_locate

    def clean_cluster(self) -> Cluster | None:
        """A location on a cluster is the file every researcher's job loads there."""
        cluster: Cluster | None = self.cleaned_data["cluster"]
        if cluster is not None and not self.may_locate:
            raise ValidationError(f"The model's location on a cluster is what its jobs load. {NOT_CODE}")
        return cluster


class ScanForm(forms.Form):
    paths = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 80}),
        help_text="Absolute paths on the cluster, one per line: directories of GGUF files, Hugging Face model "
        f"directories or ollama stores (walked {scanning.MAX_DEPTH} levels down), or single GGUF files.",
    )

    def clean_paths(self) -> list[str]:
        return scanning.check_paths([line for line in self.cleaned_data["paths"].splitlines() if line.strip()])


class VariantLocationInline(RunsCodeReadOnly[VariantLocation], admin.TabularInline[VariantLocation, ModelVariant]):
    model = VariantLocation
    extra = 0
    fields = ["cluster", "path", "ollama_tag"]

    def has_add_permission(self, request: HttpRequest, obj: ModelVariant | None = None) -> bool:
        """A location is the file every researcher's job loads: adding one is choosing it."""
        return may_change_code(request) and super().has_add_permission(request, obj)


@admin.register(ModelVariant)
class ModelVariantAdmin(admin.ModelAdmin[ModelVariant]):
    list_display = ["model", "quantization", "format", "size_gib"]
    list_filter = ["format", "quantization", "model__family"]
    search_fields = ["model__name", "quantization"]
    list_select_related = ["model"]
    inlines = [VariantLocationInline]


@admin.register(SiteMeasurement)
class SiteMeasurementAdmin(admin.ModelAdmin[SiteMeasurement]):
    """What sessions measured here, as the jobs app keeps them (`manage.py estimate --check-measured` compares them
    with the estimate). Read only; an admin may delete a row that is no honest measurement (its session's owner
    writes the log it came from)."""

    list_display = ["variant", "runtime", "context", "parallel", "gpu_type", "gpus_per_node", "nodes", "measured_at"]
    list_filter = ["runtime", "gpu_type"]
    search_fields = ["variant__model__name", "source"]
    list_select_related = ["variant__model", "gpu_type"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: SiteMeasurement | None = None) -> bool:
        return False


@admin.register(VariantLocation)
class VariantLocationAdmin(RunsCodeReadOnly[VariantLocation], admin.ModelAdmin[VariantLocation]):
    list_display = ["variant", "cluster", "path", "ollama_tag"]
    list_filter = ["cluster"]
    search_fields = ["variant__model__name", "path", "ollama_tag"]
    list_select_related = ["variant__model", "cluster"]

    def get_readonly_fields(self, request: HttpRequest, obj: VariantLocation | None = None) -> list[str]:
        """Which variant a location serves is part of what it loads, here where it is a field."""
        fields = super().get_readonly_fields(request, obj)
        return fields if may_change_code(request) else [*fields, "variant"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return may_change_code(request) and super().has_add_permission(request)


class ClusterAccountForm(forms.ModelForm[ClusterAccount]):
    private_key = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}),
        required=False,
        strip=False,
        help_text="Service accounts: paste the account's unencrypted private key (stored encrypted). Leave empty "
        "to keep the current key, or, for a new account, to have the portal generate a key pair.",
    )

    class Meta:
        model = ClusterAccount
        fields = ["cluster", "kind", "user", "label", "members", "username", "slurm_account", "trusted", "restricted"]

    def save(self, commit: bool = True) -> ClusterAccount:
        account: ClusterAccount = super().save(commit=False)
        if self.cleaned_data.get("private_key", "").strip():
            account.set_private_key(self.cleaned_data["private_key"].strip() + "\n")
        if commit:
            account.save()
            self.save_m2m()
        return account


@admin.register(ClusterAccount)
class ClusterAccountAdmin(admin.ModelAdmin[ClusterAccount]):
    form = ClusterAccountForm
    list_display = ["username", "cluster", "kind", "user", "label", "slurm_account", "trusted", "restricted"]
    list_filter = ["cluster", "kind", "trusted", "restricted"]
    search_fields = ["username", "user__username", "label"]
    filter_horizontal = ["members"]
    readonly_fields = ["public_key", "created_at"]
    # What a trusted account is: change one of these without the permission to trust and the trust is gone.
    IDENTITY = {"cluster", "kind", "user", "username", "private_key"}

    def get_readonly_fields(self, request: HttpRequest, obj: ClusterAccount | None = None) -> list[str]:
        """`trusted` lets an account speak for the whole site: only superusers and staff with the permission tick it
        (change permission on cluster accounts is not enough)."""
        fields = list(super().get_readonly_fields(request, obj))
        return fields if request.user.has_perm(TRUST_PERMISSION) else [*fields, "trusted"]

    def save_model(self, request: HttpRequest, obj: ClusterAccount, form: Any, change: bool) -> None:
        """Someone without the permission who points a trusted account at another login (user name, key, cluster)
        would otherwise hand that login the trust: it is dropped, and the page says so."""
        if obj.trusted and not request.user.has_perm(TRUST_PERMISSION) and self.IDENTITY & set(form.changed_data):
            obj.trusted = False
            messages.warning(request, f"{obj} is no longer trusted for site-wide reads: its login changed.")
        super().save_model(request, obj, form, change)
