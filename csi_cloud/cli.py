"""The ``csi`` command: edge tools plus the service side (datasets, and later training,
evaluation and the service). Heavy imports stay inside the commands so ``csi`` starts fast
and the edge commands work on an install without the cloud extra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from csi_edge._errors import CSIError
from csi_edge.cli import app as edge_app
from csi_edge.cli import fail

if TYPE_CHECKING:
    from .datasets import DatasetSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="csi-pipeline: WiFi CSI sensing with compressed streaming from access points.",
)
for command in edge_app.registered_commands:
    app.registered_commands.append(command)

datasets_app = typer.Typer(add_completion=False, no_args_is_help=True,
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


def main() -> None:
    app(prog_name="csi")


if __name__ == "__main__":
    main()
