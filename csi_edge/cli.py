"""Edge-side commands of the ``csi`` CLI (no torch, no web server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._errors import CSIError

app = typer.Typer(add_completion=False, no_args_is_help=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def inspect(
    paths: Annotated[list[Path], typer.Argument(help="recording files or folders", exists=True)],
) -> None:
    """Print a JSON summary of recordings (frames, rate, usable subcarriers, band, drops).

    A folder is searched recursively; several files print a JSON list.
    """
    from .inspect import summarize, summarize_many

    try:
        if len(paths) == 1 and paths[0].is_file():
            typer.echo(json.dumps(summarize(paths[0]), indent=2))
            return
        summaries = summarize_many(paths)
    except CSIError as exc:
        raise fail(str(exc)) from exc
    typer.echo(json.dumps(summaries, indent=2))
    if any("error" in s for s in summaries):
        raise typer.Exit(1)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="recording in any supported format", exists=True,
                                        dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="HDF5 recording to write")],
    phase: Annotated[bool, typer.Option(help="keep the phase next to the amplitude")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing output file")] = False,
) -> None:
    """Convert a recording (pcap, .dat, ESP32 CSV, NTU-Fi .mat) into a project HDF5 recording."""
    from .recording import convert as convert_recording

    if out.exists() and not force:
        raise fail(f"{out} exists (use --force to overwrite)")
    try:
        summary = convert_recording(src, out, keep_phase=phase)
    except CSIError as exc:
        raise fail(str(exc)) from exc
    typer.echo(json.dumps(summary, indent=2, default=str))


def main() -> None:  # pragma: no cover - console entry for an edge-only install
    app(prog_name="csi")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
