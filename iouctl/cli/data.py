"""`iouctl data ...`: make, check, look at and convert datasets."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from iouctl.cli.common import Overrides, PrintCfg, compose, err_console, print_config, run_experiment, user_errors

data_app = typer.Typer(help="Datasets: generate the built-in one, check a COCO one, preview, convert Pascal VOC.",
                       no_args_is_help=True)

SPLITS = ("train", "val")


def _dataset(overrides: Optional[List[str]]):
    """The dataset object of `data.yaml` with the overrides applied (nothing generated or read yet)."""
    from iouctl import config

    return config.instantiate(compose("data", overrides).data)


def _prepare(data) -> None:
    """Generate / validate `data` with a progress bar on the terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from iouctl.engine.prepare import prepare_dataset

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err_console, transient=True) as progress:
        prepare_dataset(data, progress)


@data_app.command()
def generate(overrides: Optional[List[str]] = Overrides, cfg: bool = PrintCfg) -> None:
    """Generate the built-in dataset (or validate the configured one) into the cache and print where it is."""
    with user_errors():
        if cfg:
            print_config(compose("data", overrides, allow_missing=True))
            return
        data = _dataset(overrides)
        _prepare(data)
        _print_summary(data)


@data_app.command()
def check(overrides: Optional[List[str]] = Overrides) -> None:
    """Validate a dataset's annotations (e.g. data=coco data.root=/data/coco) and report every problem found."""
    with user_errors():
        from iouctl.data import ShapesData
        from iouctl.data.coco import validate_coco

        data = _dataset(overrides)
        if isinstance(data, ShapesData):  # generated on demand; a COCO set is only read (prepare would stop at errors)
            _prepare(data)
        bad = False
        for split in SPLITS:
            report = validate_coco(data.ann_file(split), data.image_dir(split), skip_bad=True)
            err_console.print(f"{split}: {report.summary()}")
            bad |= not report.ok
        if bad:
            raise typer.Exit(1)


@data_app.command()
def preview(
    overrides: Optional[List[str]] = Overrides,
    split: str = typer.Option("val", "--split", help="train or val"),
    num_images: int = typer.Option(8, "--num-images", "-n", min=1, max=64, help="Images in the grid."),
) -> None:
    """Draw a grid of images with their ground-truth boxes into a run directory (preview_<split>.png)."""
    if split not in SPLITS:
        err_console.print(f"[bold red]error:[/] --split {split!r} is not valid; choose one of {', '.join(SPLITS)}")
        raise typer.Exit(2)

    def body(conf, run):
        from iouctl import config
        from iouctl.data.preview import render_preview

        from iouctl.engine.prepare import prepare_dataset

        data = config.instantiate(conf.data)
        with run.progress(transient=True) as progress:
            prepare_dataset(data, progress)
        out = render_preview(data.dataset(split), run.path(f"preview_{split}.png"), num_images=num_images,
                             seed=conf.seed)
        run.log_image(f"preview/{split}", out)
        run.console.print(f"preview: {out}")

    run_experiment("data", overrides, False, body, extra_overrides=["name=preview"])


@data_app.command("convert-voc")
def convert_voc(
    voc_root: Path = typer.Argument(..., help="A Pascal VOC folder (Annotations/, ImageSets/Main/, JPEGImages/)."),
    out: Path = typer.Option(..., "--out", "-o", help="The COCO JSON file to write."),
    split: str = typer.Option("trainval", "--split", help="An ImageSets/Main/<split>.txt list, e.g. train, val, trainval."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed objects/files and count them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Convert a Pascal VOC folder (XML) into COCO JSON, usable with data=coco."""
    with user_errors():
        from iouctl.data.voc import convert_voc as convert

        path, report = convert(voc_root, split=split, out=out, skip_bad=skip_bad, overwrite=overwrite)
        err_console.print(f"wrote {path}: {report.summary()}")


@data_app.command("export-coco")
def export_coco(
    detections: Path = typer.Argument(..., help="A raw-detections file (.npz, e.g. runs/eval/<run>/detections/val.npz)."),
    out: Path = typer.Option(..., "--out", "-o", help="The COCO results JSON file to write."),
    score: str = typer.Option("cls", "--score", help="The score to export: cls, iou or fused."),
    cls_weight: float = typer.Option(0.5, "--cls-weight", help="For --score fused: cls^w * IoU^(1-w)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export raw detections to the standard COCO results JSON (image_id, category_id, bbox xywh, score)."""
    with user_errors():
        from iouctl.data.detections import Detections
        from iouctl.postprocess.suppression import ranking_score

        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        dets = Detections.load(detections)
        path = dets.export_coco_json(out, scores=ranking_score(dets, score, cls_weight))
        err_console.print(f"wrote {len(dets)} detections to {path}")


def _print_summary(data) -> None:
    from rich.table import Table

    table = Table(title=f"dataset at {data.root}")
    for col in ("split", "images", "annotations", "annotation file"):
        table.add_column(col)
    import json

    for split in SPLITS:
        ann = Path(data.ann_file(split))
        d = json.loads(ann.read_text())
        table.add_row(split, str(len(d.get("images", []))), str(len(d.get("annotations", []))), str(ann))
    err_console.print(table)
    err_console.print("classes: " + ", ".join(c["name"] for c in data.categories))
