"""Read what the catalog needs from a GGUF file's header: architecture numbers, parameter count, file type.

Only the header is read (key/value metadata and tensor descriptions, usually a few MB even for 70B files), so a
prefix of the file is enough; `read_header(prefix)` raises NeedMoreBytes when the prefix ends inside the header.
The value types and layout follow the GGUF spec (ggml docs/gguf.md); the `gguf` package supplies the enums.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from catalog.architecture import Architecture

MAGIC = b"GGUF"
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# Arrays longer than this are skipped, not kept (tokenizer vocabularies); their length is still recorded.
_KEEP_ARRAY = 512  # llama.cpp's LLAMA_MAX_LAYERS: per-layer arrays are kept whole; vocabularies are not


class GGUFError(ValueError):
    """Not a GGUF file, or a header this reader cannot make sense of."""


class NeedMoreBytes(GGUFError):
    """The prefix ends inside the header; read more of the file."""


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    arch_name: str  # general.architecture, e.g. llama
    name: str
    params: int
    arch: Architecture
    file_type: str  # the catalog's quantisation name, e.g. Q4_K_M
    tensor_bytes: int
    metadata: dict[str, Any]


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NeedMoreBytes(f"the header continues past byte {len(self.data)}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > 1 << 24:
            raise GGUFError(f"implausible string length {length} at byte {self.pos}")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        try:
            vtype = GGUFValueType(kind)
        except ValueError:
            raise GGUFError(f"unknown value type {kind} at byte {self.pos}") from None
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            items = [self.value(item_type) for _ in range(count)]
            return items if count <= _KEEP_ARRAY else _Skipped(count)
        return self.unpack(_SCALARS[vtype])


@dataclass(frozen=True)
class _Skipped:
    length: int


@dataclass(frozen=True)
class Shard:
    """One file's header: a whole model, or one file of a model split with llama.cpp's gguf-split, whose first file
    holds the metadata and every file its own tensors."""

    version: int
    metadata: dict[str, Any]
    tensors: int
    params: int
    tensor_bytes: int
    tensor_names: frozenset[str]
    data_end: int  # where the last tensor's data ends: a file shorter than this is truncated


def read_header(prefix: bytes) -> GGUFInfo:
    return combine([read_shard(prefix)])


def read_shard(prefix: bytes) -> Shard:
    cursor = _Cursor(prefix)
    if cursor.take(4) != MAGIC:
        raise GGUFError("not a GGUF file (the first bytes are not 'GGUF')")
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    params = tensor_bytes = data_bytes = 0
    names: set[str] = set()
    for _ in range(tensor_count):
        names.add(cursor.string())
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        ggml_type, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        elements = math.prod(dims)
        params += elements
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"unknown tensor type {ggml_type}") from None
        tensor_bytes += elements // block * size
        data_bytes = max(data_bytes, offset + elements // block * size)
    # The tensor data starts at the next multiple of general.alignment after the header (GGUF spec).
    alignment = metadata.get("general.alignment")
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
    data_start = -(-cursor.pos // alignment) * alignment
    return Shard(version, metadata, tensor_count, params, tensor_bytes, frozenset(names), data_start + data_bytes)


def combine(shards: list[Shard]) -> GGUFInfo:
    """The model the shards make together (the first one's metadata, everyone's tensors)."""
    first, names = shards[0], frozenset().union(*(s.tensor_names for s in shards))
    # llama.cpp uses token_embd for the output head when a file has no output.weight (src/llama-model.cpp).
    tied = "output.weight" not in names if "token_embd.weight" in names else None
    params, tensor_bytes = sum(s.params for s in shards), sum(s.tensor_bytes for s in shards)
    return _info(first.version, first.metadata, params, tensor_bytes, tied)


def _info(version: int, meta: dict[str, Any], params: int, tensor_bytes: int, tied: bool | None) -> GGUFInfo:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError("the header has no general.architecture")

    def need(key: str) -> int:
        value = meta.get(f"{arch}.{key}")
        if not isinstance(value, int):
            raise GGUFError(f"the header has no {arch}.{key}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads if heads else 0)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (tokens.length if isinstance(tokens, _Skipped) else len(tokens or []))
    return GGUFInfo(
        version=version,
        arch_name=arch,
        name=str(meta.get("general.name") or ""),
        params=params,
        arch=Architecture(
            params_b=Architecture.params_b_of(params),
            layers=need("block_count"),
            hidden_size=hidden,
            attention_heads=heads,
            kv_heads=int(kv_heads) if isinstance(kv_heads, int) else heads,
            head_dim=int(head_dim),
            vocab_size=int(vocab),
            max_context=need("context_length"),
            **_moe_and_window(meta, arch),
            tied_embeddings=tied,
        ),
        file_type=file_type_name(meta.get("general.file_type")),
        tensor_bytes=tensor_bytes,
        metadata={k: v for k, v in meta.items() if not isinstance(v, _Skipped)},
    )


def _moe_and_window(meta: dict[str, Any], arch: str) -> dict[str, int | None]:
    """The FFN width (each expert's for a MoE: llama.cpp's expert_feed_forward_length, else feed_forward_length,
    which some writers store per layer as an array), the experts, and the sliding window, as the header says them."""

    def number(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, list):  # per layer: the largest, which is what memory must hold
            value = max((v for v in value if isinstance(v, int)), default=None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    experts = number("expert_count")
    window = number("attention.sliding_window")
    return {
        "ffn_size": (number("expert_feed_forward_length") if experts else None) or number("feed_forward_length"),
        "experts": experts,
        "experts_used": number("expert_used_count") if experts else None,
        "sliding_window": window,
        "sliding_window_layers": _window_layers(meta, arch) if window else None,
    }


# Where a header names a window but not which layers use it, llama.cpp's loader knows the pattern per architecture
# (src/models/*.cpp: load_swa_pattern(ml, n, dense_first)): one layer in every n attends to the whole context, the
# last of each n, or the first where dense_first; a header's own sliding_window_pattern overrides n.
_SWA_PATTERN = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "cohere2moe": (4, True), "olmo2": (4, False), "exaone4": (4, False),
    "exaone-moe": (4, False), "llama4": (4, False), "gpt-oss": (2, False), "afmoe": (4, False),
    "smallthinker": (4, True), "plamo3": (8, False), "mellum": (4, False), "laguna": (4, True),
    "muse-glimmer": (4, False),
}  # fmt: skip


def _window_layers(meta: dict[str, Any], arch: str) -> int | None:
    layers = meta.get(f"{arch}.block_count")
    if not isinstance(layers, int):
        return None
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern and all(isinstance(p, bool) for p in pattern):
        return sum(pattern)  # one flag per layer: true where the layer uses the window
    every, dense_first = _SWA_PATTERN.get(arch, (None, False))
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        every = pattern
    if every is None:
        return None
    if every == 0:  # llama_hparams::set_swa_pattern(0): every layer uses the window
        return layers
    return layers - (-(-layers // every) if dense_first else layers // every)


def file_type_name(value: object) -> str:
    """general.file_type (llama_ftype) as the catalog spells quantisations: MOSTLY_Q4_K_M -> Q4_K_M, F16 -> fp16."""
    if not isinstance(value, int):
        return ""
    try:
        name = LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return ""
    return {"F16": "fp16", "BF16": "bf16", "ALL_F32": "fp32", "F32": "fp32"}.get(name, name)


def read_file(path: str, first_bytes: int = 4 << 20, limit: int = 256 << 20) -> GGUFInfo:
    """A local file: read a growing prefix until the header is complete."""
    size = first_bytes
    while True:
        with open(path, "rb") as fh:
            prefix = fh.read(size)
        try:
            return read_header(prefix)
        except NeedMoreBytes:
            if len(prefix) < size or size >= limit:
                raise GGUFError(f"{path}: the header is truncated or larger than {limit >> 20} MiB") from None
            size *= 4
