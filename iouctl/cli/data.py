"""`iouctl data ...`: make, check, look at and convert datasets."""
from __future__ import annotations

import pkgutil
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from rich.markup import escape

from iouctl.cli.common import Overrides, PrintCfg, err_console, fail, print_config, run_experiment, user_errors
from iouctl.engine.compose import compose
from iouctl.schema import SCORES

data_app = typer.Typer(help="Datasets: generate the built-in one, check a COCO one, preview, import VOC/YOLO/CSV.",
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
    """Validate a dataset (e.g. data=coco data.root=/data/coco) with the validator training and evaluation use: every
    annotation, every image opened (decodes, size as the JSON says), train and val categories; report every problem.
    Exit code 1 when anything is wrong."""
    with user_errors():
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from iouctl.data import ShapesData
        from iouctl.data.coco import DatasetError, check_same_categories, validate_coco

        data = _dataset(overrides)
        if isinstance(data, ShapesData):  # generated on demand; a COCO set is only read (prepare would stop at errors)
            _prepare(data)
        bad = False
        reports = {}
        for split in SPLITS:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err_console, transient=True) as progress:
                task = progress.add_task(f"{split}: opening images", total=None)
                reports[split] = report = validate_coco(
                    data.ann_file(split), data.image_dir(split), skip_bad=True, open_images=True,
                    workers=getattr(data, "workers", 2), allow_outside=getattr(data, "allow_outside", False),
                    progress=lambda done, total: progress.update(task, completed=done, total=total))
            err_console.print(escape(f"{split}: {report.summary()}"), soft_wrap=True)
            bad |= not report.ok
        try:
            check_same_categories(reports["train"], reports["val"])
        except DatasetError as e:
            err_console.print(escape(str(e)), soft_wrap=True)
            bad = True
        if bad:
            raise typer.Exit(1)


@data_app.command()
def preview(
    overrides: Optional[List[str]] = Overrides,
    split: str = typer.Option("val", "--split", help="train or val"),
    num_images: int = typer.Option(8, "--num-images", "-n", min=1, max=64, help="Images in the grid."),
    augment: Optional[str] = typer.Option(
        None, "--augment", help="A conf/augment/ option (e.g. standard): each image, then 3 augmented draws of it; "
                                "augment.* overrides apply."),
) -> None:
    """Draw a grid of images with their ground-truth boxes into a run directory (preview_<split>.png, or
    preview_<split>_<augment>.png with --augment)."""
    if split not in SPLITS:
        fail(f"--split {split!r} is not valid; choose one of {', '.join(SPLITS)}")

    def body(conf, run):
        from iouctl import config
        from iouctl.data.preview import render_preview

        from iouctl.engine.prepare import prepare_dataset

        data = config.instantiate(conf.data)
        with run.progress(transient=True) as progress:
            prepare_dataset(data, progress)
        name = f"preview_{split}" + (f"_{augment}" if augment else "")
        out = render_preview(data.dataset(split), run.path(f"{name}.png"), num_images=num_images, seed=conf.seed,
                             augment=config.instantiate(conf.augment))
        run.log_image(f"preview/{name.removeprefix('preview_')}", out)
        run.console.print(escape(f"preview: {out}"), soft_wrap=True)

    run_experiment("data", overrides, False, body,
                   extra_overrides=["name=preview", *([f"+augment={augment}"] if augment else [])])


@data_app.command()
def stats(overrides: Optional[List[str]] = Overrides) -> None:
    """Dataset statistics and the model sizes they suggest (e.g. data=coco data.root=DIR).

    Image sizes, objects per image, box size and aspect percentiles, class counts; then model.min_size / max_size /
    anchor_sizes per model (from the train split) as overrides to paste. Writes stats.json and plots/box_sizes.png
    into a run directory."""
    def body(conf, run):
        import yaml

        from iouctl import config
        from iouctl.engine.prepare import prepare_dataset
        from iouctl.engine.sizes import data_stats

        data = config.instantiate(conf.data)
        with run.progress(transient=True) as progress:
            prepare_dataset(data, progress, read_pixels=False)  # sizes come from the JSON (or image headers)
        models = {o: yaml.safe_load((config.CONF_DIR / "model" / f"{o}.yaml").read_text())
                  for o in config.group_options("model")}
        data_stats(run, data, models)

    run_experiment("data", overrides, False, body, extra_overrides=["name=stats"])


@data_app.command("convert-voc")
def convert_voc(
    voc_root: Path = typer.Argument(..., help="A Pascal VOC folder (Annotations/, ImageSets/Main/, JPEGImages/)."),
    out: Path = typer.Option(..., "--out", "-o", help="The COCO JSON file to write."),
    split: str = typer.Option("trainval", "--split", help="An ImageSets/Main/<split>.txt list, e.g. train, val, trainval."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip malformed objects/files and count them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    classes: Optional[Path] = typer.Option(
        None, "--classes", help="Class names, one per line, in category order.",
        show_default="the 20 VOC classes"),
) -> None:
    """Convert one split of a Pascal VOC folder (XML) into one COCO JSON file (file_name relative to JPEGImages/).
    `iouctl data import voc` makes a whole dataset folder (train and val) and reads any class names."""
    with user_errors():
        from iouctl.data.importers import read_classes
        from iouctl.data.voc import convert_voc as convert

        path, report = convert(voc_root, split=split, out=out, skip_bad=skip_bad, overwrite=overwrite,
                               classes=None if classes is None else read_classes(classes))
        err_console.print(escape(f"wrote {path}: {report.summary()}"), soft_wrap=True)


# one per module of iouctl/data/importers/, listed without importing it (iouctl.data loads torch)
ImportFormat = Enum("ImportFormat", {m.name: m.name for m in sorted(
    pkgutil.iter_modules([str(Path(__file__).resolve().parents[1] / "data" / "importers")]), key=lambda m: m.name)
    if not m.name.startswith("_")}, type=str)


@data_app.command("import")
def import_(
    fmt: ImportFormat = typer.Argument(..., metavar="FORMAT", help="The source's format."),
    source: Path = typer.Argument(
        ..., metavar="SOURCE", help="voc: the folder; yolo: data.yaml or its folder; csv: the .csv file."),
    out: Path = typer.Option(..., "--out", "-o", help="The dataset folder to write (annotations/, images/)."),
    classes: Optional[Path] = typer.Option(
        None, "--classes", help="Class names, one per line: the categories in this order; other classes are errors."),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", help="Share of the images for val when the source has no split.",
        show_default="0.2"),
    seed: int = typer.Option(0, "--seed", help="Seed of that random split."),
    copy: bool = typer.Option(False, "--copy", help="Copy the images instead of symlinking them."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad files, rows and objects, and count them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the annotations and images of --out."),
    difficult: Optional[str] = typer.Option(
        None, "--difficult", help="voc: difficult objects as crowd, keep or drop.", show_default="crowd"),
    split_train: Optional[str] = typer.Option(
        None, "--split-train", help="voc: the ImageSets/Main split file for train.", show_default="train"),
    split_val: Optional[str] = typer.Option(
        None, "--split-val", help="voc: the ImageSets/Main split file for val.", show_default="val"),
) -> None:
    """Import a labelled dataset (Pascal VOC XML, YOLO txt, CSV) as a COCO dataset folder for data=coco."""
    with user_errors():
        from iouctl.data.importers import import_dataset

        options = {k: v for k, v in dict(difficult=difficult, split_train=split_train, split_val=split_val).items()
                   if v is not None}
        result = import_dataset(fmt.value, source, out, classes=classes, val_fraction=val_fraction, seed=seed,
                                copy=copy, overwrite=overwrite, skip_bad=skip_bad, **options)
        _print_import_summary(result)


def _print_import_summary(result) -> None:
    from rich.markup import escape

    from iouctl.data.stats import read_split, split_stats
    from iouctl.engine.sizes import print_tables

    report = result.report
    err_console.print(escape(f"imported {report.num_images} images, {report.num_annotations} boxes into {result.out} "
                             f"(split: {result.split_from})"), soft_wrap=True)
    print_tables(err_console, {split: split_stats(read_split(d)) for split, d in result.coco.items()})
    for note, n in report.notes.items():
        err_console.print(escape(f"{n} {note}"))
    if not report.ok:
        err_console.print(escape(f"skipped {report.problems()}"), soft_wrap=True)
    err_console.print(escape(f"use it: iouctl train data=coco data.root={result.out}"), soft_wrap=True)


ExportScore = Enum("ExportScore", {s: s for s in SCORES}, type=str)


@data_app.command("export-coco")
def export_coco(
    detections: Path = typer.Argument(..., help="A raw-detections file (.npz, e.g. runs/eval/<run>/detections/val.npz)."),
    out: Path = typer.Option(..., "--out", "-o", help="The COCO results JSON file to write."),
    score: ExportScore = typer.Option("cls", "--score", help="The score to export."),
    cls_weight: Optional[float] = typer.Option(None, "--cls-weight", min=0.0, max=1.0,
                                               help="For --score fused: a in cls^a * IoU^(1-a) (default: the "
                                                    "model's, recorded with the detections)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export raw detections to the standard COCO results JSON (image_id, category_id, bbox xywh, score)."""
    with user_errors():
        from iouctl.data.detections import Detections
        from iouctl.errors import IouctlError
        from iouctl.postprocess.suppression import ranking_score

        if out.is_dir():
            raise IouctlError(f"--out {out} is a folder; give the JSON file to write, e.g. "
                              f"--out {out / 'results.json'}")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        dets = Detections.load(detections)
        if cls_weight is not None:
            dets.meta["cls_weight"] = cls_weight
        path = dets.export_coco_json(out, scores=ranking_score(dets, score.value))
        err_console.print(escape(f"wrote {len(dets)} detections to {path}"), soft_wrap=True)


def _print_summary(data) -> None:
    from rich.table import Table

    table = Table(title=escape(f"dataset at {data.root}"))
    for col in ("split", "images", "annotations", "annotation file"):
        table.add_column(col)
    import json

    for split in SPLITS:
        ann = Path(data.ann_file(split))
        d = json.loads(ann.read_text())
        table.add_row(split, str(len(d.get("images", []))), str(len(d.get("annotations", []))), escape(str(ann)))
    err_console.print(table)
    err_console.print(escape("classes: " + ", ".join(c["name"] for c in data.categories)), soft_wrap=True)
