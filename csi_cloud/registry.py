"""Every bundle in the models folder, loaded and looked up by id or by the payload's prefix.

The cloud serves all of them at once so edges on an older model keep working during a rollout;
one of them is *active*: the one announced to edges. Bundles added to the folder (a finished
training job) are picked up by :meth:`ModelRegistry.refresh`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from csi_edge.bundle import BundleError, BundleManifest, load_manifest

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
        self._by_prefix: dict[bytes, CloudModel] = {}
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
        for folder in sorted(p for p in self.folder.iterdir() if (p / "bundle.json").is_file()):
            if folder in self._folders.values():
                continue
            try:
                manifest = load_manifest(folder)
                if manifest.id in self._by_id:
                    continue
                model = CloudModel.load(folder, verify=False)
                clash = self._by_prefix.get(model.model_id)
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
                self._by_prefix[model.model_id] = model
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
        return self._by_prefix.get(prefix)
