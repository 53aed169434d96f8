"""Which subcarriers carry signal: standard 802.11 tone layouts and energy-based detection.

A receiver tuned wider than the transmitted frame (Fition: 80 MHz receiver, 20 MHz frames)
reports every FFT bin, but only the bins of the transmitted channel carry signal; the rest is
noise floor. :func:`detect_band` compares per-bin energy against every standard layout that
fits in the receiver bandwidth and picks the one that matches the occupied bins best.

Some hardware reports columns that hold no valid measurement although they lie inside the
transmitted band (ESP32: the buffer's first four bytes, ``first_word_invalid``). A reader
names them in ``info.extra["first_word_invalid_subcarriers"]``; :func:`frames_band` leaves
them out of the detection and of the band (``Band.excluded``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .frames import CSIFrames

__all__ = [
    "LAYOUTS",
    "Band",
    "ToneLayout",
    "candidate_bands",
    "declared_band",
    "detect_band",
    "frames_band",
    "invalid_subcarriers",
    "stream_band",
]


@dataclass(frozen=True, slots=True)
class ToneLayout:
    """Data and pilot subcarrier numbers of one channel width, relative to its own centre."""

    name: str
    bandwidth_mhz: int
    data: tuple[int, ...]
    pilots: tuple[int, ...]

    @property
    def tones(self) -> tuple[int, ...]:
        return tuple(sorted(self.data + self.pilots))


def _layout(
    name: str, bandwidth: int, edge: int, inner: int, pilots: tuple[int, ...]
) -> ToneLayout:
    tones = [k for k in range(-edge, edge + 1) if abs(k) >= inner]
    pilot_set = {p for q in pilots for p in (q, -q)}
    return ToneLayout(
        name=name,
        bandwidth_mhz=bandwidth,
        data=tuple(k for k in tones if k not in pilot_set),
        pilots=tuple(sorted(pilot_set)),
    )


# IEEE 802.11-2020: 11a/g (Table 17-5), HT20/VHT20 (19.3.11.10), HT40/VHT40, VHT80 (21.3.10.10).
LAYOUTS: dict[str, ToneLayout] = {
    layout.name: layout
    for layout in (
        _layout("legacy-20", 20, 26, 1, (7, 21)),
        _layout("ht-20", 20, 28, 1, (7, 21)),
        _layout("ht-40", 40, 58, 2, (11, 25, 53)),
        _layout("vht-80", 80, 122, 2, (11, 39, 75, 103)),
    )
}
_BINS_PER_20MHZ = 64


@dataclass(frozen=True, slots=True)
class Band:
    """The occupied part of a receiver's subcarriers."""

    layout: str  # a LAYOUTS key, or a declared name for pre-grouped formats ("intel5300-20")
    bandwidth_mhz: int  # width of the transmitted channel
    centre: int  # its centre, as a subcarrier number of the receiver
    subcarriers: tuple[int, ...]  # receiver subcarrier numbers kept, ascending
    pilots: tuple[int, ...]  # the pilot subcarriers among them
    method: str  # "energy" (detected) or "declared" (the format fixes the layout)
    contrast_db: float | None = None  # median in-band over out-of-band amplitude
    match: float | None = None  # Jaccard overlap of the occupied bins with the layout
    excluded: tuple[int, ...] = ()  # tones of the layout left out: invalid on this hardware

    @property
    def data_subcarriers(self) -> int:
        return len(self.subcarriers) - len(self.pilots)

    def describe(self) -> str:
        where = "" if self.centre == 0 else f" centred at subcarrier {self.centre:+d}"
        return f"{self.layout} ({self.bandwidth_mhz} MHz){where}"

    def as_dict(self) -> dict[str, object]:
        return {
            "layout": self.layout,
            "bandwidth_mhz": self.bandwidth_mhz,
            "centre": self.centre,
            "subcarriers": len(self.subcarriers),
            "pilots": len(self.pilots),
            "data_subcarriers": self.data_subcarriers,
            "method": self.method,
            "contrast_db": None if self.contrast_db is None else round(self.contrast_db, 1),
            "match": None if self.match is None else round(self.match, 3),
            "excluded": list(self.excluded),
            "description": self.describe(),
        }


def candidate_bands(receiver_bandwidth_mhz: int) -> list[Band]:
    """Every standard layout placed on every aligned sub-channel of the receiver's band."""
    n_bins = receiver_bandwidth_mhz // 20 * _BINS_PER_20MHZ
    out: list[Band] = []
    for layout in LAYOUTS.values():
        if layout.bandwidth_mhz > receiver_bandwidth_mhz:
            continue
        width = layout.bandwidth_mhz // 20 * _BINS_PER_20MHZ
        for start in range(-n_bins // 2, n_bins // 2, width):
            centre = start + width // 2
            out.append(
                Band(
                    layout=layout.name,
                    bandwidth_mhz=layout.bandwidth_mhz,
                    centre=centre,
                    subcarriers=tuple(centre + k for k in layout.tones),
                    pilots=tuple(centre + k for k in layout.pilots),
                    method="energy",
                )
            )
    return out


def declared_band(name: str, bandwidth_mhz: int, subcarriers: tuple[int, ...]) -> Band:
    """A band fixed by the format itself (every reported column carries signal)."""
    return Band(
        layout=name,
        bandwidth_mhz=bandwidth_mhz,
        centre=0,
        subcarriers=tuple(sorted(subcarriers)),
        pilots=(),
        method="declared",
    )


def _otsu_threshold(values: np.ndarray) -> float:
    """Split a 1-D sample into two classes by maximum between-class variance."""
    v = np.sort(values)
    n = v.size
    cumsum = np.cumsum(v)
    k = np.arange(1, n)
    w0 = k / n
    mu0 = cumsum[:-1] / k
    mu1 = (cumsum[-1] - cumsum[:-1]) / (n - k)
    between = w0 * (1 - w0) * (mu0 - mu1) ** 2
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def detect_band(
    amplitude: np.ndarray,
    subcarriers: tuple[int, ...],
    receiver_bandwidth_mhz: int,
    min_contrast_db: float = 10.0,
    invalid: Iterable[int] = (),
) -> Band:
    """Find the standard layout whose tones are the occupied bins.

    ``amplitude`` is ``(frames, antennas, subcarriers)`` or ``(subcarriers,)`` (a per-bin
    level). Bins are split into occupied / floor by Otsu on log median amplitude; the layout
    with the highest Jaccard overlap wins, ties going to the wider one. When no layout stands
    ``min_contrast_db`` above the rest, the whole receiver band is taken as occupied.
    ``invalid`` subcarriers take no part in the decision and are left out of the band.
    """
    level = amplitude if amplitude.ndim == 1 else np.median(amplitude, axis=(0, 1))
    level = np.asarray(level, dtype=np.float64)
    bad = {int(s) for s in invalid}
    keep = [i for i, s in enumerate(subcarriers) if int(s) not in bad]
    band = _detect(level[keep], tuple(subcarriers[i] for i in keep), receiver_bandwidth_mhz,
                   min_contrast_db, bad)
    return _without(band, bad) if bad else band


def _without(band: Band, bad: set[int]) -> Band:
    """The band less the invalid subcarriers (named in ``excluded``)."""
    return replace(band, subcarriers=tuple(s for s in band.subcarriers if s not in bad),
                   pilots=tuple(s for s in band.pilots if s not in bad),
                   excluded=tuple(sorted(s for s in bad if s in band.subcarriers)))


def _detect(
    level: np.ndarray,
    subcarriers: tuple[int, ...],
    receiver_bandwidth_mhz: int,
    min_contrast_db: float,
    missing_ok: set[int],
) -> Band:
    """:func:`detect_band` on the valid columns; layouts may lack the ``missing_ok`` tones."""
    column_of = {int(s): i for i, s in enumerate(subcarriers)}
    log_level = np.log10(np.maximum(level, 1e-6))
    # Bins that are exactly zero are nulls the hardware zeroed, not noise floor: leaving them in
    # would make the split "zero versus everything else" (seen in some Fition sessions).
    nonzero = level > 0
    threshold = _otsu_threshold(log_level[nonzero]) if nonzero.sum() > 2 else np.inf
    upper, lower = log_level[nonzero & (log_level > threshold)], \
        log_level[nonzero & (log_level <= threshold)]
    if upper.size and lower.size and 20 * (np.median(upper) - np.median(lower)) < \
            min_contrast_db and (~nonzero).any():
        # The hardware zeroed the unused bins (ESP32) and the rest is one band whose level
        # merely slopes: Otsu would cut the band itself in two.
        threshold = -np.inf if nonzero.all() else float(log_level[nonzero].min()) - 1
    occupied = set(int(subcarriers[i]) for i in np.flatnonzero(nonzero & (log_level > threshold)))

    best: Band | None = None
    best_key: tuple[float, int] = (-1.0, 0)
    for cand in candidate_bands(receiver_bandwidth_mhz):
        tones = set(cand.subcarriers) - missing_ok
        if not tones <= column_of.keys():
            continue
        match = len(tones & occupied) / len(tones | occupied)
        key = (round(match, 6), cand.bandwidth_mhz)
        if key > best_key:
            best, best_key = cand, key
    if best is None:
        raise ValueError(
            f"no standard layout fits {len(subcarriers)} subcarriers at "
            f"{receiver_bandwidth_mhz} MHz"
        )
    inside = np.array([column_of[s] for s in best.subcarriers if s in column_of])
    outside = np.setdiff1d(np.arange(level.size), inside)
    contrast = (
        20 * np.log10(np.median(level[inside]) / max(np.median(level[outside]), 1e-6))
        if outside.size
        else float("inf")
    )
    band = Band(**{**_fields(best), "contrast_db": float(contrast), "match": best_key[0]})
    if contrast < min_contrast_db:
        # Nothing stands out: treat the receiver's full layout as occupied.
        full = [c for c in candidate_bands(receiver_bandwidth_mhz)
                if c.bandwidth_mhz == receiver_bandwidth_mhz
                and set(c.subcarriers) - missing_ok <= column_of.keys()]
        if full:
            f = full[-1]
            band = Band(**{**_fields(f), "contrast_db": float(contrast), "match": None})
    return band


def _fields(band: Band) -> dict[str, Any]:
    return {name: getattr(band, name) for name in Band.__slots__}


def stream_band(amplitude: np.ndarray, subcarriers: tuple[int, ...], bandwidth_mhz: int | None,
                device: str, invalid: Iterable[int] = ()) -> Band:
    """The occupied band of a stream: detected where the source reports every FFT bin of its
    receiver bandwidth (Nexmon, ESP32), declared where it reports a fixed subset that all
    carries signal (Intel 5300 grouping, NTU-Fi's 114 tones). ``invalid`` subcarriers (a
    hardware limitation, see :func:`invalid_subcarriers`) are never part of the band."""
    if bandwidth_mhz and len(subcarriers) == bandwidth_mhz // 20 * _BINS_PER_20MHZ:
        return detect_band(amplitude, subcarriers, bandwidth_mhz, invalid=invalid)
    return declared_band(f"{device}-{bandwidth_mhz or '?'}mhz-grouped", bandwidth_mhz or 0,
                         subcarriers)


def invalid_subcarriers(frames: CSIFrames) -> tuple[int, ...]:
    """Subcarriers whose values the hardware marks unreliable (the ESP32's first word)."""
    named = frames.info.extra.get("first_word_invalid_subcarriers") or ()
    if not isinstance(named, list | tuple):
        return ()
    return tuple(int(s) for s in named if isinstance(s, int | np.integer))


def frames_band(frames: CSIFrames) -> Band:
    """:func:`stream_band` of a stream, its invalid subcarriers left out."""
    return stream_band(frames.amplitude(), frames.info.subcarriers, frames.info.bandwidth_mhz,
                       frames.info.device, invalid=invalid_subcarriers(frames))
