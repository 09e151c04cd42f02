"""The researcher's whole flow in a real browser (Playwright driving Debian's Chromium, headless) against a live
portal, a real Celery worker and the local cluster: sign in, wizard, estimate, launch, running, cancel, ended.
Screenshots of every step go to var/test-artifacts/browser/; with PORTAL_UPDATE_SCREENSHOTS=1 the README's two
(the wizard, the chat) are taken again into docs/img/."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import Browser, Locator, Page, expect

from jobs.models import ChatMessage, Conversation, LLMSession
from portal import ssh
from tests.conftest import REPO
from tests.e2e.sessions import cancel_all_jobs, local_account
from tests.e2e.test_worker import worker_env
from tests.worker import PortalServer, Worker

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
ARTIFACTS = REPO / "var" / "test-artifacts" / "browser"
README_IMAGES = REPO / "docs" / "img"
PASSWORD = "a long demo password"


@pytest.fixture
def portal(local_catalog: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    """uvicorn (ASGI, streaming as in production) and a Celery worker with beat, on the test database."""
    user = get_user_model().objects.create_user("researcher", "r@example.edu", PASSWORD)
    local_account(user, local_catalog)
    worker = Worker(worker_env(), tmp_path / "worker.log")
    worker.start()
    server = PortalServer(worker_env(), tmp_path / "uvicorn.log")
    yield server.start()
    server.stop()
    worker.stop()
    cancel_all_jobs()
    ssh.pool.close_all()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def readme_shot(page: Page, name: str, top: Locator | None = None) -> None:
    """The README's picture of this step (docs/img/NAME.png), only with PORTAL_UPDATE_SCREENSHOTS=1 so that a normal
    run changes no tracked file: one screen (not the whole page) at a narrower window, scrolled to `top` (else the top
    of the page), so that the PNG stays small."""
    if os.environ.get("PORTAL_UPDATE_SCREENSHOTS") != "1":
        return
    size = page.viewport_size
    page.set_viewport_size({"width": 1024, "height": 720})
    if top is None:
        page.evaluate("window.scrollTo(0, 0)")
    else:
        top.evaluate("element => element.scrollIntoView({block: 'start'})")
    README_IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(README_IMAGES / f"{name}.png"))
    if size is not None:
        page.set_viewport_size(size)


def sign_in(page: Page, url: str) -> None:
    page.goto(f"{url}/sessions/")
    page.get_by_label("Username").fill("researcher")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="My sessions")).to_be_visible()


def test_sign_in_launch_run_and_cancel_with_javascript(browser: Browser, portal: str, smollm2: str) -> None:
    """With the real model: its answer is checked for what it says."""
    shutil.rmtree(ARTIFACTS / "js", ignore_errors=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, portal)
    shot(page, "js/1-signed-in-empty")
    expect(page.get_by_text("No sessions yet")).to_be_visible()

    page.get_by_role("link", name="Launch", exact=True).click()
    page.get_by_label("Model", exact=True).select_option(smollm2)
    heading = page.locator("#estimate-h")
    expect(heading).to_contain_text("GPU memory")
    shot(page, "js/2-estimate")
    kv_before = page.locator(".legend li", has_text="KV cache").inner_text()
    page.locator("#id_context").fill("1024")
    expect(page.locator(".legend li", has_text="KV cache")).not_to_have_text(kv_before)
    shot(page, "js/3-estimate-shorter-context")
    # Back to the model's whole context: the long reply below has room to be stopped mid-stream.
    page.locator("#id_context").fill("4096")
    expect(page.locator(".legend li", has_text="KV cache")).to_have_text(kv_before)

    recommended = page.locator("tr.recommended")
    expect(recommended).to_contain_text("Recommended")
    shot(page, "js/4-options")
    readme_shot(page, "wizard", top=page.locator("#estimate-h"))
    recommended.get_by_role("button", name="Launch").click()
    expect(page.get_by_role("heading", name="My sessions")).to_be_visible()
    card = page.locator("li.session").first
    expect(card.locator(".badge")).to_have_attribute("data-state", re.compile("pending|submitting|queued|starting"))
    shot(page, "js/5-submitted")
    expect(card.locator(".badge")).to_have_attribute("data-state", "running", timeout=60_000)
    shot(page, "js/6-running")
    assert LLMSession.objects.count() == 1

    # Chat: streamed reply with its timings, Stop, and the conversation is still there after a reload.
    card.get_by_role("link", name="Open chat").click()
    page.get_by_role("button", name="New chat").click()
    # Greedy sampling: at the default 0.7 the 135M model sometimes names another town.
    page.get_by_text("System prompt and sampling").click()
    page.locator("#id_temperature").fill("0")
    page.locator("#id_message").fill("What is the capital of France? Answer in one sentence.")
    page.locator("#id_message").press("Enter")
    reply = page.locator("li.msg-assistant").last
    expect(reply.locator(".stats")).to_contain_text("tokens", timeout=30_000)
    expect(reply.locator(".stats")).to_contain_text("first token")
    expect(reply).to_contain_text("Paris")
    shot(page, "js/7-chat")
    readme_shot(page, "chat")
    page.locator("#id_temperature").fill("0.7")
    page.locator("#id_max_tokens").fill("100000")
    page.locator("#id_message").fill("Write a story of three thousand words about a computer cluster.")
    page.locator("#id_message").press("Enter")
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled(timeout=30_000)
    page.reload()
    expect(page.locator("li.msg-user")).to_have_count(2)
    expect(page.locator("li.msg-assistant")).to_have_count(2)
    exported = page.request.get(portal + (page.get_by_role("link", name="Export JSON").get_attribute("href") or ""))
    assert [m["role"] for m in exported.json()["messages"]] == ["user", "assistant", "user", "assistant"]
    shot(page, "js/8-chat-after-reload")
    # Code blocks in a reply get a Copy button that copies the code, and the raw text stays the conversation's history.
    conversation = Conversation.objects.get()
    ChatMessage.objects.create(
        conversation=conversation, role="assistant", content="Try:\n\n```python\nprint('hi')\n```"
    )
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.reload()
    code = page.locator("li.msg-assistant").last.locator("pre")
    code.get_by_role("button", name="Copy this code").click()
    expect(code.get_by_role("button", name="Copy this code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"
    assert page.locator("li.msg-assistant").last.get_attribute("data-raw") == "Try:\n\n```python\nprint('hi')\n```"
    shot(page, "js/8b-code-copy")
    page.goto(f"{portal}/sessions/")
    card = page.locator("li.session").first

    card.get_by_role("button", name="Cancel").click()
    expect(card.locator(".badge")).to_have_attribute("data-state", "cancelled", timeout=60_000)
    expect(card).to_contain_text("Cancelled: cancelled from the portal")
    shot(page, "js/9-cancelled")


def test_the_same_flow_works_without_javascript(browser: Browser, portal: str) -> None:
    context = browser.new_context(java_script_enabled=False, viewport={"width": 390, "height": 844})  # phone width
    page = context.new_page()
    sign_in(page, portal)
    page.goto(f"{portal}/launch/")
    page.get_by_label("Model", exact=True).select_option("tiny-llama")
    page.get_by_role("button", name="Update estimate and options").click()
    expect(page.locator("#estimate-h")).to_contain_text("GPU memory")
    shot(page, "nojs/1-estimate")
    page.locator("tr.recommended").get_by_role("button", name="Launch").click()
    expect(page.get_by_role("heading", name="My sessions")).to_be_visible()
    card = page.locator("li.session").first
    for _ in range(60):
        if card.locator(".badge").get_attribute("data-state") == "running":
            break
        page.wait_for_timeout(1000)
        page.reload()
        card = page.locator("li.session").first
    expect(card.locator(".badge")).to_have_attribute("data-state", "running")
    shot(page, "nojs/2-running")
    card.get_by_role("button", name="Cancel").click()  # a plain POST; no confirmation without JavaScript
    expect(page.get_by_text("Cancelling: the job is being stopped.")).to_be_visible()  # the POST's redirect landed
    for _ in range(60):
        page.reload()
        if page.locator("li.session .badge").first.get_attribute("data-state") == "cancelled":
            break
        page.wait_for_timeout(1000)
    expect(page.locator("li.session .badge").first).to_have_attribute("data-state", "cancelled")
    shot(page, "nojs/3-cancelled")
    context.close()
