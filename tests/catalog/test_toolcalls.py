"""Tool calling: the vLLM parser read from real models' chat templates, and whether a session calls tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catalog import hfconfig, toolcalls

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# SmolLM2-135M-Instruct's template (the demo's model; tokenizer_config.json): plain ChatML, nothing about tools.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, parser",
    [
        ("Qwen-Qwen2.5-7B-Instruct", "hermes"),
        ("Qwen-Qwen3-0.6B", "hermes"),
        ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes"),
        ("meta-llama-Llama-3.1-8B-Instruct", "llama3_json"),
        ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
        ("Qwen3-Coder", "qwen3_xml"),
        ("deepseek-ai-DeepSeek-V3.1", "deepseek_v31"),
        ("GLM-4.6", "glm45"),
        ("ibm-granite-granite-3.3-2B-Instruct", "granite"),
        ("moonshotai-Kimi-K2", "kimi_k2"),
        ("MiniMax-M2", "minimax_m2"),
        ("ByteDance-Seed-OSS", "seed_oss"),  # writes <function=...><parameter=...> too, which is not qwen3_xml's
        ("unsloth-Apriel-1.5", ""),  # a list of calls in <tool_calls>: no parser is known to read it
        ("google-gemma-2-2b-it", ""),  # no tools at all
    ],
)
def test_the_parser_is_read_from_a_real_chat_template(template: str, parser: str) -> None:
    assert toolcalls.infer((TEMPLATES / f"{template}.jinja").read_text()) == parser


def test_a_template_without_tools_has_no_parser() -> None:
    assert not toolcalls.supports_tools(SMOLLM2)
    assert toolcalls.infer(SMOLLM2) == ""
    assert toolcalls.infer("") == ""
    # A template that mentions tools in a format no parser reads is left without one, rather than misread.
    assert toolcalls.infer("{% if tools %}Tools: {{ tools | tojson }}{% endif %}") == ""


def test_the_model_type_names_the_parser_where_templates_look_alike() -> None:
    granite4 = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()  # Granite 4 writes Hermes' <tool_call>
    assert toolcalls.infer(granite4, "granitemoehybrid") == "granite4"
    assert toolcalls.infer("", "gpt_oss") == "openai"
    assert toolcalls.infer(granite4, "qwen2") == "hermes"


def test_every_parser_inferred_is_one_vllm_knows() -> None:
    inferred = {toolcalls.infer(path.read_text()) for path in TEMPLATES.glob("*.jinja")} - {""}
    assert inferred <= toolcalls.VLLM_PARSERS
    assert len(toolcalls.VLLM_PARSERS) == 54
    # Names from older vLLMs or other projects, which vLLM 0.32 would refuse to start with.
    assert not {"qwen2_5", "gpt_oss", "phi4_mini", "smollm"} & toolcalls.VLLM_PARSERS


def test_an_unknown_parser_is_refused_naming_some_known_ones() -> None:
    assert toolcalls.check_parser("hermes") == "hermes"
    with pytest.raises(ValueError, match=r"'qwen2_5' is not a tool-call parser vLLM 0\.32 knows: e\.g\. hermes"):
        toolcalls.check_parser("qwen2_5")


def test_tokenizer_config_gives_its_template_the_tool_use_one_first() -> None:
    assert hfconfig.chat_template(json.dumps({"chat_template": SMOLLM2})) == SMOLLM2
    listed = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "<tool_call>"}]
    assert hfconfig.chat_template(json.dumps({"chat_template": listed})) == "<tool_call>"
    assert hfconfig.chat_template(json.dumps({"chat_template": [{"name": "rag", "template": "rag"}]})) == "rag"
    assert hfconfig.chat_template(json.dumps({"bos_token": "<s>"})) == ""
    assert hfconfig.chat_template("not json") == ""


@pytest.mark.parametrize(
    "runtime, parser, family, can, words",
    [
        ("vllm", "hermes", "qwen2", True, "vLLM reads them with its hermes parser"),
        ("vllm", "", "qwen2", False, "names no tool-call format"),
        ("llama.cpp", "llama3_json", "llama", True, "chat template, with --jinja"),
        ("llama.cpp", "", "llama", False, "names no tool-call format"),
        ("ollama", "mistral", "mistral", True, "chat template"),
        ("transformers", "hermes", "qwen2", True, "Qwen and Gemma 4 models only"),
        ("transformers", "llama3_json", "llama", False, "Qwen and Gemma 4 models only"),
    ],
)
def test_whether_a_session_calls_tools_depends_on_the_runtime(
    runtime: str, parser: str, family: str, can: bool, words: str
) -> None:
    found = toolcalls.session_tool_calls(runtime, parser, family)
    assert found.can is can
    assert words in found.text
    assert found.text.startswith("Calls tools" if can else "No tool calls")
