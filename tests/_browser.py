"""What a page in the test browser logged that must not happen."""

from __future__ import annotations

from typing import Any


def page_errors(browser: Any) -> list[dict[str, Any]]:
    """The browser log's Content Security Policy violations and uncaught script errors."""
    return [e for e in browser.get_log("browser")
            if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
