"""Occupied-band detection against the standard 802.11 layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csi_edge import read_recording
from csi_edge.band import LAYOUTS, candidate_bands, detect_band, stream_band


def test_layouts_have_the_standard_tone_counts() -> None:
    assert {k: (len(v.tones), len(v.pilots)) for k, v in LAYOUTS.items()} == {
        "legacy-20": (52, 4),
        "ht-20": (56, 4),
        "ht-40": (114, 6),
        "vht-80": (242, 8),
    }
    assert 0 not in LAYOUTS["ht-20"].tones and 1 not in LAYOUTS["vht-80"].tones


@pytest.mark.parametrize("layout", ["ht-20", "ht-40", "vht-80"])
@pytest.mark.parametrize("which", [0, -1])
def test_synthetic_occupancy_is_found(layout: str, which: int) -> None:
    subcarriers = tuple(int(k) for k in np.fft.fftfreq(256, 1 / 256))
    target = [c for c in candidate_bands(80) if c.layout == layout][which]
    rng = np.random.default_rng(0)
    level = rng.uniform(20, 30, 256)
    for s in target.subcarriers:
        level[subcarriers.index(s)] = rng.uniform(500, 1800)
    band = detect_band(level, subcarriers, 80)
    assert (band.layout, band.centre) == (layout, target.centre)
    assert band.contrast_db > 20


def test_flat_spectrum_falls_back_to_the_full_band() -> None:
    subcarriers = tuple(int(k) for k in np.fft.fftfreq(64, 1 / 64))
    level = np.random.default_rng(1).uniform(900, 1000, 64)
    band = detect_band(level, subcarriers, 20)
    assert band.bandwidth_mhz == 20 and band.contrast_db < 10


def test_fition_sample_is_20mhz_in_an_80mhz_capture(samples: Path) -> None:
    frames = read_recording(samples / "fition/walking_user1_rm1/walking_user1_rm1_10.pcap")
    band = stream_band(frames.amplitude(), frames.info.subcarriers, 80, "nexmon")
    assert band.layout == "ht-20" and band.centre == -96  # primary 20 MHz: channel 36
    assert len(band.subcarriers) == 56 and band.data_subcarriers == 52
    # FIELD-NOTES: after fftshift, bins 4-31 and 33-60 carry signal
    shifted = sorted(s + 128 for s in band.subcarriers)
    assert shifted == [*range(4, 32), *range(33, 61)]
    assert band.contrast_db > 25


def test_zeroed_edge_bins_do_not_fool_the_detector(samples: Path) -> None:
    """The `new/` session has its three top bins at exactly 0 (the rest of the floor is ~25)."""
    frames = read_recording(samples / "fition/standup_user3_rm3/new/standup_user3_rm3_1.pcap")
    level = np.median(frames.amplitude(), axis=(0, 1))
    assert np.sum(level == 0) == 3
    band = stream_band(frames.amplitude(), frames.info.subcarriers, 80, "nexmon")
    assert (band.layout, band.centre) == ("ht-20", -96)


@pytest.mark.e2e
@pytest.mark.shared_data
def test_every_fition_file_has_the_same_56_subcarriers(shared_fition: Path) -> None:
    bands = set()
    for path in sorted(shared_fition.rglob("*.pcap")):
        frames = read_recording(path)
        band = stream_band(frames.amplitude(), frames.info.subcarriers, 80, "nexmon")
        bands.add((band.layout, band.centre, band.subcarriers))
    assert len(bands) == 1 and next(iter(bands))[:2] == ("ht-20", -96)
