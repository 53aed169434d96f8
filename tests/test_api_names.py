"""Per-AP routes take site and AP names by the one rule of csi_edge.names: names outside it
(``$SYS``, ``.``, ``..``, 65 characters, ``%``-escaped separators) are a 422 quoting the value;
every valid name, up to 64 characters, round-trips through the URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from csi_cloud.api.app import create_app
from csi_cloud.db import AP
from csi_cloud.settings import CloudSettings
from csi_edge.names import NAME_MAX_LENGTH, is_valid_name

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VALID = ["ap1", "A", "a.b-c_d", "ap..1", "9", "x" * NAME_MAX_LENGTH, "lab.2nd-floor"]
INVALID = ["$SYS", ".", "..", ".hidden", "-x", "_x", "x" * (NAME_MAX_LENGTH + 1), "a b",
           "caf\u00e9", "a+b", "a#b", "a\x85b", "a/b"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("cloud")
    settings = CloudSettings(broker=None, dev=True, token=TOKEN, db=f"sqlite:///{tmp}/db.sqlite",
                             models=ROOT / "models", recordings=tmp / "rec", jobs_dir=tmp / "jobs")
    with TestClient(create_app(settings)) as c:
        yield c


def _segment(name: str) -> str:
    """A path segment for ``name``: percent-encoded, dots too (clients drop a literal ``.``
    or ``..`` segment before sending, as RFC 3986 says)."""
    return quote(name, safe="").replace(".", "%2E")


def _url(site: str, ap: str, tail: str = "") -> str:
    return f"/api/v1/aps/{_segment(site)}/{_segment(ap)}{tail}"


def test_the_lists_are_what_the_rule_says() -> None:
    assert all(is_valid_name(n) for n in VALID)
    assert not any(is_valid_name(n) for n in INVALID)


def test_valid_names_round_trip(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    with service.db.session() as session:
        for name in VALID:
            session.add(AP(site=name, ap=name, first_seen=1.0, last_seen=2.0))
        session.commit()
    for name in VALID:
        r = client.get(_url(name, name))
        assert r.status_code == 200, (name, r.text)
        assert (r.json()["site"], r.json()["ap"]) == (name, name)
        r = client.get(_url(name, name, "/prediction"))
        assert r.status_code == 200 and r.json() is None
        # Known name, no segment yet: 404 from the route, not a validation error.
        r = client.get(_url(name, name, "/csi"))
        assert r.status_code == 404 and f"no segment from {name}/{name}" in r.json()["detail"]


@pytest.mark.parametrize("name", [n for n in INVALID if n != "a/b"])
@pytest.mark.parametrize("tail", ["", "/prediction", "/csi"])
def test_invalid_names_are_422_naming_the_value(client: TestClient, name: str,
                                                tail: str) -> None:
    for site, ap, what in ((name, "ap1", "site"), ("lab", name, "ap")):
        r = client.get(_url(site, ap, tail))
        assert r.status_code == 422, (site, ap, r.text)
        messages = [e["msg"] for e in r.json()["detail"]]
        shown = repr(name if len(name) <= 80 else name[:80] + "…")
        assert any(f"{what} {shown} is not a valid name" in m for m in messages), messages


@pytest.mark.parametrize("name", ["$SYS", "..", "x" * 65])
def test_rate_commands_to_invalid_names_are_422_after_auth(client: TestClient,
                                                            name: str) -> None:
    r = client.post(_url("lab", name, "/rate"), json={"level": 1})
    assert r.status_code == 401  # the token first
    r = client.post(_url("lab", name, "/rate"), json={"level": 1}, headers=AUTH)
    assert r.status_code == 422 and "is not a valid name" in r.text


def test_a_slash_in_a_name_matches_no_route(client: TestClient) -> None:
    """``%2F`` decodes to a path separator before routing: a different path, so 404."""
    assert client.get(_url("lab", "a/b")).status_code == 404


@pytest.mark.parametrize("name", ["$SYS", "..", "x" * 65])
def test_labels_for_invalid_names_are_422(client: TestClient, name: str) -> None:
    r = client.post("/api/v1/labels", headers=AUTH,
                    json={"site": "lab", "ap": name, "start": 1, "end": 2, "activity": "walk"})
    assert r.status_code == 422 and "is not a valid name" in r.text, r.text
