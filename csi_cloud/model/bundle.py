"""Writing and loading model bundles (cloud side, torch).

``update()`` freezes the entropy model after training: the symbol statistics of the training
segments become the integer count tables in ``bundle.json``. ``save_bundle`` writes the int8
edge encoder, the cloud weights (``.npz``, loaded without unpickling) and the manifest, and
derives the bundle id from them.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csi_edge.bundle import (
    BundleManifest,
    FileEntry,
    RateLevel,
    bundle_id,
    load_manifest,
)
from csi_edge.entropy import EntropyTable
from csi_edge.preprocess import InputSpec

from .data import SegmentData
from .export import export_edge_encoder
from .network import CSICodecNet, ModelConfig
from .quantizers import FSQ

__all__ = ["CLOUD_FILE", "EDGE_FILE", "load_network", "save_bundle", "update"]

EDGE_FILE = "edge.onnx"
CLOUD_FILE = "cloud.npz"


@torch.no_grad()
def training_codes(net: CSICodecNet, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Latent symbols (M, G, T) and full profile codes (M, Kmax) of segments (M, L, A, S)."""
    net.eval()
    symbols, profiles = [], []
    top = net.cfg.levels - 1
    for i in range(0, len(x), batch):
        z, profile = net.encoder(torch.from_numpy(x[i : i + batch]))
        symbols.append(net.quantize(z).symbols.numpy())
        profiles.append(net.profile_codes(profile, top).numpy())
    return np.concatenate(symbols), np.concatenate(profiles)


def update(net: CSICodecNet, data: SegmentData, recordings: np.ndarray) -> dict[str, EntropyTable]:
    """Fit the static entropy tables on the training recordings' codes (frozen afterwards)."""
    rows = np.isin(data.recording, recordings)
    symbols, profile = training_codes(net, data.x[rows])
    m, g, t = symbols.shape
    latent = EntropyTable.fit("latent", symbols.reshape(-1), np.tile(np.repeat(np.arange(g), t), m),
                              g, net.quantizer.alphabet)
    k = profile.shape[1]
    r = net.cfg.profile_range
    profile_table = EntropyTable.fit("profile", (profile + r).reshape(-1),
                                     np.tile(np.arange(k), m), k, 2 * r + 1)
    return {"latent": latent, "profile": profile_table}


def _state_arrays(net: CSICodecNet) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def _sha(path: Path) -> FileEntry:
    data = path.read_bytes()
    return FileEntry(path=path.name, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def save_bundle(folder: Path, *, name: str, net: CSICodecNet, spec: InputSpec,
                tables: dict[str, EntropyTable], activities: list[str],
                identities: list[str] | None, calibration: np.ndarray,
                segments_per_message: tuple[int, ...], training: dict[str, Any],
                metrics: dict[str, Any] | None = None,
                extra_calibration: dict[str, Any] | None = None) -> BundleManifest:
    """Write ``folder/{bundle.json, edge.onnx, cloud.npz}``; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    export_edge_encoder(net, calibration, folder / EDGE_FILE)
    arrays = _state_arrays(net)
    with (folder / CLOUD_FILE).open("wb") as fh:
        np.savez_compressed(fh, **arrays)
    cfg = net.cfg
    levels = [
        RateLevel(level=i, groups=cfg.level_channels[i] // net.group_size,
                  profile_components=cfg.profile_components[i],
                  segments_per_message=segments_per_message[i])
        for i in range(cfg.levels)
    ]
    manifest = BundleManifest(
        id="0" * 64,
        name=name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        input_spec=spec,
        model=cfg.model_dump(mode="json"),
        quantizer={"kind": cfg.quantizer, "alphabet": net.quantizer.alphabet,
                   "half": net.quantizer.half if isinstance(net.quantizer, FSQ) else 0,
                   "groups": net.quantizer.groups, "latent_steps": cfg.latent_steps()},
        levels=levels,
        profile_range=cfg.profile_range,
        entropy={k: v.to_dict() for k, v in tables.items()},
        labels={"activity": list(activities), "identity": list(identities) if identities else None},
        files={"edge": _sha(folder / EDGE_FILE), "cloud": _sha(folder / CLOUD_FILE)},
        training=training,
        metrics=metrics or {},
        calibration=extra_calibration or {},
    )
    manifest.id = bundle_id(manifest)
    (folder / "bundle.json").write_text(
        json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def load_network(folder: Path, verify: bool = True) -> tuple[BundleManifest, CSICodecNet]:
    """The bundle's manifest and its torch network (weights from the .npz, no pickle)."""
    manifest = load_manifest(folder, verify=verify)
    net = CSICodecNet(ModelConfig.model_validate(manifest.model))
    with np.load(folder / manifest.files["cloud"].path, allow_pickle=False) as arrays:
        state = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    net.load_state_dict(state)
    net.eval()
    return manifest, net
