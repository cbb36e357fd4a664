"""Model sizes from the data: `iouctl data stats` (statistics of every split, the sizes they suggest per model,
stats.json and a plot) and the `auto` values of model.min_size / max_size / anchor_sizes, derived from the training
split when a detector is built (the rule is in iouctl.data.stats)."""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.markup import escape

from iouctl.data.stats import AnchorPyramid, SplitBoxes, read_split, resize_scales, split_stats, suggest_sizes
from iouctl.errors import ConfigError

AUTO = "auto"
SPLITS = ("train", "val")
SIZE_KEYS = ("min_size", "max_size", "anchor_sizes")
_VALID = {"min_size": "an integer >= 1 (pixels) or auto", "max_size": "an integer >= 1 (pixels) or auto",
          "anchor_sizes": "a list of integers >= 1, one per pyramid level (e.g. [16,32,64]), or auto"}


def anchor_pyramid(target: str) -> AnchorPyramid | None:
    """The anchor layout a detector builder declares (``ANCHOR_PYRAMID`` in its module), None if it declares none."""
    module = importlib.import_module(target.rpartition(".")[0])
    layout = getattr(module, "ANCHOR_PYRAMID", None)
    return None if layout is None else AnchorPyramid(**layout)


def read_splits(data: Any, splits: Sequence[str] = SPLITS) -> dict[str, SplitBoxes]:
    """The validated entries of each split of a prepared dataset, as arrays."""
    out = {}
    for split in splits:  # the report, not data.dataset(): no per-image target tensors are needed here
        out[split] = read_split(data.report(split).coco_dict(), data.image_dir(split))
    return out


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_model_sizes(model: Any) -> list[str]:
    """The keys of SIZE_KEYS set to auto; any other value that is not a size is a ConfigError naming it."""
    auto = []
    for key in SIZE_KEYS:
        v = model[key]
        if v == AUTO:
            auto.append(key)
            continue
        is_list = isinstance(v, Sequence) and not isinstance(v, str)  # a ListConfig is a Sequence
        ok = (is_list and len(v) > 0 and all(_is_size(x) for x in v)) if key == "anchor_sizes" else _is_size(v)
        if not ok:
            raise ConfigError(f"model.{key}={list(v) if is_list else v!r} is not valid: use {_VALID[key]}")
    return auto


def resolve_auto_sizes(conf: Any, data: Any, run: Any) -> Any:
    """Replace `auto` in conf.model.min_size / max_size / anchor_sizes by the values the training split suggests,
    rewrite the run's config.yaml with them (eval and refine of the run restore those) and print them. Bad values
    of the three keys are one line (ConfigError). Returns `conf` (changed in place)."""
    model = conf.model
    auto = check_model_sizes(model)
    if not auto:
        return conf
    pyramid = anchor_pyramid(str(model._target_))
    if "anchor_sizes" in auto and pyramid is None:
        raise ConfigError(f"model.anchor_sizes=auto: {model._target_} declares no anchor pyramid; give the sizes")
    train = read_splits(data, ["train"])["train"]
    given = {k: None if k in auto else int(model[k]) for k in ("min_size", "max_size")}
    s = suggest_sizes(train, pyramid, list(model.aspect_ratios), **given)
    chosen = {"min_size": s.min_size, "max_size": s.max_size, "anchor_sizes": s.anchor_sizes}
    for key in auto:
        model[key] = chosen[key]
    from omegaconf import OmegaConf

    run.write_text("config.yaml", OmegaConf.to_yaml(conf))
    lines = ["model sizes from the training split: " + " ".join(f"model.{k}={_value(chosen[k])}" for k in auto)]
    if {"min_size", "max_size"} & set(auto):
        lines.append(f"  image size: {s.reasons['image size']}")
    if "anchor_sizes" in auto:
        lines.append(f"  anchor sizes: {s.reasons['anchor sizes']}")
    if s.aspect_ratios is not None:  # not derived (no auto), but worth a look
        lines.append(f"  aspect ratios (unchanged; consider {s.overrides()[-1]}): {s.reasons['aspect ratios']}")
    for line in lines:
        run.console.print(escape(line), soft_wrap=True)
    return conf


def _value(v: Any) -> str:
    return f"[{','.join(str(x) for x in v)}]" if isinstance(v, list) else str(v)


def data_stats(run: Any, data: Any, models: dict[str, dict]) -> dict:
    """Statistics of both splits of a prepared dataset, printed as tables, and the sizes the training split suggests
    for each detector in `models` ({option name: its config, with `_target_` and `aspect_ratios`}; options that get
    the same suggestion share a line). Writes stats.json and plots/box_sizes.png; returns the stats.json content."""
    boxes = read_splits(data)
    stats = {split: split_stats(b) for split, b in boxes.items()}
    suggestions: dict[str, dict] = {}
    for option, node in models.items() if len(boxes["train"].boxes) else ():
        s = suggest_sizes(boxes["train"], anchor_pyramid(str(node["_target_"])), list(node["aspect_ratios"]))
        entry = {"min_size": s.min_size, "max_size": s.max_size, "anchor_sizes": s.anchor_sizes,
                 "aspect_ratios": s.aspect_ratios, "reasons": s.reasons, "overrides": " ".join(s.overrides())}
        same = next((k for k, v in suggestions.items() if v == entry), None)
        if same is not None:
            suggestions[f"{same}, {option}"] = suggestions.pop(same)
        else:
            suggestions[option] = entry
    print_tables(run.console, stats)
    _print_suggestions(run.console, suggestions)
    if not suggestions:
        run.console.print("no boxes in the train split: no model sizes to suggest")
    out = {"splits": stats, "suggestions": suggestions}
    if suggestions:
        plot = plot_box_sizes(boxes["train"], suggestions, run.path("plots", "box_sizes.png"))
        run.log_image("stats/box_sizes", plot["path"])
        out["plot"] = "plots/box_sizes.png"
    run.write_json("stats.json", out)
    return out


def _cell(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def print_tables(console: Any, stats: dict) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title="images and objects per image", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("split", "images", "width min/med/max", "height min/med/max", "objects min/med/p95/max",
                "without objects", "boxes", "crowd"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for split, s in stats.items():
        w, h, o = s["image_width"], s["image_height"], s["objects_per_image"]
        t.add_row(split, str(s["images"]), "/".join(_cell(w[k]) for k in ("min", "median", "max")),
                  "/".join(_cell(h[k]) for k in ("min", "median", "max")),
                  "/".join(_cell(o[k]) for k in ("min", "median", "p95", "max")), str(s["images_without_objects"]),
                  str(s["boxes"]), str(s["crowd_boxes"]))
    console.print(t)
    keys = list(next(iter(stats.values()))["box_size"])
    t = Table(title="boxes (px, as annotated; aspect = w/h)", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("split")
    t.add_column("measure")
    for k in keys:
        t.add_column(k, justify="right")
    for split, s in stats.items():
        for name, key, digits in (("sqrt(w*h)", "box_size", 1), ("width", "box_width", 1),
                                  ("height", "box_height", 1), ("aspect", "aspect_ratio", 2)):
            t.add_row(split, name, *(_cell(s[key][k], digits) for k in keys))
    console.print(t)
    t = Table(title="boxes per class", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("class")
    for split in stats:
        t.add_column(split, justify="right")
    for name in next(iter(stats.values()))["classes"]:
        t.add_row(name, *(str(s["classes"].get(name, 0)) for s in stats.values()))
    console.print(t)


def _print_suggestions(console: Any, suggestions: dict) -> None:
    for options, s in suggestions.items():
        console.print(f"[bold]suggested sizes for model={options}[/] (from the train split):")
        for what, why in s["reasons"].items():
            if why:
                console.print(f"  {what}: {escape(why)}", soft_wrap=True)
        console.print(f"  {escape(s['overrides'])}", soft_wrap=True)


def plot_box_sizes(s: SplitBoxes, suggestions: dict, out_png: Any) -> dict:
    """Histogram of the box sizes sqrt(w*h) after each suggestion's resize (log-spaced bins), one panel per
    suggestion, its anchors as vertical lines with the sizes each serves at IoU >= 0.5 shaded.
    Returns {"path", "size", "panels": {options: {"counts": ndarray, "edges": ndarray, "anchors": [..]}}}."""
    from iouctl.analysis.plots import PANEL_INCHES, new_figure, save_png
    from iouctl.data.stats import SIZE_BAND

    fig = new_figure(PANEL_INCHES * 1.5 * len(suggestions), PANEL_INCHES)
    axes = fig.subplots(1, len(suggestions), squeeze=False)[0]
    panels = {}
    for ax, (options, sg) in zip(axes, suggestions.items()):
        scale = resize_scales(s.image_sizes, sg["min_size"], sg["max_size"])[s.box_image]
        size = np.sqrt(s.boxes[:, 0] * s.boxes[:, 1]) * scale
        anchors = sg["anchor_sizes"] or []
        lo = min([size.min(), *(a / SIZE_BAND for a in anchors)])
        hi = max([size.max(), *(a * SIZE_BAND for a in anchors)])
        edges = np.geomspace(lo * 0.95, hi * 1.05, 41)
        counts, _, _ = ax.hist(size, bins=edges, color="tab:blue", alpha=0.85, zorder=2)
        for i, a in enumerate(anchors):
            ax.axvspan(a / SIZE_BAND, a * SIZE_BAND, color="tab:orange", alpha=0.12 if i % 2 else 0.22, linewidth=0,
                       zorder=0)
            ax.axvline(a, color="tab:orange", linewidth=1.5, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel(f"box size sqrt(w*h), px after the resize to {sg['min_size']}/{sg['max_size']}")
        ax.set_ylabel("boxes (train)")
        ax.set_title(f"model={options}: anchors {anchors}", fontsize=9)
        panels[options] = {"counts": np.asarray(counts), "edges": edges, "anchors": list(anchors)}
    fig.tight_layout()
    path = save_png(fig, out_png)
    w, h = fig.canvas.get_width_height()
    return {"path": path, "size": (w, h), "panels": panels}
