"""Tool calling: which of vLLM's tool-call parsers reads a model's tool calls, from its chat template, and whether a
session of a runtime can call tools. Plain Python (no Django).

vLLM answers a request with `tools` with a 400 unless it was started with `--enable-auto-tool-choice
--tool-call-parser NAME`, and refuses to start with a NAME it does not know; llama-server and ollama read the tool
format from the chat template itself. The parser is a model card's field (ModelCard.tool_call_parser), inferred here
when a model is added from its files and editable in the admin and YAML. docs/admin-guide.md says how.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from catalog.runtime_rules import rules_for

# The names vLLM 0.32.0 registers (vllm/tool_parsers/__init__.py, _TOOL_PARSERS_TO_REGISTER), the only values a card
# may name: an unknown one stops vLLM at startup. Some are aliases (qwen3_json = hermes, qwen3_coder = qwen3_xml,
# glm47 = glm45, llama4_json = llama3_json). Older names such as qwen2_5, gpt_oss or phi4_mini are not among them.
# A parser is chosen from this fixed list, never a file: `--tool-parser-plugin FILE` would run that file's Python
# as every researcher who launches, so the portal does not offer it.
VLLM_PARSERS = frozenset(
    {
        "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32",
        "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4", "gigachat3", "glm45", "glm47",
        "granite", "granite-20b-fc", "granite4", "hermes", "hf", "hunyuan_a13b", "hy_v3", "hy_v4", "inkling",
        "internlm", "jamba", "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3", "llama3_json", "llama4_json",
        "llama4_pythonic", "longcat", "mimo", "minicpm5", "minimax_m2", "minimax_m3", "mistral", "muse_glimmer",
        "olmo3", "openai", "phi4_mini_json", "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json",
        "qwen3_xml", "seed_oss", "step3", "step3p5", "xlam",
    }
)  # fmt: skip

# config.json's model_type where it alone names the parser (families whose template markers another family shares).
_BY_MODEL_TYPE = {
    "gpt_oss": "openai",
    "gemma4": "gemma4",
    "glm4_moe": "glm45",
    "granitemoehybrid": "granite4",
    "jamba": "jamba",
}

# Markers in a chat template (test top to bottom: several families write <tool_call>, so the more specific first),
# each a tuple of strings that must all be there. The DeepSeek and Kimi markers use full-width bars and U+2581.
_DEEPSEEK_CALLS = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<|channel|>", "<|call|>"), "openai"),  # gpt-oss's harmony format
    (("<|tool_calls_section_begin|>",), "kimi_k2"),
    ((_DEEPSEEK_CALLS, "```json"), "deepseek_v3"),  # V3 / R1: the arguments in a ```json block
    ((_DEEPSEEK_CALLS,), "deepseek_v31"),  # V3.1: the name, the tool-sep marker, {arguments}
    (("<arg_key>", "<arg_value>", "<tool_call>"), "glm45"),  # GLM-4.5-4.7's name, then <arg_key>/<arg_value> pairs
    (("<seed:tool_call>",), "seed_oss"),  # also writes <function=..><parameter=..>: before qwen3_xml
    (("<minimax:tool_call>",), "minimax_m2"),
    (("<function=", "<parameter=", "<tool_call>"), "qwen3_xml"),  # Qwen3-Coder and Qwen3.5
    (("<|tool_call>",), "gemma4"),  # no bar before its '>', unlike Granite's <|tool_call|>
    (("<start_function_call>",), "functiongemma"),
    (("<|tool_call_start|>",), "lfm2"),
    (("<|python_start|>",), "llama4_pythonic"),
    # Llama 3.1-3.3: tool results come back in the ipython role and calls are JSON with "parameters" (the 3.1
    # template writes <|python_tag|> only for its built-in tools, so that alone does not say it).
    (("ipython", '"parameters"'), "llama3_json"),
    (("[TOOL_CALLS]",), "mistral"),
    (("[AVAILABLE_TOOLS]",), "mistral"),
    (("<|tool_call|>",), "granite"),  # Granite 3.x
    (("<|action_start|><|plugin|>",), "internlm"),
    (("<|tools_prefix|>",), "apertus"),
    (("<longcat_tool_call>",), "longcat"),
    # A list of calls in <tool_calls> (Jamba, Hunyuan, Apriel, MiniMax-M1): formats that differ in detail, and a
    # parser that misreads them is worse than none (Jamba's model_type names its own, above).
    (("<tool_calls>",), ""),
)
# Hermes' format, which Qwen2.5, QwQ, Qwen3 and Hermes 2/3 share: one JSON object {"name": ..., "arguments": ...} in
# each <tool_call> (a list, or a bare function name as GLM writes, is another format).
_HERMES_JSON = re.compile(r"""<tool_call>(?:\\n|\s|['"+}{%-]|\{\{)*\{\\?"name\\?":""")
_HERMES_NAMED = ('"name": "', '"arguments": ')
# transformers serve parses tool calls out of a reply only for these model types (transformers 5.19,
# cli/serving/utils.py); any other model's come back as text. A card's family is its config.json's architecture.
_TRANSFORMERS_PARSES = ("qwen2", "qwen3", "gemma4")
# ollama's own test of a template for tools (server/images.go).
_TOOL_WORDS = ("tools", "tool_call")


def supports_tools(chat_template: str) -> bool:
    """Whether a chat template takes tools at all, by ollama's test: it mentions them."""
    return any(word in chat_template for word in _TOOL_WORDS)


def infer(chat_template: str, model_type: str = "") -> str:
    """The vLLM tool-call parser for a model's chat template (GGUF tokenizer.chat_template, or tokenizer_config.json's
    chat_template) and config.json's model_type; "" where the template takes no tools, or writes calls in a format
    no parser is known to read (then vLLM sessions do not call tools, rather than misreading them)."""
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if not supports_tools(chat_template) and "[TOOL_CALLS]" not in chat_template:
        return ""
    for markers, parser in _MARKERS:
        if all(marker in chat_template for marker in markers):
            return parser
    if _HERMES_JSON.search(chat_template) or ("<tool_call>" in chat_template and _hermes_keys(chat_template)):
        return "hermes"
    return ""


def _hermes_keys(chat_template: str) -> bool:
    """A template that writes a call's JSON piece by piece after <tool_call> ('{' then '"name": "' ...)."""
    after = chat_template[chat_template.rfind("<tool_call>") :]
    return all(key in after for key in _HERMES_NAMED)


def check_parser(name: str) -> str:
    """A parser name vLLM knows, or ValueError naming a few it does."""
    if name not in VLLM_PARSERS:
        raise ValueError(
            f"{name!r} is not a tool-call parser vLLM 0.32 knows: e.g. hermes (Qwen2.5, Qwen3, Hermes), llama3_json "
            "(Llama 3.1-3.3), mistral, qwen3_xml (Qwen3-Coder); docs/admin-guide.md lists them all"
        )
    return name


@dataclass(frozen=True)
class ToolCalls:
    """Whether a session of a runtime with a model can call tools, and why, in a few words for the wizard."""

    can: bool
    text: str


def session_tool_calls(runtime: str, parser: str, family: str) -> ToolCalls:
    """Whether a session calls tools, from the model card's parser (set where its chat template writes tool calls) and
    family, and the runtime: vLLM needs the parser itself; llama.cpp and ollama read the template, which the parser
    stands for; transformers serve parses only some families' calls."""
    rules = rules_for(runtime)
    if not parser:
        return ToolCalls(False, f"No tool calls: the model card names no tool-call format ({rules.label} reads them "
                                f"through {rules.tool_calls})")  # fmt: skip
    if runtime == "vllm":
        return ToolCalls(True, f"Calls tools: vLLM reads them with its {parser} parser")
    if runtime == "transformers" and not family.startswith(_TRANSFORMERS_PARSES):
        return ToolCalls(False, f"No tool calls: {rules.label} reads them through {rules.tool_calls}")
    return ToolCalls(True, f"Calls tools: {rules.label} reads them through {rules.tool_calls}")
