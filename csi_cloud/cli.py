"""The ``csi`` command: edge tools plus the service side (datasets, and later training,
evaluation and the service). Heavy imports stay inside the commands so ``csi`` starts fast
and the edge commands work on an install without the cloud extra."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from csi_edge._errors import CSIError
from csi_edge.cli import HELP_STYLE, fail, model_option, resolve_model_option
from csi_edge.cli import app as edge_app

if TYPE_CHECKING:
    from .datasets import DatasetSpec
    from .model.train import EpochLog

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    **HELP_STYLE,
    help="csi-pipeline: WiFi CSI sensing with compressed streaming from access points.",
)
for command in edge_app.registered_commands:
    app.registered_commands.append(command)

datasets_app = typer.Typer(add_completion=False, no_args_is_help=True, **HELP_STYLE,
                           help="Named datasets: what they hold and how they split.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("list")
def datasets_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the registered datasets."""
    from .datasets import get_dataset, list_datasets

    specs = [get_dataset(name) for name in list_datasets()]
    if as_json:
        typer.echo(json.dumps([_spec_dict(s) for s in specs], indent=2))
        return
    for spec in specs:
        typer.echo(f"{spec.name:16s} {spec.title}: {spec.format}, labels: {spec.label_key}")


@datasets_app.command("summary")
def datasets_summary(
    name: Annotated[str, typer.Argument(help="dataset name (see `csi datasets list`)")],
    data: Annotated[Path, typer.Option("--data", help="folder holding the dataset",
                                       exists=True, file_okay=False)],
    seed: Annotated[int, typer.Option(help="seed of the train/val/test split")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Count recordings per class and per split (splits are by recording, seeded, stratified)."""
    from .datasets import summarize

    try:
        summary = summarize(name, data, seed=seed)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


models_app = typer.Typer(add_completion=False, no_args_is_help=True, **HELP_STYLE,
                         help="Trained model bundles.")
app.add_typer(models_app, name="models")


@app.command("train")
def train_command(
    dataset: Annotated[str, typer.Option(help="registered dataset name")],
    data: Annotated[Path, typer.Option(help="folder holding the dataset", exists=True,
                                       file_okay=False)],
    out: Annotated[Path, typer.Option(help="bundle folder to write, e.g. models/NAME")],
    epochs: Annotated[int, typer.Option(min=1, help="maximum epochs")] = 60,
    seed: Annotated[int, typer.Option(help="seed of the split and the training")] = 0,
    batch: Annotated[int, typer.Option(help="context windows per batch")] = 32,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-3,
    patience: Annotated[int, typer.Option(help="early stopping patience (epochs)")] = 15,
    recon_weight: Annotated[float, typer.Option(help="reconstruction loss weight")] = 1.0,
    activity_weight: Annotated[float, typer.Option(help="activity loss weight")] = 1.0,
    identity_weight: Annotated[float, typer.Option(help="identity loss weight")] = 0.5,
    quantizer_weight: Annotated[float, typer.Option(help="quantizer loss weight")] = 1.0,
    quantizer: Annotated[str, typer.Option(help="fsq (default) or vq")] = "fsq",
    threads: Annotated[int, typer.Option(help="torch threads")] = 2,
    segment_dropout: Annotated[float, typer.Option(
        help="train for lost segments: hide up to this share of each context window's "
             "segments from the classifier (a rate drawn per window in [0, P)); 0 = off")] = 0.0,
    protocols: Annotated[str, typer.Option(
        help="also run these protocols for the report: random (k-fold by recording), "
             "cross-session (Fition); comma-separated, empty for none")] = "",
    folds: Annotated[int, typer.Option(help="folds of the random protocol")] = 5,
    protocol_seeds: Annotated[int, typer.Option(help="seeds per protocol")] = 1,
    level0: Annotated[str, typer.Option(
        metavar="LATENT,PROFILE",
        help="what rate level 0 sends: latent channels and profile coefficients, e.g. 1,12 "
             "(the other levels as by default; stored in the bundle's model config) "
             "[the design's: 0,16]")] = "",
    profile_blocks: Annotated[int, typer.Option(
        min=1, help="profiles each segment sends: its frames cut into this many equal blocks, "
                    "each block's mean coded (must divide the segment's frames; stored in the "
                    "bundle's model config)")] = 1,
    head_complete: Annotated[bool, typer.Option(
        "--head-complete", help="give each level's classifier a layer of its own for windows "
                                "whose whole context is present (docs/model.md, \"Complete "
                                "windows\": it helps WiAR, not Fition)")] = False,
) -> None:
    """Train a bundle: split by recording, train with early stopping, freeze the entropy
    tables, export the int8 edge encoder, evaluate the held-out recordings, write report.md."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .model.pipeline import train_bundle
    from .model.train import TrainOptions

    if not 0.0 <= segment_dropout < 1.0:
        raise fail(f"--segment-dropout must be in [0, 1), not {segment_dropout}")
    opts = TrainOptions(epochs=epochs, seed=seed, batch=batch, lr=lr, patience=patience,
                        recon_weight=recon_weight, activity_weight=activity_weight,
                        identity_weight=identity_weight, quantizer_weight=quantizer_weight,
                        threads=threads, segment_dropout=segment_dropout,
                        head_complete=head_complete)
    if quantizer not in ("fsq", "vq"):
        raise fail(f"--quantizer must be fsq or vq, not {quantizer!r}")
    from .model.network import ModelConfig

    try:
        latent, profile = (int(v) for v in level0.split(",")) if level0 else (-1, -1)
        layout = ModelConfig.level0(latent, profile) if level0 else {}
    except ValueError as exc:
        raise fail(f"--level0 {level0!r}: {exc}" if "level 0" in str(exc) else
                   f"--level0 {level0!r} is not LATENT,PROFILE (two whole numbers)") from exc
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("", total=epochs)

        def progress(log: EpochLog) -> None:
            bar.update(task, advance=1, description=(
                f"epoch {log.epoch} loss {log.loss:.3f} val activity {log.val_activity:.3f}"))

        try:
            manifest, evaluation = train_bundle(
                dataset, data, out, opts,
                model={"quantizer": quantizer, **layout,
                       **({"profile_blocks": profile_blocks} if profile_blocks > 1 else {})},
                progress=progress,
                protocols=[p for p in protocols.split(",") if p] or None,
                protocol_folds=folds, protocol_seeds=protocol_seeds,
                log=lambda line: bar.console.print(line))
        except (CSIError, KeyError, ValueError) as exc:
            raise fail(str(exc)) from exc
    typer.echo(json.dumps({"bundle": str(out), "id": manifest.id,
                           "test_split": evaluation.summary}, indent=2))


@app.command("calibrate")
def calibrate_command(
    model: Annotated[str, model_option("the bundle to calibrate (rewritten in place): ")],
    dataset: Annotated[str, typer.Option(help="registered dataset name")],
    data: Annotated[Path, typer.Option(help="folder holding the dataset", exists=True,
                                       file_okay=False)],
    recordings: Annotated[str, typer.Option(
        help="val: the validation recordings of the split the bundle was trained with "
             "(rebuilt from its manifest); folder: every recording of --data, which must be "
             "recordings the bundle was not trained on")] = "val",
    target: Annotated[float, typer.Option(
        min=0.01, max=1.0, help="accuracy the answered seconds must reach on them (sets the "
                                "abstention threshold)")] = 0.8,
) -> None:
    """Fit the live-output calibration of a bundle on recordings it was not trained on: the
    activity temperature, the context lengths the live output reads (each with its
    temperature), the smoothing filter's self-transition and the abstention threshold
    (calibration.activity in bundle.json; the bundle id changes)."""
    import numpy as np

    from csi_edge.bundle import Bundle

    from .model.trust import calibrate_folder, split_recordings

    if recordings not in ("val", "folder"):
        raise fail(f"--recordings must be val or folder, not {recordings!r}")
    try:
        bundle = Bundle.load(resolve_model_option(model))  # read once, handed down
        if recordings == "val":
            segments, fitted_on = split_recordings(bundle, dataset, data, "val")
        else:
            from .model.robustness import load_folder

            segments = load_folder(bundle, dataset, data)
            fitted_on = (f"every recording of {data.name} ({dataset}), given as recordings the "
                         "bundle was not trained on")
        activity = calibrate_folder(bundle, segments, np.arange(len(segments)),
                                    fitted_on=fitted_on, target=target)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    typer.echo(json.dumps(activity, indent=2))


@app.command("evaluate")
def evaluate_command(
    model: Annotated[str, model_option()],
    dataset: Annotated[str, typer.Option(help="registered dataset name")],
    data: Annotated[Path, typer.Option(help="folder in that dataset's layout", exists=True,
                                       file_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    segment_loss: Annotated[str | None, typer.Option(
        help="instead of the rate table: accuracy when each segment is lost with these "
             "probabilities, comma-separated in [0, 1), e.g. 0,0.1,0.3,0.5")] = None,
    draws: Annotated[int, typer.Option(help="random loss draws per rate (--segment-loss)",
                                       min=1)] = 10,
    seed: Annotated[int, typer.Option(help="seed of the loss draws (--segment-loss) and of "
                                           "the split (--open-set)")] = 0,
    open_set: Annotated[bool, typer.Option(
        "--open-set", help="instead of the rate table: leave-one-user-out open-set identity "
                           "(AUROC for the left-out person, closed-set accuracy on the others)")
                        ] = False,
    epochs: Annotated[int, typer.Option(min=1, max=1000,
                                        help="classifier epochs per left-out user (--open-set)")
                      ] = 40,
    level: Annotated[int, typer.Option(min=0, max=3, help="rate level (--open-set)")] = 1,
    protocol: Annotated[str, typer.Option(
        help="folder: every recording of --data, per rate level (default); few-shot: --data "
             "is a new setting, K labelled recordings per activity (--shots) adapt the "
             "bundle and the rest test it, next to the anchors on the same K")] = "folder",
    shots: Annotated[str, typer.Option(help="K values (--protocol few-shot), e.g. 1,3,5")
                     ] = "1,3,5",
    source: Annotated[Path | None, typer.Option(
        help="source recordings (same dataset kind) the anchors also train on "
             "(--protocol few-shot)", exists=True, file_okay=False)] = None,
    anchors: Annotated[bool, typer.Option(
        "--anchors/--no-anchors", help="also train the anchors (aeon, scikit-learn) on the "
                                       "same K (--protocol few-shot)")] = True,
) -> None:
    """Evaluate a bundle on every recording of a folder, per rate level, through real payloads.

    With --segment-loss, report accuracy under random segment loss instead (the window ends at
    the last segment that arrived; lost slots are masked): mean and std over --draws. With
    --protocol few-shot, how well the bundle learns the folder's setting from K labelled
    recordings per activity (--draws support draws)."""
    bundle = resolve_model_option(model)
    if protocol not in ("folder", "few-shot"):
        raise fail(f"--protocol must be folder or few-shot, not {protocol!r}")
    if protocol == "few-shot":
        if segment_loss is not None or open_set:
            raise fail("--protocol few-shot takes neither --segment-loss nor --open-set")
        _evaluate_few_shot(bundle, dataset, data, shots, draws, source, anchors, as_json)
        return
    if segment_loss is not None and open_set:
        raise fail("choose one of --segment-loss and --open-set")
    if segment_loss is not None:
        _evaluate_segment_loss(bundle, dataset, data, segment_loss, draws, seed, as_json)
        return
    if open_set:
        _evaluate_open_set(bundle, dataset, data, seed, epochs, level, as_json)
        return
    from .model.pipeline import evaluate_folder

    try:
        evaluation = evaluate_folder(bundle, dataset, data)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    summary = evaluation.summary
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['name']} on {summary['dataset']}: "
                        f"{summary['examples']} recordings")
    # Per recording, then per second as the service shows it: the full window, the live
    # reading (a prediction's `activity`) and the smoothed label (dashboard and events).
    columns = {"level": "level", "payload_bytes_per_s": "payload bytes per s",
               "compression_ratio": "compression ratio",
               "activity_accuracy": "activity per recording",
               "activity_accuracy_per_second": "per second, full window",
               "activity_accuracy_live_per_second": "per second, live",
               "activity_accuracy_smoothed_per_second": "per second, smoothed",
               "activity_macro_f1": "activity macro f1", "identity_accuracy": "identity",
               "nmse_db": "nmse db", "encoder_ms_per_segment": "encoder ms per segment"}
    for title in columns.values():
        table.add_column(title, justify="right")
    for row in [{**summary["unquantized"], "level": "unquantized"}, *summary["levels"]]:
        table.add_row(*("-" if row.get(k) is None else
                        f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                        for k in columns))
    Console().print(table)


def _evaluate_few_shot(bundle: Path, dataset: str, data: Path, shots_text: str, draws: int,
                       source: Path | None, anchors: bool, as_json: bool) -> None:
    """The --protocol few-shot variant of ``csi evaluate``."""
    try:
        shots = [int(s) for s in shots_text.split(",") if s.strip()]
    except ValueError:
        raise fail(f"--shots must be comma-separated integers, not {shots_text!r}") from None
    if not shots or min(shots) < 1:
        raise fail(f"--shots must be integers >= 1, not {shots_text!r}")
    import torch

    from .model.fewshot import few_shot_folder

    torch.set_num_threads(2)
    try:
        result = few_shot_folder(bundle, dataset, data, shots, draws, source_dir=source,
                                 anchors=anchors, log=None if as_json else typer.echo)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['name']} on {dataset} ({result['target_recordings']} "
                        f"recordings): few-shot, {draws} draw(s), activity accuracy mean "
                        "per recording / per second")
    table.add_column("method")
    for k in shots:
        table.add_column(f"K={k}", justify="right")
    methods = sorted({m for r in result["results"].values() for m in r})
    for method in methods:
        cells = []
        for k in shots:
            row = result["results"][str(k)].get(method)
            if row is None:
                cells.append("-")
                continue
            key = ("level0_activity_accuracy" if method.startswith("ours")
                   else "activity_accuracy")
            cells.append(f"{row[key]['mean']:.3f} / {row[key + '_per_second']['mean']:.3f}")
        table.add_row(method + (" (level 0)" if method.startswith("ours") else ""), *cells)
    Console().print(table)
    for k, names in result["untested_activities"].items():
        if names:
            typer.echo(f"K={k}: {', '.join(names)} have at most {k} recording(s) here: all "
                       "in the support, none tested")
    typer.echo(result["note"])


def _evaluate_open_set(bundle: Path, dataset: str, data: Path, seed: int, epochs: int,
                       level: int, as_json: bool) -> None:
    """The --open-set variant of ``csi evaluate``."""
    import torch

    from .model.adapt import open_set_folder

    torch.set_num_threads(2)
    try:
        result = open_set_folder(bundle, dataset, data, seed=seed, epochs=epochs, level=level,
                                 log=None if as_json else typer.echo)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['name']} on {dataset}: leave one user out, level {level}")
    keys = ("auroc", "auroc_max_probability", "unknown_detected", "known_rejected",
            "closed_set_identity_accuracy")
    table.add_column("left out")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for user, row in [*result["per_user"].items(), ("mean", result["mean"])]:
        table.add_row(user, *(f"{row[k]:.3f}" for k in keys))
    Console().print(table)
    typer.echo(result["note"])


def _evaluate_segment_loss(bundle: Path, dataset: str, data: Path, rates_text: str, draws: int,
                           seed: int, as_json: bool) -> None:
    """The --segment-loss variant of ``csi evaluate``."""
    from .model.robustness import parse_rates

    try:
        rates = parse_rates(rates_text)
    except ValueError as exc:
        raise fail(f"--segment-loss: {exc}") from exc
    import numpy as np

    from csi_edge.bundle import EdgeEncoder

    from .model.compression import CloudModel
    from .model.robustness import evaluate_segment_loss, load_folder

    try:
        segments = load_folder(bundle, dataset, data)
        result = evaluate_segment_loss(CloudModel.load(bundle), EdgeEncoder(bundle), segments,
                                       np.arange(len(segments)), rates, draws=draws, seed=seed)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    result = {"dataset": dataset, **result}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['name']} on {dataset}: {result['examples']} recordings, "
                        f"i.i.d. segment loss, {draws} draws (mean ± std)")
    for key in ("level", "loss", "activity", "±", "per segment", "identity", "± ",
                "missing", "unanswered"):
        table.add_column(key, justify="right")

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for level in result["levels"]:
        for row in level["rates"]:
            table.add_row(str(level["level"]), f"{row['rate']:.2f}",
                          num(row["activity_accuracy"]), num(row["activity_accuracy_std"]),
                          num(row["activity_accuracy_per_segment"]),
                          num(row["identity_accuracy"]), num(row["identity_accuracy_std"]),
                          num(row["missing_fraction"]), num(row["unanswered"]))
    Console().print(table)


@models_app.command("list")
def models_list(
    root: Annotated[Path, typer.Option(help="folder of bundles")] = Path("models"),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the bundles under a folder."""
    from csi_edge.bundle import BundleError, load_manifest

    rows: list[dict[str, Any]] = []
    for folder in sorted(p.parent for p in root.glob("*/bundle.json")):
        try:
            m = load_manifest(folder)
        except BundleError as exc:
            rows.append({"name": folder.name, "error": str(exc)})
            continue
        rows.append({"name": m.name, "id": m.id, "created": m.created,
                     "source": m.input_spec.source_kind, "levels": len(m.levels),
                     "activities": len(m.labels["activity"] or []),
                     "identities": len(m.labels["identity"] or [])})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['name']:16s} {r.get('id', '')[:12]}  " + (
            r["error"] if "error" in r else
            f"{r['source']}, {r['levels']} rate levels, {r['activities']} activities, "
            f"{r['identities']} identities"))


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="bundle name under --root, or a folder")],
    root: Annotated[Path, typer.Option(help="folder of bundles")] = Path("models"),
) -> None:
    """Print a bundle's manifest (without the entropy tables) as JSON."""
    from csi_edge.bundle import BundleError, load_manifest

    folder = Path(name) if Path(name).is_dir() else root / name
    try:
        manifest = load_manifest(folder)
    except BundleError as exc:
        raise fail(str(exc)) from exc
    data = manifest.model_dump(mode="json")
    data["entropy"] = {k: {"rows": len(v["counts"]), "alphabet": len(v["counts"][0])}
                       for k, v in data["entropy"].items()}
    typer.echo(json.dumps(data, indent=2))


def _spec_dict(spec: DatasetSpec) -> dict[str, object]:
    keys = ("name", "title", "description", "source_url", "license", "citation", "format",
            "label_key", "labels", "label_meaning", "layout", "how_to_get")
    return {key: getattr(spec, key) for key in keys}


def _print_summary(summary: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    classes: dict[str, int] = summary["classes"]  # type: ignore[assignment]
    splits: dict[str, dict[str, int]] = summary["splits"]  # type: ignore[assignment]
    table = Table(title=f"{summary['dataset']}: {summary['total']} recordings")
    table.add_column("class")
    table.add_column("total", justify="right")
    for split in splits:
        table.add_column(split, justify="right")
    for cls, count in classes.items():
        table.add_row(cls, str(count), *(str(splits[s].get(cls, 0)) for s in splits))
    table.add_row("all", str(summary["total"]),
                  *(str(sum(splits[s].values())) for s in splits), style="bold")
    Console().print(table)
    for key in ("identities", "rooms", "duplicates_removed", "ignored_files"):
        if summary.get(key):
            typer.echo(f"{key}: {json.dumps(summary[key])}")


@app.command("cloud")
def cloud(
    models: Annotated[Path | None, typer.Option(help="folder of model bundles [models]")] = None,
    broker: Annotated[str | None, typer.Option(
        help="mqtt[s]://[user:pass@]host:port, or '' for no MQTT [mqtt://127.0.0.1:1883]")] = None,
    http: Annotated[str | None, typer.Option(help="HOST:PORT to serve on [127.0.0.1:8000]")] = None,
    db: Annotated[str | None, typer.Option(
        help="SQLAlchemy URL [sqlite:///csi-cloud.db]; postgresql+psycopg://user@host/db")] = None,
    recordings: Annotated[Path | None, typer.Option(help="HDF5 recordings folder")] = None,
    prefix: Annotated[str | None, typer.Option(help="topic prefix [csi/v1]")] = None,
    client_id: Annotated[str | None, typer.Option(
        help="MQTT client id (stable: keeps the session across restarts) [csi-cloud-1]")] = None,
    public_url: Annotated[str | None, typer.Option(
        help="base URL edges use to download models [http://HOST:PORT]")] = None,
    site: Annotated[list[str] | None, typer.Option(
        help="handle only this site's segments (repeatable): shard workers by site")] = None,
    bus: Annotated[str | None, typer.Option(
        help="where segments come from: mqtt, or nats://HOST:PORT[,...] for a NATS JetStream "
             "cluster partitioned by AP over the workers (docs/scaling.md) [mqtt]")] = None,
    dev: Annotated[bool | None, typer.Option("--dev/--no-dev",
                                             help="allow the placeholder API token")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML or JSON settings file (CSI_CLOUD_* variables and options win)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Run the cloud service: MQTT ingest, decoding, classification and the HTTP API.

    Settings come from the options, then CSI_CLOUD_* environment variables, then --config.
    The API token (CSI_CLOUD_TOKEN) is required outside --dev.
    """
    import logging
    import signal

    import uvicorn
    from pydantic import ValidationError

    from csi_edge.cli import settings_error

    from .api import create_app
    from .settings import load_settings

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(config, models=models, broker=broker, http=http, db=db,
                                 recordings=recordings, prefix=prefix, client_id=client_id,
                                 public_url=public_url, dev=dev, sites=site or None,
                                 bus=bus)
        settings.check_token()
        settings.broker_address()
    except ValidationError as exc:
        raise fail(f"bad settings: {settings_error(exc)}") from None
    except ValueError as exc:
        raise fail(f"bad settings: {exc}") from None
    try:
        listener = listen_socket(settings.http_host, settings.http_port)
    except OSError as exc:
        raise fail(f"--http {settings.http_host}:{settings.http_port}: cannot listen there "
                   f"({exc.strerror or exc})") from None
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host=settings.http_host, port=settings.http_port,
        log_level=log_level.lower(), access_log=False))
    # A closed terminal stops the service as Ctrl-C does: lifespan shutdown, workers stopped.
    signal.signal(signal.SIGHUP, server.handle_exit)
    server.run(sockets=[listener])


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` for uvicorn: bound here, so a taken port or an
    address that is not this machine's is a one-line error before anything starts."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@app.command("demo")
def demo(
    http: Annotated[str | None, typer.Option(
        help="HOST:PORT of the dashboard and API; must be free when given "
             "[127.0.0.1:8000, or a free port when that is taken]")] = None,
    data: Annotated[Path | None, typer.Option(
        help="recordings to replay (a file or folder) [the committed samples]", exists=True)
    ] = None,
    aps: Annotated[int, typer.Option(help="access points to simulate")] = 3,
    model: Annotated[str, model_option(default="fition")] = "fition",
    models: Annotated[Path | None, typer.Option(
        help="folder of bundles --model names are looked up in [models]")] = None,
    broker: Annotated[str, typer.Option(
        help="auto (mosquitto if installed, else embedded), mosquitto or embedded")] = "auto",
    workdir: Annotated[Path | None, typer.Option(
        help="keep the database, recordings and logs here [a temporary folder]")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
) -> None:
    """Run the whole pipeline on loopback: a broker, the cloud service and edge agents
    replaying recordings. Prints the dashboard URL and a line per AP; Ctrl-C stops it all."""
    from .demo import DemoError, run_demo

    if broker not in ("auto", "mosquitto", "embedded"):
        raise fail(f"--broker {broker!r} is not auto, mosquitto or embedded")
    try:
        code = run_demo(http=http, data=data, aps=aps, model=model, models=models,
                        broker=broker, workdir=workdir, duration_s=duration)
    except DemoError as exc:
        raise fail(str(exc)) from exc
    raise typer.Exit(code)


@app.command("adapt")
def adapt_command(
    model: Annotated[str, model_option("the bundle to adapt: ")],
    data: Annotated[Path, typer.Option(help="labelled recordings of the new session or room",
                                       exists=True, file_okay=False)],
    shots: Annotated[int, typer.Option(min=1, help="labelled recordings per activity used")],
    dataset: Annotated[str, typer.Option(help="registered dataset name of --data "
                                              "(\"recordings\": the service's own, "
                                              "labelled through the API)")] = "fition",
    out: Annotated[Path | None, typer.Option(help="new bundle folder "
                                                  "[MODEL-adapted-kK next to MODEL]")] = None,
    part: Annotated[str, typer.Option(help="what is trained: classifier (the whole cloud-side "
                                           "context classifier) or heads (its last layers)")
                    ] = "classifier",
    method: Annotated[str, typer.Option(
        help="ridge (the context head's activity layers refitted in closed form on the "
             "support, shrunk towards the bundle's: seconds), ridge-alone (the support "
             "alone); for bundles without a context head: finetune, prototypes or "
             "prototypes+finetune")] = "ridge",
    epochs: Annotated[int, typer.Option(min=1, max=1000)] = 60,
    seed: Annotated[int, typer.Option(help="support selection and training seed")] = 0,
    self_train: Annotated[bool, typer.Option(
        "--self-train", help="then one round of self-training on the setting's unlabelled "
                             "recordings, dropped where a cross-validation on the support "
                             "says it does harm (method ridge; docs/model.md)")] = False,
    unlabelled: Annotated[Path | None, typer.Option(
        help="unlabelled recordings of the new setting for --self-train (their labels are "
             "not read); with --dataset recordings the stream outside the labelled ranges "
             "is used as well", exists=True, file_okay=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Refit a bundle's cloud-side classifier on K labelled recordings per activity from a new
    session or room. The edge part is unchanged: APs keep streaming without a switch."""
    import torch

    from .model.adapt import METHODS
    from .model.adapt_job import adapt_bundle

    if part not in ("classifier", "heads"):
        raise fail(f"--part must be classifier or heads, not {part!r}")
    if method not in METHODS:
        raise fail(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    bundle = resolve_model_option(model)
    torch.set_num_threads(2)
    target = out or bundle.with_name(f"{bundle.name}-adapted-k{shots}")
    try:
        result = adapt_bundle(bundle, dataset, data, shots, target, seed=seed,
                              part=part, epochs=epochs,  # type: ignore[arg-type]
                              method=method,  # type: ignore[arg-type]
                              self_training=self_train, unlabelled_dir=unlabelled,
                              log=None if as_json else typer.echo)
    except (CSIError, KeyError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"bundle {result['bundle'][:12]}… written to {result['out']} (edge part and "
               f"wire id of {result['base'][:12]}…)")
    scored = (f"{result['held_out']} held-out recordings" if result["held_out_accuracy"] else
              f"the {result['support']} support recordings themselves (NOT held out: every "
              "recording was used for the adaptation)")
    for level, (a, b) in enumerate(zip(result["activity_accuracy_before"],
                                       result["activity_accuracy_after"], strict=True)):
        typer.echo(f"level {level}: activity accuracy on {scored} {a:.3f} -> {b:.3f}")
    trained = result.get("self_training") or {}
    if trained.get("kept"):
        typer.echo("self-training kept; adapted without it: " + ", ".join(
            f"level {lv} {a:.3f}" for lv, a in enumerate(trained["activity_accuracy_without"])))
    weights = {lv: v["prior_weight"] for lv, v in result.get("shrinkage", {}).items()
               if v["prior_weight"] is not None}
    if weights:
        typer.echo("weight of the parent's head chosen on the support (0: the support alone, "
                   "1: shrunk towards the parent's): "
                   + ", ".join(f"level {lv} {w:.2f}" for lv, w in weights.items()))


def main() -> None:
    app(prog_name="csi")


if __name__ == "__main__":
    main()
