"""Getting a dataset ready (generated or validated) with a progress bar: generation takes seconds the first time."""
from __future__ import annotations

from typing import Any


def prepare_dataset(data: Any, progress: Any, read_pixels: bool = True) -> None:
    """`data.prepare()` reporting into a rich Progress (`progress` is an open one, e.g. `run.progress(transient=True)`).
    read_pixels=False: the command only reads annotations (nms-ablate, data stats), so no image is opened to check it."""
    task = progress.add_task("preparing dataset", total=None)
    data.prepare(progress=lambda done, total: progress.update(task, completed=done, total=total),
                 open_images=None if read_pixels else False)


def ground_truth(data: Any, split: str) -> Any:
    """The evaluation ground truth of `split`: the validated (with skip_bad, cleaned) entries the dataset trains and
    predicts on, never the raw file."""
    from iouctl.analysis import GroundTruth

    return GroundTruth.from_report(data.report(split))


def dataset_record(data: Any, split: str) -> dict:
    """What a detections file records about the data it was made on (``meta["data"]``)."""
    report = data.report(split)
    return {"ann_file": str(report.ann_file), "split": split, "fingerprint": report.fingerprint(),
            "images": report.num_images}


def check_detections_data(meta: dict, data: Any, split: str, source: Any) -> None:
    """Refuse (one line) detections recorded on another dataset than `data`'s `split`: their image ids may overlap
    by chance and every AP would read 0.0. Files without a record are checked by image and category ids later."""
    from iouctl.errors import IouctlError

    made = meta.get("data") if isinstance(meta, dict) else None
    if not isinstance(made, dict) or "fingerprint" not in made:
        return
    here = dataset_record(data, split)
    if made["fingerprint"] != here["fingerprint"]:
        raise IouctlError(f"{source} holds detections of {made.get('ann_file')} ({made.get('images')} images), not of "
                          f"{here['ann_file']} ({here['images']} images) being scored; pass the data overrides of "
                          f"the run that made them, or run=<that run> so its data config is restored")
