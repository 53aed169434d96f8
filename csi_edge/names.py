"""Names of sites and access points: one rule for the edge, the cloud, the broker ACL and the
database.

A name is 1-64 ASCII characters: letters, digits, ``_``, ``-`` and ``.``, starting with a letter
or a digit. Everything that carries a name accepts exactly these and nothing else:

- an MQTT topic level (no separators or wildcards; no leading ``$``, so never ``$SYS``);
- a path component on disk (spool, recordings: never ``.``, ``..`` or hidden);
- a URL path segment (``/api/v1/aps/{site}/{ap}``) without escaping;
- a ``VARCHAR(64)`` column on every database (ASCII: characters are bytes);
- a Mosquitto ACL line, and a NATS subject token once MQTT's ``.`` mapping is applied.
"""

from __future__ import annotations

import re

__all__ = ["NAME_MAX_LENGTH", "InvalidNameError", "check_name", "is_valid_name"]

NAME_MAX_LENGTH = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_LENGTH - 1}}}")


class InvalidNameError(ValueError):
    """A site, AP or topic-prefix name outside the rule; the message quotes it."""

    def __init__(self, value: object, what: str) -> None:
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "…"
        super().__init__(
            f"{what} {shown!r} is not a valid name (1-{NAME_MAX_LENGTH} ASCII letters, digits, "
            "'_', '-' or '.', starting with a letter or digit)")
        self.value = value
        self.what = what


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str) -> str:
    """``value`` if it follows the rule, else :class:`InvalidNameError` naming it."""
    if not is_valid_name(value):
        raise InvalidNameError(value, what)
    assert isinstance(value, str)
    return value
