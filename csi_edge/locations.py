"""Where the shipped bundles and sample recordings are, and what a ``--model`` value names.

In a source checkout they are the checkout's ``models/`` and ``datasets/samples/``; an
installed package (``pip install .``, not editable) carries copies under
``csi_edge/_bundled/`` (setup.py puts them there when the wheel is built). A ``models/``
folder in the working directory comes first, as it always did.

``--model`` means the same in every command: a bundle folder, or the name of a bundle in the
models folder (``--models`` where a command has it, else :func:`models_dir`).
"""

from __future__ import annotations

from pathlib import Path

from ._errors import CSIError

__all__ = ["BundleNotFoundError", "models_dir", "resolve_model", "samples_dir"]

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
# An installed package's parent is site-packages, where a "datasets" may be another project's.
_IN_CHECKOUT = (_CHECKOUT / "pyproject.toml").is_file()
_BUNDLED = _PACKAGE / "_bundled"


class BundleNotFoundError(CSIError):
    """A ``--model`` value that is neither a bundle folder nor a bundle name."""


def models_dir() -> Path:
    """``./models`` when there is one, else the checkout's or the installed bundles."""
    for candidate in (Path("models"), _CHECKOUT / "models", _BUNDLED / "models"):
        if candidate.is_dir() and (_IN_CHECKOUT or candidate.parent != _CHECKOUT):
            return candidate
    return Path("models")


def samples_dir() -> Path:
    """The sample recordings (one sub-folder per dataset) of the checkout or the install."""
    candidates = [_CHECKOUT / "datasets" / "samples"] if _IN_CHECKOUT else []
    for candidate in [*candidates, _BUNDLED / "samples"]:
        if candidate.is_dir():
            return candidate
    return _BUNDLED / "samples"


def resolve_model(value: str | Path, models: Path | None = None) -> Path:
    """The bundle folder a ``--model`` value names: the folder itself when it holds a
    ``bundle.json``, else ``MODELS/value`` (``models`` or :func:`models_dir`)."""
    path = Path(value)
    if (path / "bundle.json").is_file():
        return path
    root = models if models is not None else models_dir()
    named = root / str(value)
    if path.name == str(value) and (named / "bundle.json").is_file():
        return named
    known = sorted(p.parent.name for p in root.glob("*/bundle.json")) if root.is_dir() else []
    raise BundleNotFoundError(
        f"--model {str(value)!r} is neither a bundle folder nor a bundle in {root} "
        f"({', '.join(known) if known else 'none there'})")
