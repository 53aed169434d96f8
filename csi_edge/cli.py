"""Edge-side commands of the ``csi`` CLI (no torch, no web server)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ._errors import CSIError

# Plain help: Rich markup would print `<bool>` after every flag and swallow the bracketed
# defaults of the help texts ("[models]" is a markup tag to Rich).
HELP_STYLE: dict[str, Any] = {"rich_markup_mode": None}

app = typer.Typer(add_completion=False, no_args_is_help=True, **HELP_STYLE)

MODEL_HELP = ("a bundle folder, or the name of a bundle in the models folder (./models, the "
              "checkout's or the installed ones)")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def model_option(prefix: str = "", default: str | None = None) -> Any:
    """``--model``, the same in every command: a bundle folder or a bundle name."""
    shown = f" [{default}]" if default else ""
    return typer.Option("--model", help=f"{prefix}{MODEL_HELP}{shown}", show_default=False)


def resolve_model_option(value: str | Path, models: Path | None = None) -> Path:
    """The bundle folder of a ``--model`` value, or a one-line error."""
    from .locations import BundleNotFoundError, resolve_model

    try:
        return resolve_model(value, models)
    except BundleNotFoundError as exc:
        raise fail(str(exc)) from None


def settings_error(exc: Exception) -> str:
    """A pydantic ValidationError on one line: ``field: message; field: message``."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "settings"
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


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
    from .convert import convert as convert_recording

    if out.is_dir():
        raise fail(f"-o {out} is a folder, not a file")
    if out.exists() and not force:
        raise fail(f"{out} exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise fail(f"-o {out}: the folder {out.parent} does not exist")
    try:
        summary = convert_recording(src, out, keep_phase=phase)
    except CSIError as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:  # h5py's own message quotes its flags; the reason is enough here
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise fail(f"-o {out}: cannot write it ({reason})") from None
    typer.echo(json.dumps(summary, indent=2, default=str))


def _stream_option(value: str) -> dict[str, str]:
    site_ap, sep, source = value.partition("=")
    site, slash, ap = site_ap.partition("/")
    if not (sep and slash and site and ap and source):
        raise typer.BadParameter(f"{value!r} is not SITE/AP=SOURCE")
    return {"site": site, "ap": ap, "source": source}


@app.command()
def edge(
    model: Annotated[str | None, model_option(default="fition")] = None,
    source: Annotated[str | None, typer.Option(
        help="nexmon-udp://HOST:PORT, file:///PATH (file or folder), "
             "esp32-serial:///dev/ttyUSB0?baud=921600, or stdin")] = None,
    broker: Annotated[str | None, typer.Option(
        help="mqtt[s]://[user:pass@]host:port [mqtt://127.0.0.1:1883]")] = None,
    site: Annotated[str | None, typer.Option(help="site name (topic level)")] = None,
    ap: Annotated[str | None, typer.Option(help="access point name (topic level)")] = None,
    stream: Annotated[list[str] | None, typer.Option(
        help="another stream as SITE/AP=SOURCE (repeatable): many APs in one process")] = None,
    level: Annotated[int | None, typer.Option(help="rate level at start, 0..3 [1]")] = None,
    presence_only: Annotated[bool | None, typer.Option(
        "--presence-only", help="no bundle: send motion scores only (presence and motion in "
                                "the cloud, no activity)", show_default=False)] = None,
    speed: Annotated[str | None, typer.Option(
        help="file replay speed: real, max, or a factor [real]")] = None,
    loop: Annotated[bool | None, typer.Option(
        "--loop/--no-loop", help="file replay: start again at the end")] = None,
    timestamps: Annotated[str | None, typer.Option(
        help="file replay: now (shift capture times to now) or recorded [now]")] = None,
    prefix: Annotated[str | None, typer.Option(help="topic prefix [csi/v1]")] = None,
    spool_dir: Annotated[Path | None, typer.Option(help="on-disk queue folder [spool]")] = None,
    spool_max_segments: Annotated[int | None, typer.Option(
        help="queue bound in segments; the oldest are dropped beyond it [86400]")] = None,
    cloud_url: Annotated[str | None, typer.Option(
        help="cloud base URL for model downloads")] = None,
    status_heartbeat_s: Annotated[float | None, typer.Option(
        "--status-heartbeat", "--status-interval",
        help="longest time between two status messages; otherwise a status goes out only "
             "when it changes [300]")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML or JSON settings file (CSI_EDGE_* variables and options win)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Run the edge agent: stream CSI, compress it, publish it over MQTT (store-and-forward).

    Settings come from the options, then CSI_EDGE_* environment variables, then --config.
    """
    import logging

    from pydantic import ValidationError

    from .agent import run_edge
    from .settings import load_settings

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides: dict[str, object] = {
            "model": None if model is None else resolve_model_option(model),
            "source": source, "broker": broker, "site": site, "ap": ap,
            "level": level, "presence_only": presence_only, "speed": speed, "loop": loop,
            "timestamps": timestamps,
            "prefix": prefix, "spool_dir": spool_dir, "spool_max_segments": spool_max_segments,
            "cloud_url": cloud_url, "status_heartbeat_s": status_heartbeat_s,
        }
        if stream:
            overrides["streams"] = [_stream_option(v) for v in stream]
        settings = load_settings(config, **overrides)
        settings.all_streams()
        settings.broker_address()
    except ValidationError as exc:
        raise fail(f"bad settings: {settings_error(exc)}") from None
    except ValueError as exc:
        raise fail(f"bad settings: {exc}") from None
    try:
        code = run_edge(settings)
    except CSIError as exc:
        raise fail(str(exc)) from exc
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console entry for an edge-only install
    app(prog_name="csi")


if __name__ == "__main__":  # pragma: no cover
    main()
