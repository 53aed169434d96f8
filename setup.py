"""Build hook: the shipped bundles and sample recordings go into the wheel.

They live at the top of the checkout (``models/``, ``datasets/samples/``), outside the
packages; a wheel gets copies under ``csi_edge/_bundled/`` so that ``pip install .`` followed
by ``csi demo`` works (csi_edge.locations finds them). Editable installs use the checkout's.
Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithBundledData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "csi_edge" / "_bundled"
        models = ROOT / "models"
        # Only folders that are bundles (a local models/ may hold fetched or partial ones).
        for manifest in sorted(models.glob("*/bundle.json")):
            if not manifest.parent.name.startswith("."):
                shutil.copytree(manifest.parent, target / "models" / manifest.parent.name,
                                dirs_exist_ok=True)
        samples = ROOT / "datasets" / "samples"
        if samples.is_dir():
            shutil.copytree(samples, target / "samples", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildWithBundledData})
