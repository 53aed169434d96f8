"""Every bundle in the models folder, loaded and looked up by id or by the payload's prefix.

The cloud serves all of them at once so edges on an older model keep working during a rollout;
one of them is *active*: the one announced to edges. Bundles added to the folder (a finished
training job) are picked up by :meth:`ModelRegistry.refresh`.

Bundles derived in the cloud (an enrolled identity, a few-shot adaptation) share their
parent's edge part and wire id: payloads name the *family*, and the family member that
decodes and classifies them is the one :meth:`ModelRegistry.serve` chose (the active bundle
when it belongs to the family), else the family's root.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from csi_edge.bundle import MANIFEST_FILE, Bundle, BundleError, BundleManifest

from .model.compression import CloudModel

__all__ = ["ModelRegistry", "UnknownModelError"]

log = logging.getLogger("csi_cloud.registry")


class UnknownModelError(KeyError):
    """No served bundle has this id (or id prefix)."""


class ModelRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._scan = threading.Lock()  # one refresh at a time (API and job threads)
        self._by_id: dict[str, CloudModel] = {}
        self._folders: dict[str, Path] = {}
        self._by_prefix: dict[bytes, list[CloudModel]] = {}
        self._serving: dict[bytes, CloudModel] = {}
        self.problems: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> list[str]:
        """Load bundles not loaded yet; return the new ids. A broken bundle is skipped."""
        with self._scan:
            return self._refresh()

    def _refresh(self) -> list[str]:
        added: list[str] = []
        if not self.folder.is_dir():
            return added
        for folder in sorted(p for p in self.folder.iterdir() if (p / MANIFEST_FILE).is_file()):
            if folder in self._folders.values():
                continue
            try:
                bundle = Bundle.load(folder)
                manifest = bundle.manifest
                if manifest.id in self._by_id:
                    continue
                model = CloudModel.load(bundle)
                family = self._by_prefix.get(model.model_id, [])
                clash = next((m for m in family
                              if m.manifest.wire_id != manifest.wire_id), None)
                if clash is not None:
                    raise BundleError(f"id prefix {model.model_id.hex()} is already used by "
                                      f"{clash.manifest.name} ({clash.id[:12]}…)")
            except (BundleError, OSError, ValueError, KeyError, RuntimeError) as exc:
                if str(folder) not in self.problems:
                    log.warning("bundle %s skipped: %s", folder, exc)
                self.problems[str(folder)] = str(exc)
                continue
            with self._lock:
                self._by_id[manifest.id] = model
                self._folders[manifest.id] = folder
                self._by_prefix.setdefault(model.model_id, []).append(model)
            added.append(manifest.id)
        return added

    def __len__(self) -> int:
        return len(self._by_id)

    def ids(self) -> list[str]:
        return list(self._by_id)

    def manifests(self) -> list[BundleManifest]:
        return [m.manifest for m in self._by_id.values()]

    def get(self, model_id: str) -> CloudModel:
        """By full id, a unique id prefix (>= 6 hex characters) or bundle name."""
        if model_id in self._by_id:
            return self._by_id[model_id]
        matches = [m for i, m in self._by_id.items()
                   if (len(model_id) >= 6 and i.startswith(model_id))
                   or m.manifest.name == model_id]
        if len(matches) != 1:
            raise UnknownModelError(model_id)
        return matches[0]

    def folder_of(self, model_id: str) -> Path:
        return self._folders[self.get(model_id).id]

    def by_prefix(self, prefix: bytes) -> CloudModel | None:
        """The bundle that handles payloads carrying this wire id prefix."""
        chosen = self._serving.get(prefix)
        if chosen is not None:
            return chosen
        family = self._by_prefix.get(prefix)
        if not family:
            return None
        roots = [m for m in family if m.manifest.edge_id is None]
        return (roots or family)[0]

    def serve(self, model_id: str) -> CloudModel:
        """Let this bundle handle its family's payloads (the active bundle does)."""
        model = self.get(model_id)
        with self._lock:
            self._serving[model.model_id] = model
        return model

    def family(self, model_id: str) -> list[CloudModel]:
        """Every served bundle that shares this bundle's edge part."""
        return list(self._by_prefix.get(self.get(model_id).model_id, []))

    def same_edge(self, a: str, b: str) -> bool:
        """Whether two bundles share an edge part (an AP on ``a`` need not switch for ``b``)."""
        try:
            return self.get(a).manifest.wire_id == self.get(b).manifest.wire_id
        except KeyError:
            return False
