"""`manage.py estimate`: GPU memory for a model from the catalog or from explicit architecture numbers, beside what
sessions of the same choices measured on this site; `--check-measured`: every choice the site measured where the
estimator is off."""

from __future__ import annotations

import json
import math
from argparse import ArgumentParser, ArgumentTypeError
from dataclasses import replace
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from catalog import architecture, measured
from catalog.architecture import Architecture
from catalog.confidence import purpose_confidence
from catalog.estimate import Estimate, EstimateError, Request, fit, smallest_layout
from catalog.models import GPUType, ModelCard, ModelVariant
from catalog.plans import check_measured, site_measured
from catalog.quant import canonical_quant
from catalog.runtime_rules import RUNTIMES
from catalog.training import OPTIMIZER_STATES, PURPOSES, PurposeRequest, estimate_purpose


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _yes_no(text: str) -> bool:
    folded = text.strip().casefold()
    if folded in ("yes", "true", "on", "1"):
        return True
    if folded in ("no", "false", "off", "0"):
        return False
    raise ArgumentTypeError(f"expected yes or no, got {text!r}")


class Command(BaseCommand):
    help = "Estimate GPU memory (weights, KV cache, compute, overhead; per GPU) and whether it fits a GPU."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--model", help="a model card name from the catalog")
        parser.add_argument("--quant", help="quantisation (default: the model's smallest variant)")
        for field in architecture.FIELDS:  # the architecture, for a model that is not in the catalog
            kind = architecture.field_type(field)
            parser.add_argument(_flag(field), type=_yes_no if kind is bool else kind)
        parser.add_argument("--file-gib", type=float, help="the weights file's size, if known")
        parser.add_argument("--runtime", choices=list(RUNTIMES), help="required but with --check-measured")
        parser.add_argument("--context", type=int, help="required but with --check-measured")
        parser.add_argument("--parallel", type=int, default=1)
        parser.add_argument("--kv-type", default="f16")
        parser.add_argument("--flash-attn", choices=["on", "off"])
        parser.add_argument(
            "--batch-tokens", "--ubatch", dest="batch_tokens", type=int,
            help="tokens per step: llama.cpp -ub (default 512), vLLM max_num_batched_tokens (default 8192)",
        )  # fmt: skip
        parser.add_argument(
            "--prompt-tokens", type=int,
            help="the longest prompt (transformers; default: the context); the rest of the context is generated",
        )  # fmt: skip
        parser.add_argument(
            "--cache-tokens", type=int,
            help="transformers: a KV cache preallocated for this many tokens per sequence (StaticCache's "
            "max_cache_len, AutoAWQ's fused max_seq_len); default: a dynamic cache, or the context when fused",
        )  # fmt: skip
        parser.add_argument(
            "--fused-modules", choices=["on", "off"], default="off",
            help="transformers with AWQ: AutoAWQ's fused modules (do_fuse / fuse_layers)",
        )  # fmt: skip
        parser.add_argument("--gpus", type=int, default=1, help="GPUs in all")
        parser.add_argument("--gpus-per-node", type=int, help="default: the catalog's for --gpu, else 1")
        gpu = parser.add_mutually_exclusive_group()
        gpu.add_argument("--gpu", help="a GPU type from the catalog")
        gpu.add_argument("--gpu-gib", type=float, help="an ad-hoc GPU with this many GiB usable")
        parser.add_argument("--purpose", choices=list(PURPOSES), default="inference", help="; ".join(
            f"{k}: {v}" for k, v in PURPOSES.items()))  # fmt: skip
        parser.add_argument("--lora-rank", type=int, default=16)
        parser.add_argument("--lora-targets", choices=["all", "attention", "qv"], default="all")
        parser.add_argument(
            "--double-quant", choices=["on", "off"], default="on", help="QLoRA's nf4 double quantisation"
        )
        parser.add_argument("--optimizer", choices=list(OPTIMIZER_STATES), default="adamw")
        parser.add_argument("--checkpointing", choices=["on", "off"], default="on", help="gradient checkpointing")
        parser.add_argument("--mixed-precision", action="store_true", help="full fine-tuning with fp32 master weights")
        parser.add_argument(
            "--check-measured", action="store_true",
            help=f"list every choice sessions measured on this site where the estimate is off by more than "
            f"{measured.OFF_BY:.0%}",
        )  # fmt: skip
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **o: Any) -> None:
        if o["check_measured"]:
            self._check_measured(o["json"])
            return
        missing = [_flag(name) for name in ("runtime", "context") if o[name] is None]
        if missing:
            raise CommandError(f"give {' and '.join(missing)} (or --check-measured)")
        request, usable, per_node, variant = self._request(o)
        purpose = PurposeRequest(
            request, o["purpose"], lora_rank=o["lora_rank"], lora_targets=o["lora_targets"], optimizer=o["optimizer"],
            double_quant=o["double_quant"] == "on",
            gradient_checkpointing=o["checkpointing"] == "on", mixed_precision=o["mixed_precision"],
        )  # fmt: skip

        def sized(r: Request) -> Estimate:
            return estimate_purpose(replace(purpose, serving=r))

        try:
            est = sized(request)
        except EstimateError as exc:
            raise CommandError(str(exc)) from None
        result: dict[str, Any] = {
            "weights_gib": round(est.weights_gib, 3),
            "kv_cache_gib": round(est.kv_cache_gib, 3),
            "compute_gib": round(est.compute_gib, 3),
            "overhead_gib": round(est.overhead_gib, 3),
            "total_gib": round(est.total_gib, 3),
            "per_gpu_gib": [round(g, 3) for g in est.per_gpu_gib],
            "host_gib": round(est.host_gib, 3),
            **{label.replace(" ", "_") + "_gib": round(gib, 3) for label, gib in est.extra_gib},
            "notes": est.notes,
            "confidence": purpose_confidence(purpose).summary(),
        }
        beside = None
        if variant is not None and o["purpose"] == "inference":  # sessions serve: a plan's figures are not theirs
            beside = site_measured(request, variant)
            beside = beside.on(o["gpu"]) if o["gpu"] else beside
            result["measured"] = beside.as_dict()
        if usable is not None:
            verdict = fit(est, usable)
            layout = smallest_layout(request, usable, per_node, max_nodes=64, estimator=sized)
            result.update(
                usable_gib=round(usable, 3),
                fits=verdict.fits,
                headroom_gib=round(verdict.headroom_gib, 3),
                min_gpus=layout.gpus if layout else None,
                min_nodes=layout.nodes if layout else None,
            )
        if o["json"]:
            self.stdout.write(json.dumps(result, indent=2))
        else:
            self._table(result)
            self._measured_table(beside)

    def _request(self, o: dict[str, Any]) -> tuple[Request, float | None, int, ModelVariant | None]:
        file_gib = o["file_gib"]
        variant: ModelVariant | None = None
        if o["model"]:
            card = ModelCard.objects.filter(name=o["model"]).first()
            if card is None:
                raise CommandError(f"there is no model {o['model']!r} in the catalog")
            arch = card.architecture
            variants = ModelVariant.objects.filter(model=card)
            if o["quant"]:
                try:
                    quant = canonical_quant(o["quant"])
                except KeyError:
                    raise CommandError(f"unknown quantisation {o['quant']!r}") from None
                variant = variants.filter(quantization=quant).first()
            else:
                variant = variants.order_by("size_gib").first()
                quant = variant.quantization if variant else "fp16"
            if variant is not None and variant.format == "gguf" and file_gib is None:
                file_gib = variant.size_gib
        else:
            missing = [_flag(name) for name in [*architecture.REQUIRED_FIELDS, "quant"] if o[name] is None]
            if missing:
                raise CommandError(f"give --model NAME, or all of: {', '.join(missing)}")
            arch = Architecture(**{name: o[name] for name in architecture.FIELDS})
            quant = o["quant"]
        usable: float | None = o["gpu_gib"]
        per_node = o["gpus_per_node"]
        if o["gpu"]:
            gpu = GPUType.objects.filter(name=o["gpu"]).first()
            if gpu is None:
                raise CommandError(f"there is no GPU type {o['gpu']!r} in the catalog")
            usable = gpu.usable_gib
            if per_node is None:
                per_node = max(gpu.node_groups.values_list("gpus_per_node", flat=True), default=1)
        per_node = per_node or 1
        gpus = o["gpus"]
        if gpus < 1 or per_node < 1:
            raise CommandError("--gpus and --gpus-per-node must be positive")
        nodes = math.ceil(gpus / per_node)
        flash = None if o["flash_attn"] is None else o["flash_attn"] == "on"
        request = Request(
            arch=arch,
            quant=quant,
            runtime=o["runtime"],
            context=o["context"],
            parallel=o["parallel"],
            kv_type=o["kv_type"],
            flash_attn=flash,
            batch_tokens=o["batch_tokens"],
            prompt_tokens=o["prompt_tokens"],
            cache_tokens=o["cache_tokens"],
            fused_modules=o["fused_modules"] == "on",
            file_size_gib=file_gib,
        )
        return replace(request, gpus_per_node=min(gpus, per_node), nodes=nodes), usable, per_node, variant

    def _table(self, r: dict[str, Any]) -> None:
        parts = [k for k in r if k.endswith("_gib") and k not in ("total_gib", "host_gib", "per_gpu_gib", "usable_gib")]
        parts = [k for k in parts if k != "headroom_gib"]
        for key in [*parts, "total_gib"]:  # the serving parts, then a purpose's (gradients, optimizer states, ...)
            self.stdout.write(f"{key.removesuffix('_gib').replace('_', ' '):>12}: {r[key]:8.2f} GiB")
        self.stdout.write(f"{'per GPU':>12}: " + ", ".join(f"{g:.2f}" for g in r["per_gpu_gib"]) + " GiB")
        if r["host_gib"]:
            self.stdout.write(f"{'host':>12}: {r['host_gib']:8.2f} GiB (input embedding, kept in RAM)")
        if "fits" in r:
            verdict = "fits" if r["fits"] else "does NOT fit"
            self.stdout.write(
                f"{'verdict':>12}: {verdict} in {r['usable_gib']:.2f} GiB (headroom {r['headroom_gib']:.2f})"
            )
            if r["min_gpus"]:
                self.stdout.write(f"{'smallest':>12}: {r['min_gpus']} GPU(s) on {r['min_nodes']} node(s)")
            else:
                self.stdout.write(f"{'smallest':>12}: no layout of this GPU fits")
        for note in r["notes"]:
            self.stdout.write(f"{'':>12}  {note}")
        if r["confidence"]:
            self.stdout.write(f"{'how sure':>12}: {r['confidence']}")

    def _measured_table(self, beside: measured.Beside | None) -> None:
        for figures in beside.figures if beside else ():
            self.stdout.write(f"{'measured':>12}: {figures.summary()}")
            if figures.off:
                self.stdout.write(f"{'':>12}  {figures.advice()}")
        for speed in beside.speeds.values() if beside else ():
            self.stdout.write(f"{'speed':>12}: {speed.summary()}")

    def _check_measured(self, as_json: bool) -> None:
        checked = check_measured()
        off = [c for c in checked if c.figures.off]
        if as_json:
            cases = [{"model": c.variant.model.name, "quant": c.variant.quantization, "runtime": c.runtime,
                      "context": c.context, "parallel": c.parallel, **c.figures.as_dict()} for c in off]  # fmt: skip
            report = {"threshold": measured.OFF_BY, "checked": len(checked), "off": cases}
            self.stdout.write(json.dumps(report, indent=2))
            return
        for case in off:
            self.stdout.write(f"{case.label}, {case.figures.summary()}")
            self.stdout.write(f"    {case.figures.advice()}")
        self.stdout.write(
            f"{len(off)} of {len(checked)} measured choice(s) off by more than {measured.OFF_BY:.0%}"
            if off
            else f"the estimate is within {measured.OFF_BY:.0%} of every measured choice ({len(checked)})"
        )
