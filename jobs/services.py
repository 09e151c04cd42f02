"""Creating, describing and cancelling sessions: the one path the web, the API and `manage.py sessions` share."""

from __future__ import annotations

import re
import shlex
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from catalog.models import Cluster, ClusterRuntime, GPUType, ModelVariant, Partition, Runtime, VariantLocation
from catalog.quant import canonical_quant
from jobs import render
from jobs.models import ClusterAccount, Session, State, transition


class LaunchForm(forms.Form):
    """What a researcher asks for. Capacity (GPUs per node, free nodes) is Slurm's to judge at submit."""

    cluster = forms.SlugField()
    partition = forms.CharField(max_length=64)
    gpu = forms.CharField(max_length=50)
    gpus = forms.IntegerField(min_value=1, max_value=64)
    nodes = forms.IntegerField(min_value=1, max_value=64, required=False)
    model = forms.CharField(max_length=120)
    quant = forms.CharField(max_length=20)
    runtime = forms.ChoiceField(choices=Runtime.Kind.choices)
    context = forms.IntegerField(min_value=128, max_value=10_000_000)
    parallel = forms.IntegerField(min_value=1, max_value=256, required=False)
    walltime = forms.IntegerField(min_value=1, max_value=60 * 24 * 30)
    cpus = forms.IntegerField(min_value=1, max_value=1024, required=False)
    memory_gib = forms.IntegerField(min_value=1, max_value=16384, required=False)
    notify = forms.BooleanField(required=False)
    account = forms.IntegerField(required=False, help_text="Which of your accounts on the cluster (default: your own).")
    idle_cancel = forms.IntegerField(min_value=5, max_value=60 * 24 * 14, required=False)

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        cluster = Cluster.objects.filter(slug=data["cluster"]).first()
        if cluster is None:
            raise ValidationError({"cluster": f"There is no cluster {data['cluster']!r}."})
        if not cluster.host_key.strip():
            raise ValidationError({"cluster": f"{cluster.name} has no pinned SSH host key yet; ask an admin."})
        usable = ClusterAccount.usable_by(self.user, cluster)
        if not usable:
            raise ValidationError({"cluster": f"You have no account on {cluster.name}; ask an admin to add one."})
        chosen = next((a for a in usable if a.pk == data["account"]), None) if data.get("account") else usable[0]
        if chosen is None:
            raise ValidationError({"account": f"That is not one of your accounts on {cluster.name}."})
        account = chosen
        partition = Partition.objects.filter(cluster=cluster, name=data["partition"]).first()
        if partition is None:
            raise ValidationError({"partition": f"{cluster.name} has no partition {data['partition']!r}."})
        gpu = GPUType.objects.filter(name=data["gpu"]).first()
        if gpu is None or not partition.node_groups.filter(gpu_type=gpu).exists():
            raise ValidationError({"gpu": f"Partition {partition.name} offers no {data['gpu']!r} GPUs."})
        if data["walltime"] > partition.max_walltime_min:
            raise ValidationError(
                {"walltime": f"{partition.name} allows at most {partition.max_walltime_min} minutes."}
            )
        try:
            quant = canonical_quant(data["quant"])
        except KeyError:
            raise ValidationError({"quant": f"Unknown quantisation {data['quant']!r}."}) from None
        variant = (
            ModelVariant.objects.select_related("model").filter(model__name=data["model"], quantization=quant).first()
        )
        if variant is None:
            raise ValidationError({"model": f"There is no {data['model']} {quant} in the catalog."})
        if data["context"] > variant.model.max_context:
            raise ValidationError({"context": f"{variant.model.name} supports at most {variant.model.max_context}."})
        location = VariantLocation.objects.filter(variant=variant, cluster=cluster).first()
        if location is None:
            raise ValidationError({"model": f"{variant} is not available on {cluster.name}."})
        install = ClusterRuntime.objects.select_related("runtime").filter(
            cluster=cluster, runtime__kind=data["runtime"]
        )
        cluster_runtime = install.first()
        if cluster_runtime is None:
            raise ValidationError({"runtime": f"{cluster.name} does not offer {data['runtime']}."})
        nodes = data.get("nodes") or 1
        _check_runtime_fits(cluster_runtime, variant, location, nodes)
        group = partition.node_groups.filter(gpu_type=gpu).order_by("-gpus_per_node").first()
        assert group is not None
        data.update(
            cluster_obj=cluster,
            account_obj=account,
            partition_obj=partition,
            gpu_obj=gpu,
            variant_obj=variant,
            runtime_obj=cluster_runtime.runtime,
            nodes=nodes,
            parallel=data.get("parallel") or 1,
            # Defaults: a fair share of the node per GPU asked for.
            cpus=data.get("cpus")
            or max(1, group.cpus_per_node * min(data["gpus"], group.gpus_per_node) // group.gpus_per_node),
            memory_gib=data.get("memory_gib")
            or max(1, int(group.ram_gib * min(data["gpus"], group.gpus_per_node) / group.gpus_per_node)),
        )
        return data


def _check_runtime_fits(
    cluster_runtime: ClusterRuntime, variant: ModelVariant, location: VariantLocation, nodes: int
) -> None:
    kind = cluster_runtime.runtime.kind
    fmt = variant.format
    if kind == Runtime.Kind.LLAMA_CPP:
        if fmt != ModelVariant.Format.GGUF:
            raise ValidationError({"runtime": "llama.cpp serves GGUF files only."})
        if nodes > 1 and not cluster_runtime.rpc_binary:
            raise ValidationError({"nodes": "This cluster has no ggml-rpc-server for llama.cpp across nodes."})
    elif kind == Runtime.Kind.OLLAMA:
        if not location.ollama_tag:
            raise ValidationError({"runtime": f"{variant} has no ollama tag on this cluster."})
        if nodes > 1:
            raise ValidationError({"nodes": "ollama runs on a single node."})
    elif kind == Runtime.Kind.VLLM and fmt != ModelVariant.Format.SAFETENSORS:
        raise ValidationError({"runtime": "vLLM serves safetensors directories here, not GGUF or ollama tags."})


def launch(user: Any, data: dict[str, Any], request_token: str = "") -> Session:
    """Validate a request (LaunchForm), create the session and enqueue its submit once the row is committed.
    A request_token seen before for this user returns that session instead of a second one."""
    if request_token:
        earlier = Session.objects.filter(owner=user, request_token=request_token).first()
        if earlier is not None:
            return earlier
    form = LaunchForm(data, user=user)
    if not form.is_valid():
        raise ValidationError({f: [e["message"] for e in errs] for f, errs in form.errors.get_json_data().items()})
    d = form.cleaned_data
    try:
        session = _create(user, d, request_token)
    except IntegrityError:
        if not request_token:
            raise
        return Session.objects.get(owner=user, request_token=request_token)  # the other submit won the race
    return session


def _create(user: Any, d: dict[str, Any], request_token: str) -> Session:
    from jobs.tasks import submit_session

    with transaction.atomic():
        session = Session.objects.create(
            owner=user,
            account=d["account_obj"],
            cluster=d["cluster_obj"],
            partition=d["partition_obj"],
            gpu_type=d["gpu_obj"],
            gpus_per_node=d["gpus"],
            nodes=d["nodes"],
            cpus_per_node=d["cpus"],
            memory_gib=d["memory_gib"],
            walltime_min=d["walltime"],
            variant=d["variant_obj"],
            runtime=d["runtime_obj"],
            context_length=d["context"],
            parallel=d["parallel"],
            notify_email=bool(d.get("notify")),
            idle_cancel_min=d.get("idle_cancel"),
            request_token=request_token,
        )
        session.events.create(to_state=State.PENDING, cause=f"requested by {user.get_username()}")
        transaction.on_commit(lambda: submit_session.delay(str(session.pk)))
    return session


def form_errors_text(error: ValidationError) -> str:
    """One line per field for the command line."""
    if hasattr(error, "error_dict"):
        parts = []
        for name, errors in error.error_dict.items():
            for item in errors:
                for message in item.messages:
                    parts.append(f"{name}: {message}" if name != "__all__" else message)
        return "; ".join(parts)
    return "; ".join(error.messages)


def job_spec(session: Session) -> render.JobSpec:
    cluster_runtime = ClusterRuntime.objects.get(cluster=session.cluster, runtime=session.runtime)
    location = VariantLocation.objects.get(variant=session.variant, cluster=session.cluster)
    gpu = session.gpu_type
    return render.JobSpec(
        session_id=str(session.pk),
        runtime=session.runtime.kind,
        partition=session.partition.name,
        account=session.account.effective_slurm_account,
        nodes=session.nodes,
        gpus_per_node=session.gpus_per_node,
        gres_type=gpu.gres_type or gpu.name,
        constraint=gpu.constraint,
        cpus_per_node=session.cpus_per_node,
        memory_gib=session.memory_gib,
        walltime_min=session.walltime_min,
        binary=cluster_runtime.binary,
        rpc_binary=cluster_runtime.rpc_binary,
        model_dir=cluster_runtime.model_dir,
        served_name=session.served_model_name,
        context_length=session.context_length,
        parallel=session.parallel,
        model_path=location.path,
        ollama_tag=location.ollama_tag,
        modules=tuple(cluster_runtime.modules.split()),
        default_flags=tuple(shlex.split(session.runtime.default_flags)),
        extra_flags=tuple(shlex.split(cluster_runtime.extra_flags)),
    )


def request_cancel(session: Session, cause: str, end_reason: str = "cancelled from the portal") -> None:
    """Ask for the end of a session: at once when nothing was submitted, else through scancel in a task.
    `cause` goes into the session's history; `end_reason` is what the card says once Slurm confirms."""
    from jobs.tasks import cancel_session

    Session.objects.filter(pk=session.pk, cancel_requested_at__isnull=True).update(
        cancel_requested_at=timezone.now(), cancel_reason=end_reason[:200]
    )
    if transition(session.pk, State.CANCELLED, cause=f"{cause} (before submission)", allowed_from={State.PENDING}):
        return
    transaction.on_commit(lambda: cancel_session.delay(str(session.pk)))


def describe(session: Session) -> dict[str, Any]:
    """The session as --json prints it (and the API will)."""
    return {
        "uuid": str(session.pk),
        "owner": session.owner.get_username(),
        "state": session.state,
        "cluster": session.cluster.slug,
        "partition": session.partition.name,
        "gpu": session.gpu_type.name,
        "gpus_per_node": session.gpus_per_node,
        "nodes": session.nodes,
        "model": session.variant.model.name,
        "quant": session.variant.quantization,
        "runtime": session.runtime.kind,
        "context": session.context_length,
        "walltime_min": session.walltime_min,
        "job_id": session.job_id or None,
        "node": session.node_list or None,
        "host": session.host or None,
        "port": session.port,
        "slurm_reason": session.slurm_reason or None,
        "estimated_start": session.estimated_start.isoformat() if session.estimated_start else None,
        "end_reason": session.end_reason or None,
        "created_at": session.created_at.isoformat(),
        "submitted_at": session.submitted_at.isoformat() if session.submitted_at else None,
        "started_at": session.started_at.isoformat() if session.started_at else None,
        "ready_at": session.ready_at.isoformat() if session.ready_at else None,
        "ended_at": session.ended_at.isoformat() if session.ended_at else None,
    }


def find_user(name: str) -> Any:
    user_model = get_user_model()
    user = user_model.objects.filter(**{user_model.USERNAME_FIELD: name}).first()
    if user is None:
        raise ValidationError(f"There is no portal user {name!r}.")
    return user


_UUID_PREFIX = re.compile(r"[0-9a-f-]{4,36}\Z")


def find_session(text: str) -> Session:
    """A session by uuid or a unique prefix of it (as the command line prints them)."""
    text = text.strip().lower()
    if not _UUID_PREFIX.match(text):
        raise ValidationError(f"{text!r} is not a session id.")
    lookup = {"pk": text} if len(text) == 36 else {"id__startswith": text}
    matches = list(Session.objects.filter(**lookup)[:2])
    if len(matches) != 1:
        raise ValidationError(f"No single session matches {text!r}.")
    return matches[0]
