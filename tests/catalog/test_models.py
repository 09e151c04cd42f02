from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from catalog.models import ClusterRuntime, NodeGroup, VariantLocation
from tests.catalog import factories as f

pytestmark = pytest.mark.django_db


def errors_of(obj) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as exc:
        obj.full_clean()
    return exc.value.message_dict


def test_a_complete_cluster_with_a_matching_host_key_is_valid() -> None:
    f.cluster(host_key=f.HOST_KEY).full_clean()


@pytest.mark.parametrize("slug", ["Grace", "has space", "-lead", "semi;colon"])
def test_cluster_slug_must_be_lowercase_and_safe(slug: str) -> None:
    assert "slug" in errors_of(f.cluster(slug=slug))


@pytest.mark.parametrize("host", ["bad host", "login;rm -rf", "$(id)", "-oProxyCommand=x", ""])
def test_login_host_rejects_anything_but_a_hostname(host: str) -> None:
    assert "login_host" in errors_of(f.cluster(login_host=host))


@pytest.mark.parametrize("port", [0, 65536])
def test_ssh_port_must_be_a_tcp_port(port: int) -> None:
    assert "ssh_port" in errors_of(f.cluster(ssh_port=port))


def test_host_key_must_parse_as_known_hosts() -> None:
    errors = errors_of(f.cluster(host_key="login.example.edu ssh-ed25519 not-base64!!"))
    assert "not a valid known_hosts line" in errors["host_key"][0] or "not a known_hosts line" in errors["host_key"][0]


def test_host_key_must_be_for_the_login_host_and_port() -> None:
    errors = errors_of(f.cluster(host_key=f.HOST_KEY.replace("login.example.edu", "other.example.edu")))
    assert "is for other.example.edu, not login.example.edu" in errors["host_key"][0]
    # A non-default port needs the [host]:port form, as ssh writes it.
    errors = errors_of(f.cluster(ssh_port=2222, host_key=f.HOST_KEY))
    assert "[login.example.edu]:2222" in errors["host_key"][0]
    f.cluster(ssh_port=2222, host_key=f.HOST_KEY.replace("login.example.edu", "[login.example.edu]:2222")).full_clean()


def test_gpu_reserve_must_leave_usable_memory() -> None:
    assert "reserved_gib" in errors_of(f.gpu(memory_gib=24, reserved_gib=24))
    assert "memory_gib" in errors_of(f.gpu(memory_gib=-1))


def test_gpu_gres_type_defaults_to_its_name_and_usable_memory_subtracts_the_reserve() -> None:
    gpu = f.gpu(name="rtx4090", memory_gib=24, reserved_gib=2)
    gpu.full_clean()
    assert gpu.gres_type == "rtx4090"
    assert gpu.usable_gib == 22


@pytest.mark.parametrize("capability", ["8", "eight", "8.0.1"])
def test_compute_capability_format(capability: str) -> None:
    assert "compute_capability" in errors_of(f.gpu(compute_capability=capability))


def test_partition_default_walltime_cannot_exceed_the_maximum() -> None:
    cluster = f.cluster()
    cluster.save()
    errors = errors_of(f.partition(cluster, max_walltime_min=60, default_walltime_min=120))
    assert "must not exceed the maximum (60 min)" in errors["default_walltime_min"][0]


def test_partition_names_are_unique_per_cluster_and_slurm_safe() -> None:
    cluster = f.cluster()
    cluster.save()
    f.partition(cluster).save()
    assert "__all__" in errors_of(f.partition(cluster))
    assert "name" in errors_of(f.partition(cluster, name="gpu devel"))


def test_node_group_needs_at_least_one_gpu_and_node() -> None:
    cluster = f.cluster()
    cluster.save()
    part = f.partition(cluster)
    part.save()
    gpu = f.gpu()
    gpu.save()
    group = NodeGroup(partition=part, gpu_type=gpu, gpus_per_node=0, node_count=0, cpus_per_node=8, ram_gib=64)
    errors = errors_of(group)
    assert {"gpus_per_node", "node_count"} <= errors.keys()


def test_kv_heads_must_divide_attention_heads() -> None:
    assert "more KV heads" in errors_of(f.model_card(kv_heads=64))["kv_heads"][0]
    assert "multiple of KV heads" in errors_of(f.model_card(attention_heads=32, kv_heads=6))["kv_heads"][0]


def test_model_tags_are_normalised_and_checked() -> None:
    card = f.model_card(tags=" chat , code,")
    card.full_clean()
    assert card.tags == "chat,code"
    assert "tags" in errors_of(f.model_card(tags="chat,Bad Tag"))


def test_variant_quantisation_is_canonicalised_or_rejected() -> None:
    card = f.model_card()
    card.save()
    v = f.variant(card, quantization="q4_k_m")
    v.full_clean()
    assert v.quantization == "Q4_K_M"
    assert "Unknown quantisation 'Q4_K_Z'" in errors_of(f.variant(card, quantization="Q4_K_Z"))["quantization"][0]


def test_variant_format_must_fit_its_quantisation() -> None:
    card = f.model_card()
    card.save()
    assert "does not come as" in errors_of(f.variant(card, quantization="AWQ", format="gguf"))["format"][0]


def test_variant_location_rules_by_format() -> None:
    cluster = f.cluster()
    cluster.save()
    card = f.model_card()
    card.save()
    gguf = f.variant(card)
    gguf.save()
    ollama = f.variant(card, quantization="Q8_0", format="ollama", size_gib=8)
    ollama.save()
    assert "path" in errors_of(VariantLocation(variant=gguf, cluster=cluster))
    assert "path" in errors_of(VariantLocation(variant=gguf, cluster=cluster, path="relative/model.gguf"))
    assert "path" in errors_of(VariantLocation(variant=gguf, cluster=cluster, path="/m/a b.gguf"))
    VariantLocation(variant=gguf, cluster=cluster, path="/m/model.gguf", ollama_tag="llama3.1:8b").full_clean()
    assert "ollama_tag" in errors_of(VariantLocation(variant=ollama, cluster=cluster))
    assert "ollama_tag" in errors_of(VariantLocation(variant=ollama, cluster=cluster, ollama_tag="x;id"))


def test_only_llama_cpp_has_an_rpc_binary_and_flags_must_split() -> None:
    cluster = f.cluster()
    cluster.save()
    vllm = f.runtime("vllm")
    install = ClusterRuntime(cluster=cluster, runtime=vllm, binary="vllm", rpc_binary="rpc-server")
    assert "rpc_binary" in errors_of(install)
    install = ClusterRuntime(cluster=cluster, runtime=vllm, binary="vllm", extra_flags="--x 'unclosed")
    assert "Cannot split these flags" in errors_of(install)["extra_flags"][0]
    install = ClusterRuntime(cluster=cluster, runtime=vllm, binary="vllm; rm -rf ~", modules="cuda/12 x;y")
    assert {"binary", "modules"} <= errors_of(install).keys()
