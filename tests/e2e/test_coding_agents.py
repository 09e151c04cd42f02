"""The coding agents themselves against the portal, set up as docs/chat.md tells researchers to (scripts/agent-clients
installs the pinned releases from the npm registry): Claude Code speaks Anthropic's Messages API, Codex CLI OpenAI's
Responses API, each non-interactively, through the portal as uvicorn serves it, to a session on the local cluster.

Claude Code sends its tools on every turn, so it is pointed at the session whose llama.cpp binary is the stand-in that
calls tools (tool_model_server.py): it gets a tool call for its first tool, runs it (its own check refuses the made-up
input), sends the result back and ends with the stand-in's answer, two Messages requests in all. Codex CLI asks
SmolLM2-135M-Instruct itself, in llama-server, through the Responses API with its full system prompt."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from jobs.models import ApiToken, LLMSession, ProxyRequest
from tests.e2e.test_agent_api import recorded
from tests.e2e.test_real_model import launch_smollm2

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "agent-clients"


@pytest.fixture(scope="module")
def agents() -> dict[str, str]:
    """The paths of the claude and codex commands (installed once, then reused)."""
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    claude, codex = done.stdout.split()
    return {"claude": claude, "codex": codex}


def agent_env(home: Path, **settings: str) -> dict[str, str]:
    """Only what the docs tell a researcher to set, in a home of its own (the agents keep their state there)."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), **settings}


@pytest.mark.parametrize("credential", ["ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"])
def test_claude_code_calls_a_tool_and_answers_through_the_messages_api(
    credential: str, agents: dict[str, str], portal_server: str, tool_caller: LLMSession, owner: Any, tmp_path: Path
) -> None:
    """ANTHROPIC_AUTH_TOKEN sends the token as Bearer, ANTHROPIC_API_KEY as x-api-key: both reach the session."""
    env = agent_env(
        tmp_path,
        ANTHROPIC_BASE_URL=f"{portal_server}/api",
        **{credential: ApiToken.issue(owner, "claude code")[1]},
        ANTHROPIC_MODEL="caller",
        ANTHROPIC_DEFAULT_HAIKU_MODEL="caller",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    done = subprocess.run(
        [agents["claude"], "-p", "What is the weather in Paris?", "--output-format", "json", "--max-turns", "3"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    result = json.loads(done.stdout)
    assert not result["is_error"] and result["num_turns"] == 2, result
    # The stand-in answers a tool's result by quoting it: Claude Code ran the tool and sent its result back.
    assert result["result"].startswith("The tool says: "), result
    rows = ProxyRequest.objects.filter(session=tool_caller, user=owner, endpoint="messages", status=200)
    assert recorded(rows, 2)


def test_codex_cli_answers_through_the_responses_api(
    agents: dict[str, str], portal_server: str, local_catalog: dict[str, Any], smollm2: str, owner: Any,
    tmp_path: Path, django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    # Codex's own instructions are some 4,600 tokens: SmolLM2's whole context window, not the tests' usual 2,048.
    session = launch_smollm2(owner, django_capture_on_commit_callbacks, local_catalog, alias="smol", context=8192)
    home = tmp_path / "codex"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "smol"\nmodel_provider = "hpc"\n\n[model_providers.hpc]\nname = "HPC LLM Portal"\n'
        f'base_url = "{portal_server}/api/v1"\nenv_key = "HPCLLM_API_KEY"\nwire_api = "responses"\n'
    )
    env = agent_env(tmp_path, CODEX_HOME=str(home), HPCLLM_API_KEY=ApiToken.issue(owner, "codex")[1])
    done = subprocess.run(
        [agents["codex"], "exec", "--skip-git-repo-check", "What is the capital of France? Answer in one sentence."],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert done.stdout.strip(), done.stderr[-2000:]  # SmolLM2's answer, whatever it says
    rows = ProxyRequest.objects.filter(session=session, user=owner, endpoint="responses", status=200)
    assert recorded(rows, 1)
    row = rows.get()
    assert row.tokens_reported and row.prompt_tokens > 1000 and row.completion_tokens > 0
