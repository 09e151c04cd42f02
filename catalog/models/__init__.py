"""The catalog's models, by concern: clusters and their hardware, runtimes, model cards, what sessions measured on
this site, and the accounts the portal logs in to clusters with."""

from catalog.models.accounts import TRUST_PERMISSION, ClusterAccount
from catalog.models.cards import ModelCard, ModelVariant, VariantLocation
from catalog.models.clusters import Cluster, GPUType, NodeGroup, Partition
from catalog.models.measurements import SiteMeasurement
from catalog.models.runs_code import CODE_PERMISSION, RUNS_CODE
from catalog.models.runtimes import ClusterRuntime, Runtime

__all__ = [
    "CODE_PERMISSION",
    "RUNS_CODE",
    "TRUST_PERMISSION",
    "Cluster",
    "ClusterAccount",
    "ClusterRuntime",
    "GPUType",
    "ModelCard",
    "ModelVariant",
    "NodeGroup",
    "Partition",
    "Runtime",
    "SiteMeasurement",
    "VariantLocation",
]
