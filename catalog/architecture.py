"""A model's architecture as the estimator needs it: the one definition that the model card, YAML, the admin, the GGUF
and config.json readers, plans and `manage.py estimate` derive from. Plain Python (no Django).

A new number the estimator needs is a field here, then a column of the same name on ModelCard
(catalog/models/cards.py) and its migration; a test checks that the two agree. YAML, the admin, the readers and the
command line follow from this class.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import get_type_hints


@dataclass(frozen=True)
class Architecture:
    params_b: float  # parameters, billions
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int  # key/value heads; GQA/MQA share them across the query heads
    head_dim: int
    vocab_size: int
    max_context: int | None = None  # tokens; None where it is not known (an ad-hoc estimate)

    @property
    def kv_width(self) -> int:
        """Elements of K (or V) per token per layer: KV heads x head dim (GQA shares them across query heads)."""
        return self.kv_heads * self.head_dim

    @staticmethod
    def params_b_of(count: int) -> float:
        """A parameter count as the catalog keeps it: billions, six decimals, at least 0.0001."""
        return max(round(count / 1e9, 6), 0.0001)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Architecture))
REQUIRED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Architecture) if f.default is MISSING)
# The size stands with the card's name in YAML and the admin; the other fields are the model's shape.
SIZE_FIELD = "params_b"
SHAPE_FIELDS: tuple[str, ...] = tuple(name for name in FIELDS if name != SIZE_FIELD)
_HINTS = get_type_hints(Architecture)


def field_type(name: str) -> type[int] | type[float]:
    """What a field holds, int or float (for YAML and command-line parsing)."""
    return float if _HINTS[name] is float else int
