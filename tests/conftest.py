"""Shared fixtures: the committed samples and, where present, the full recordings in ../shared."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"
SHARED_DATA = Path(os.environ.get("CSI_SHARED_DATA", ROOT.parent / "shared" / "data"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        if IN_CI:
            pytest.fail(f"CI=true but the shared recordings are missing: {path}")
        pytest.skip(f"needs the full recordings at {path} (absent on this machine)")
    return path


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def shared_fition() -> Path:
    return _shared("fition")


@pytest.fixture(scope="session")
def shared_wiar() -> Path:
    return _shared("wiar/height_90")


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real Mosquitto on a free port, persistent, restartable (``broker.stop()/start()``)."""
    from _broker import Mosquitto, mosquitto_binary

    if mosquitto_binary() is None:
        if IN_CI:
            pytest.fail("CI=true but mosquitto is not installed")
        pytest.skip("needs the mosquitto binary")
    with Mosquitto(tmp_path / "broker") as mosquitto:
        yield mosquitto


def _needs_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        reason = (f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)")
        if IN_CI:
            pytest.fail(f"CI=true but the browser test {reason}")
        pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[Any]:
    """A real headless Chromium (Debian chromium + chromedriver) driven by selenium."""
    _needs_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1150", "--lang=en-GB"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
