"""Small synthetic ESP32 CSI for the default test run: a multipath channel with noise, a moving
reflector while someone "moves", written as ESPectre ``.npz`` recordings in either buffer
layout (the real ESPectre files are GPLv3 and stay in ../shared/data)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

__all__ = ["HT20", "channel", "espectre_buffers", "write_espectre"]

HT20 = np.array([k for k in range(-28, 29) if k != 0])  # occupied subcarriers
FFT_ORDER = np.array([*range(0, 32), *range(-32, 0)])  # column -> subcarrier


def channel(n: int, rate_hz: float, *, moving: tuple[float, float] | None = None,
            seed: int = 0, gain_jitter_db: float = 0.0, snr_db: float = 28.0,
            level: float = 40.0) -> np.ndarray:
    """(n, 64) complex CSI in FFT order (columns :data:`FFT_ORDER`): three static paths, a
    reflector that moves (delay sweeping at walking speed) during ``moving`` = (start, end)
    seconds, white noise at ``snr_db``, and optionally a per-frame gain (AGC) jitter."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate_hz
    k = FFT_ORDER.astype(np.float64)
    spacing = 312.5e3
    delays = rng.uniform(10e-9, 120e-9, 3)
    gains = rng.uniform(0.3, 1.0, 3) * np.exp(2j * np.pi * rng.uniform(size=3))
    static = (gains[None, :] * np.exp(-2j * np.pi * k[:, None] * spacing * delays[None, :])
              ).sum(axis=1)
    h = np.broadcast_to(static, (n, 64)).astype(np.complex128)
    if moving is not None:
        on = (t >= moving[0]) & (t < moving[1])
        # A body at 1-2 m/s changes the reflected path's length by metres per second.
        path = 30e-9 + 8e-9 * np.sin(2 * np.pi * 0.7 * t) + 4e-9 * np.sin(2 * np.pi * 1.9 * t)
        moving_path = 0.45 * np.exp(-2j * np.pi * k[None, :] * spacing * path[:, None]) \
            * np.exp(2j * np.pi * 2.0 * t)[:, None]
        h = h + moving_path * on[:, None]
    scale = level / np.sqrt(np.mean(np.abs(static) ** 2))
    h = h * scale
    noise = (rng.normal(size=h.shape) + 1j * rng.normal(size=h.shape)) * \
        level * 10 ** (-snr_db / 20) / np.sqrt(2)
    h = h + noise
    if gain_jitter_db:
        h = h * 10 ** (rng.normal(0, gain_jitter_db, n) / 20)[:, None]
    h[:, ~np.isin(FFT_ORDER, HT20)] = 0  # guard tones and DC
    return h


def espectre_buffers(csi: np.ndarray, layout: str, *, garbage_first_word: bool = False
                     ) -> np.ndarray:
    """(n, 128) int8 buffers, (imaginary, real) per subcarrier: ``"fft"`` order (classic ESP32)
    or ``"ascending"`` (C5/C6: -32..31, the 57 measured subcarriers padded with zeros)."""
    columns = csi if layout == "fft" else np.roll(csi, 32, axis=1)  # FFT -> -32..31
    columns = columns.copy()
    if garbage_first_word:  # the original ESP32's invalid first four bytes
        columns[:, 0] = 126 + 0j
        columns[:, 1] = 10 + 0j
    re = np.clip(np.rint(columns.real), -128, 127)
    im = np.clip(np.rint(columns.imag), -128, 127)
    return np.stack([im, re], axis=-1).reshape(len(csi), 128).astype(np.int8)


def write_espectre(path: Path, csi: np.ndarray, *, chip: str = "esp32",
                   duration_ms: float | None = None, rate_hz: float = 100.0,
                   label: str = "movement", gain_locked: bool = False,
                   collected_at: str = "2026-03-10T23:39:28.052728", **extra: object) -> Path:
    """An ESPectre ``.npz`` (its keys and types) holding ``csi`` in the chip's layout."""
    layout = "fft" if chip in ("esp32", "s3", "c3", "s2") else "ascending"
    n = len(csi)
    path.parent.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {
        "csi_data": espectre_buffers(csi, layout, garbage_first_word=chip == "esp32"),
        "num_subcarriers": 64,
        "label": label,
        "chip": chip,
        "collected_at": collected_at,
        "duration_ms": duration_ms if duration_ms is not None else (n - 1) / rate_hz * 1000,
        "format_version": "1.0",
        "gain_locked": gain_locked,
        **extra,
    }
    with path.open("wb") as fh:
        np.savez_compressed(fh, **values)  # type: ignore[arg-type]
    return path


def collected_epoch(collected_at: str) -> float:
    return datetime.fromisoformat(collected_at).replace(tzinfo=UTC).timestamp()
