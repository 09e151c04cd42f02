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
    # Read from GGUF headers and config.json where they say; None where a model does not say (older cards, dense
    # models, full attention). For a mixture of experts ffn_size is each expert's.
    ffn_size: int | None = None  # the feed-forward (intermediate) width
    experts: int | None = None  # experts per MoE layer; None or 0: a dense model
    experts_used: int | None = None  # experts each token is routed to
    sliding_window: int | None = None  # tokens a sliding-window attention layer keeps
    # How many layers attend only within the window (Gemma 2: half, Gemma 3: five in six); None: not stated, and the
    # KV cache is sized as full attention on every layer, as transformers' default cache and old runtimes keep it.
    sliding_window_layers: int | None = None
    tied_embeddings: bool | None = None  # the output head shares the input embedding's weights

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
# The shape fields a card may leave empty (a catalog's YAML need not name them).
OPTIONAL_FIELDS: tuple[str, ...] = tuple(FIELDS[FIELDS.index("ffn_size") :])
_HINTS = get_type_hints(Architecture)


def field_type(name: str) -> type[int] | type[float] | type[bool]:
    """What a field holds, int, float or bool (for YAML and command-line parsing)."""
    hint = _HINTS[name]
    for kind in (bool, float):
        if hint is kind or hint == kind | None:
            return kind
    return int
