"""Writing and loading model bundles (cloud side, torch).

``update()`` freezes the entropy model after training: the symbol statistics of the training
segments become the integer count tables in ``bundle.json``. ``save_bundle`` writes the int8
edge encoder, the cloud weights (``.npz``, loaded without unpickling) and the manifest, and
derives the bundle id from them.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csi_edge.bundle import (
    Bundle,
    BundleManifest,
    FileEntry,
    RateLevel,
    write_manifest,
)
from csi_edge.entropy import EntropyTable
from csi_edge.preprocess import InputSpec

from .context_head import ContextHead
from .data import SegmentData
from .export import export_edge_encoder
from .network import CSICodecNet, ModelConfig
from .quantizers import FSQ

__all__ = ["CLOUD_FILE", "EDGE_FILE", "activation_refusal", "cloud_arrays", "held_out_accuracy",
           "load_network", "save_bundle", "update", "write_cloud"]

EDGE_FILE = "edge.onnx"
CLOUD_FILE = "cloud.npz"


@torch.no_grad()
def training_codes(net: CSICodecNet, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Latent symbols (M, G, T) and full profile codes (M, P * Kmax) of segments
    (M, L, A, S)."""
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
                              g, net.code_quantizer.alphabet)
    p = net.cfg.profile_blocks
    blocks = profile.reshape(m, p, -1)  # (M, P, K)
    k = blocks.shape[2]
    r = net.cfg.profile_range
    profile_table = EntropyTable.fit("profile", (blocks + r).reshape(-1),
                                     np.tile(np.arange(k), m * p), k, 2 * r + 1)
    tables = {"latent": latent, "profile": profile_table}
    if p > 1:  # later blocks go as differences to the block before (csi_edge.bundle)
        delta = np.diff(blocks, axis=1) + 2 * r
        tables["profile_delta"] = EntropyTable.fit(
            "profile_delta", delta.reshape(-1), np.tile(np.arange(k), m * (p - 1)), k,
            4 * r + 1)
    return tables


def cloud_arrays(net: CSICodecNet) -> dict[str, np.ndarray]:
    """What ``cloud.npz`` holds: the network's weights and, where it has one, the context
    head's arrays (``head.*``)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    if net.context_head is not None:
        arrays.update(net.context_head.arrays())
    return arrays


def write_cloud(net: CSICodecNet, path: Path) -> FileEntry:
    """Write ``cloud.npz`` (compressed, no pickle) and return its manifest entry."""
    with path.open("wb") as fh:
        # numpy's stub lets any **key stand for allow_pickle: bool; the keys are weight names.
        # (Passing allow_pickle would save an array of that name on a numpy 1.x.)
        np.savez_compressed(fh, **cloud_arrays(net))  # type: ignore[arg-type]
    return _sha(path)


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
    quantizer = net.code_quantizer
    folder.mkdir(parents=True, exist_ok=True)
    export_edge_encoder(net, calibration, folder / EDGE_FILE)
    write_cloud(net, folder / CLOUD_FILE)
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
        model=cfg.stored(),
        quantizer={"kind": cfg.quantizer, "alphabet": quantizer.alphabet,
                   "half": quantizer.half_width if isinstance(quantizer, FSQ) else 0,
                   "groups": quantizer.groups, "latent_steps": cfg.latent_steps()},
        levels=levels,
        profile_range=cfg.profile_range,
        entropy={k: v.to_dict() for k, v in tables.items()},
        labels={"activity": list(activities), "identity": list(identities) if identities else None},
        files={"edge": _sha(folder / EDGE_FILE), "cloud": _sha(folder / CLOUD_FILE)},
        training=training,
        metrics=metrics or {},
        calibration=extra_calibration or {},
    )
    return write_manifest(folder, manifest).manifest


def load_network(folder: str | Path | Bundle,
                 verify: bool = True) -> tuple[BundleManifest, CSICodecNet]:
    """The bundle's manifest and its torch network (weights from the .npz, no pickle); a
    loaded :class:`Bundle` is used as it is (its manifest is not read again)."""
    bundle = Bundle.load(folder, verify=verify)
    manifest = bundle.manifest
    net = CSICodecNet(ModelConfig.model_validate(manifest.model))
    with np.load(bundle.file("cloud"), allow_pickle=False) as arrays:
        state, head = ContextHead.split_arrays({k: arrays[k] for k in arrays.files})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    net.context_head = ContextHead.from_arrays(head)
    net.eval()
    return manifest, net


def held_out_accuracy(manifest: BundleManifest) -> tuple[float, float] | None:
    """(bundle, parent) mean activity accuracy over levels on the same held-out recordings,
    where the bundle's metrics hold such a comparison (a few-shot adaptation does: before is
    the parent on the recordings the adaptation never saw, after is the bundle)."""
    adaptation = manifest.metrics.get("adaptation") or {}
    after, before = adaptation.get("activity_accuracy_after"), adaptation.get(
        "activity_accuracy_before")
    if not after or not before or adaptation.get("held_out_accuracy") is False:
        return None
    return float(np.mean(after)), float(np.mean(before))


def activation_refusal(manifest: BundleManifest) -> str | None:
    """Why activating this bundle needs ``force``, or None.

    Refused: a bundle whose reported accuracy was measured on its own training recordings
    (``held_out`` false), and one whose held-out accuracy is below its parent's on the same
    recordings."""
    if manifest.held_out is False:
        return (f"bundle {manifest.name!r} was scored on its own training recordings "
                "(held_out false): its accuracy on new recordings is unknown")
    compared = held_out_accuracy(manifest)
    if compared is not None and compared[0] < compared[1]:
        return (f"bundle {manifest.name!r} scores {compared[0]:.3f} activity accuracy on "
                f"held-out recordings, below its parent's {compared[1]:.3f} on the same ones")
    return None
