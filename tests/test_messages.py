"""Bounded JSON for status and ctl messages: every bad input is one domain error."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_edge.messages import MAX_MESSAGE_DEPTH, BadMessageError, loads_bounded


def test_ordinary_messages_parse() -> None:
    assert loads_bounded(b'{"online": true, "counters": {"a": [1, 2]}}') == {
        "online": True, "counters": {"a": [1, 2]}}
    assert loads_bounded('{"s": "[[[[{{{{"}') == {"s": "[[[[{{{{"}  # brackets inside strings
    assert loads_bounded(b'{"s": "a\\"[[[["}') == {"s": 'a"[[[['}


@pytest.mark.parametrize(("data", "problem"), [
    (b"[" * 2000, "nested 2000 deep"),
    (b"x" * 20_000, "20000 bytes"),
    (b'{"a": ', "not JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"1" * 5000, "not JSON"),  # past Python's int digit limit
])
def test_bad_messages_are_one_error_quoting_them(data: bytes, problem: str) -> None:
    with pytest.raises(BadMessageError) as info:
        loads_bounded(data)
    assert problem in str(info.value)
    assert repr(data[:10])[2:-1] in str(info.value)


def test_depth_limit_is_inclusive() -> None:
    ok = "[" * MAX_MESSAGE_DEPTH + "]" * MAX_MESSAGE_DEPTH
    assert loads_bounded(ok) is not None
    with pytest.raises(BadMessageError):
        loads_bounded("[" + ok + "]")


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_the_domain_error(data: bytes) -> None:
    with contextlib.suppress(BadMessageError):
        loads_bounded(data, max_depth=4)
