from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from catalog.models import (
    Cluster,
    ClusterRuntime,
    GPUType,
    ModelCard,
    ModelVariant,
    NodeGroup,
    Partition,
    Runtime,
    VariantLocation,
)


class PartitionInline(admin.TabularInline):
    model = Partition
    extra = 0
    fields = ["name", "max_walltime_min", "default_walltime_min", "is_debug"]
    show_change_link = True


class ClusterRuntimeInline(admin.TabularInline):
    model = ClusterRuntime
    extra = 0
    fields = ["runtime", "modules", "binary", "rpc_binary", "model_dir", "extra_flags"]


@admin.register(Cluster)
class ClusterAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "login_host",
        "ssh_port",
        "node_access",
        "host_key_pinned",
        "partition_count",
    ]
    list_filter = ["node_access"]
    search_fields = ["name", "slug", "login_host", "notes"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [PartitionInline, ClusterRuntimeInline]
    fieldsets = [
        (None, {"fields": ["name", "slug", "notes"]}),
        ("Login host", {"fields": ["login_host", "ssh_port", "host_key", "node_access"]}),
        ("Slurm", {"fields": ["default_account"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Cluster]:
        return super().get_queryset(request).annotate(n_partitions=Count("partitions"))

    @admin.display(boolean=True, description="host key pinned")
    def host_key_pinned(self, obj: Cluster) -> bool:
        return bool(obj.host_key.strip())

    @admin.display(description="partitions", ordering="n_partitions")
    def partition_count(self, obj: Cluster) -> int:
        return obj.n_partitions  # type: ignore[attr-defined]


class NodeGroupInline(admin.TabularInline):
    model = NodeGroup
    extra = 0
    fields = ["gpu_type", "gpus_per_node", "node_count", "cpus_per_node", "ram_gib"]


@admin.register(Partition)
class PartitionAdmin(admin.ModelAdmin):
    list_display = ["name", "cluster", "max_walltime_min", "default_walltime_min", "is_debug"]
    list_filter = ["cluster", "is_debug"]
    search_fields = ["name", "cluster__name", "cluster__slug"]
    list_select_related = ["cluster"]
    inlines = [NodeGroupInline]


@admin.register(GPUType)
class GPUTypeAdmin(admin.ModelAdmin):
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
class NodeGroupAdmin(admin.ModelAdmin):
    list_display = ["partition", "gpu_type", "gpus_per_node", "node_count", "cpus_per_node", "ram_gib"]
    list_filter = ["gpu_type", "partition__cluster"]
    search_fields = ["partition__name", "partition__cluster__slug", "gpu_type__name"]
    list_select_related = ["partition__cluster", "gpu_type"]


@admin.register(Runtime)
class RuntimeAdmin(admin.ModelAdmin):
    list_display = ["kind", "display_name", "default_flags"]
    search_fields = ["kind", "display_name"]


@admin.register(ClusterRuntime)
class ClusterRuntimeAdmin(admin.ModelAdmin):
    list_display = ["runtime", "cluster", "modules", "binary", "rpc_binary"]
    list_filter = ["runtime", "cluster"]
    search_fields = ["cluster__slug", "modules", "binary"]
    list_select_related = ["runtime", "cluster"]


class ModelVariantInline(admin.TabularInline):
    model = ModelVariant
    extra = 0
    fields = ["quantization", "format", "size_gib"]
    show_change_link = True


@admin.register(ModelCard)
class ModelCardAdmin(admin.ModelAdmin):
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
        (None, {"fields": ["name", "family", "params_b", "license", "tags", "description"]}),
        (
            "Architecture",
            {
                "fields": [
                    ("layers", "hidden_size"),
                    ("attention_heads", "kv_heads", "head_dim"),
                    ("vocab_size", "max_context"),
                ]
            },
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ModelCard]:
        return super().get_queryset(request).annotate(n_variants=Count("variants"))

    @admin.display(description="variants", ordering="n_variants")
    def variant_count(self, obj: ModelCard) -> int:
        return obj.n_variants  # type: ignore[attr-defined]


class VariantLocationInline(admin.TabularInline):
    model = VariantLocation
    extra = 0
    fields = ["cluster", "path", "ollama_tag"]


@admin.register(ModelVariant)
class ModelVariantAdmin(admin.ModelAdmin):
    list_display = ["model", "quantization", "format", "size_gib"]
    list_filter = ["format", "quantization", "model__family"]
    search_fields = ["model__name", "quantization"]
    list_select_related = ["model"]
    inlines = [VariantLocationInline]


@admin.register(VariantLocation)
class VariantLocationAdmin(admin.ModelAdmin):
    list_display = ["variant", "cluster", "path", "ollama_tag"]
    list_filter = ["cluster"]
    search_fields = ["variant__model__name", "path", "ollama_tag"]
    list_select_related = ["variant__model", "cluster"]
