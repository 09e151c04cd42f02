"""The chat with a model service in Chromium, without a cluster: the service has no replica ready, so the portal's
own route answers the first question 503 with Retry-After, which the page shows as "try again in N s" with the
question back in the box and nothing kept; then the browser stands in for a replica (Playwright answers the page's
request), and the reply streams and is kept. Every request names its conversation (X-Conversation)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.urls import reverse
from playwright.sync_api import Browser, Request, Route, expect

from catalog.models import ClusterAccount
from jobs.models import Conversation, ModelService
from tests.browser.test_pages import signed_in
from tests.browser.test_tool_calls import TEXT_STREAM, portal  # noqa: F401 -- portal: a fixture
from tests.conftest import LAUNCH

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_service_starting_says_when_to_try_again_then_its_reply_is_kept(
    browser: Browser,
    portal: str,  # noqa: F811 -- the fixture imported above
    account: ClusterAccount,
    owner: Any,
) -> None:
    service = ModelService.objects.create(name="llama-lab", owner=owner, launch=LAUNCH, min_replicas=0)
    conversation = Conversation.objects.create(service=service, owner=owner)
    sent: list[Request] = []

    def replica(route: Route) -> None:
        sent.append(route.request)
        if len(sent) == 1:
            route.continue_()  # to the portal: no replica ready
        else:
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=TEXT_STREAM)

    context = signed_in(browser, portal, "ada", 1280)
    page = context.new_page()
    page.route("**/services/llama-lab/v1/chat/completions", replica)
    page.goto(reverse("jobs:service", args=["llama-lab"]))
    page.get_by_role("link", name="Chat", exact=True).click()

    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator("#chat-notice")).to_have_text(re.compile(r"The model is starting: try again in about \d+ s\."))
    expect(page.get_by_label("Message")).to_have_value("Hello")
    expect(page.locator("#messages > li")).to_have_count(0)

    page.get_by_role("button", name="Send", exact=True).click()
    reply = page.locator("#messages > li.msg-assistant").last
    expect(reply).to_have_attribute("data-id", re.compile(r"^\d+$"))  # saved
    expect(reply).to_contain_text("No tools were run.")
    expect(page.locator("#chat-notice")).to_be_hidden()
    assert [r.header_value("x-conversation") for r in sent] == [str(conversation.pk)] * 2
    assert [m.content for m in conversation.messages.all()] == ["Hello", "No tools were run."]
    context.close()
