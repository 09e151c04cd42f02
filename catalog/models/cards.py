"""Model cards, their quantised variants, and where each variant lives on a cluster."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from catalog import architecture
from catalog import validators as v
from catalog.architecture import Architecture
from catalog.models.clusters import Cluster
from catalog.quant import QUANTS, canonical_quant


class ModelCard(models.Model):
    name = models.CharField(max_length=120, unique=True, validators=[v.model_name])
    family = models.CharField(max_length=50, validators=[v.slug_name], help_text="e.g. llama, mistral, falcon, gpt2")
    # The architecture's columns: one per field of catalog.architecture.Architecture (a test checks they agree).
    params_b = models.FloatField(
        "parameters (billions)", validators=[MinValueValidator(0.0001), MaxValueValidator(10000)]
    )
    layers = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    hidden_size = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    attention_heads = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    kv_heads = models.PositiveIntegerField(validators=[MinValueValidator(1)], help_text="Key/value heads (GQA/MQA).")
    head_dim = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    vocab_size = models.PositiveIntegerField(validators=[MinValueValidator(1)])
    max_context = models.PositiveIntegerField(validators=[MinValueValidator(1)], help_text="Tokens.")
    ffn_size = models.PositiveIntegerField(
        "FFN size", null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="Feed-forward (intermediate) width; per expert for a mixture of experts.",
    )  # fmt: skip
    experts = models.PositiveIntegerField(
        null=True, blank=True, help_text="Experts per layer of a mixture of experts; empty or 0: dense."
    )
    experts_used = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Experts each token is routed to."
    )
    sliding_window = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Tokens a sliding-window layer keeps."
    )
    sliding_window_layers = models.PositiveIntegerField(
        null=True, blank=True, help_text="Layers that attend only within the window; empty: not stated (sized as full)."
    )
    tied_embeddings = models.BooleanField(
        null=True, blank=True, help_text="The output head shares the input embedding's weights (tie_word_embeddings)."
    )
    license = models.CharField(max_length=100, blank=True)
    # Not in RUNS_CODE (catalog/models/runs_code.py) though it reaches vLLM's command line: it can only be one of
    # vLLM's own parser names (a fixed list), never a file of code (--tool-parser-plugin, which the portal omits).
    tool_call_parser = models.CharField(
        max_length=40, blank=True, validators=[v.tool_call_parser],
        help_text="vLLM's --tool-call-parser name for this model's tool calls (e.g. hermes for Qwen2.5 and Qwen3, "
        "llama3_json for Llama 3.1-3.3, mistral); empty: vLLM sessions do not call tools. Filled from the chat "
        "template when the model is added from its files. llama.cpp and ollama read the tool format from the chat "
        "template itself.",
    )  # fmt: skip
    tags = models.CharField(
        "domain tags", max_length=300, blank=True, validators=[v.tag_list], help_text="Comma-separated."
    )
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["family", "params_b", "name"]
        verbose_name = "model card"

    def __str__(self) -> str:
        return self.name

    @property
    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.tags.split(",") if t.strip()]

    @property
    def architecture(self) -> Architecture:
        return Architecture(**{name: getattr(self, name) for name in architecture.FIELDS})

    def set_architecture(self, arch: Architecture) -> None:
        for name in architecture.FIELDS:
            setattr(self, name, getattr(arch, name))

    def clean(self) -> None:
        super().clean()
        if self.attention_heads and self.kv_heads:
            if self.kv_heads > self.attention_heads:
                raise ValidationError({"kv_heads": "A model cannot have more KV heads than attention heads."})
            if self.attention_heads % self.kv_heads:
                raise ValidationError(
                    {"kv_heads": f"Attention heads ({self.attention_heads}) must be a multiple of KV heads."}
                )
        self.tags = ",".join(self.tag_list)


class ModelVariant(models.Model):
    class Format(models.TextChoices):
        GGUF = "gguf", "GGUF file"
        SAFETENSORS = "safetensors", "safetensors directory"
        OLLAMA = "ollama", "ollama tag"

    model = models.ForeignKey(ModelCard, on_delete=models.CASCADE, related_name="variants")
    quantization = models.CharField(max_length=20, help_text="e.g. Q4_K_M, Q8_0, fp16, bf16, AWQ, GPTQ-INT4.")
    format = models.CharField(max_length=12, choices=Format.choices)
    size_gib = models.FloatField("size on disk (GiB)", validators=[MinValueValidator(0.0001)])

    class Meta:
        ordering = ["model__name", "size_gib"]
        constraints = [models.UniqueConstraint(fields=["model", "quantization"], name="variant_unique_quant")]
        verbose_name = "model variant"

    def __str__(self) -> str:
        return f"{self.model.name} {self.quantization}"

    def clean(self) -> None:
        super().clean()
        try:
            self.quantization = canonical_quant(self.quantization)
        except KeyError:
            raise ValidationError(
                {"quantization": f"Unknown quantisation {self.quantization!r}; known: {', '.join(QUANTS)}."}
            ) from None
        if self.format and self.format not in QUANTS[self.quantization].formats:
            raise ValidationError({"format": f"{self.quantization} does not come as {self.get_format_display()}."})


class VariantLocation(models.Model):
    """Where a variant lives on one cluster: a file or directory path, and/or an ollama tag."""

    variant = models.ForeignKey(ModelVariant, on_delete=models.CASCADE, related_name="locations")
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="model_locations")
    path = models.CharField(max_length=500, blank=True, validators=[v.absolute_path])
    ollama_tag = models.CharField(max_length=200, blank=True, validators=[v.ollama_tag])

    class Meta:
        ordering = ["variant", "cluster__name"]
        constraints = [models.UniqueConstraint(fields=["variant", "cluster"], name="one_location_per_cluster")]
        verbose_name = "model location"

    def __str__(self) -> str:
        return f"{self.variant} on {self.cluster.slug}"

    def clean(self) -> None:
        super().clean()
        if not self.variant_id:
            return
        fmt = self.variant.format
        if fmt == ModelVariant.Format.OLLAMA:
            if not self.ollama_tag:
                raise ValidationError({"ollama_tag": "An ollama variant needs its tag."})
            if self.path:
                raise ValidationError({"path": "An ollama variant is found by its tag, not a path."})
        else:
            if not self.path:
                raise ValidationError({"path": f"A {self.variant.get_format_display()} needs its path."})
            if self.ollama_tag and fmt != ModelVariant.Format.GGUF:
                raise ValidationError({"ollama_tag": "Only GGUF variants can also be served by ollama."})
