"""Chat rendering and storage: Markdown to HTML, sanitised with nh3 so model output can never run script."""

from __future__ import annotations

from typing import Any

import markdown
import nh3

# What Markdown produces for prose, lists, tables and code; no attributes but links (made safe by nh3) and code
# language classes. Script, style, event handlers and javascript: URLs never pass.
ALLOWED_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "code": {"class"}}


def render_markdown(text: str) -> str:
    html = markdown.markdown(text, extensions=["fenced_code", "tables"], output_format="html")
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def messages_for_api(system_prompt: str, history: list[Any]) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [{"role": m.role, "content": m.content} for m in history]
