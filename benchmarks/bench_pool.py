"""Stand-alone PrRoI pooling benchmark: the bench-pool engine without the CLI (no Hydra, no wandb).

    python benchmarks/bench_pool.py --out /tmp/bench_pool            # issue shapes, CPU (+ CUDA when present)
    python benchmarks/bench_pool.py --out /tmp/bench_pool --quick    # seconds, tiny shapes
    python benchmarks/bench_pool.py --out /tmp/bench_pool --impl all --sizes mixed

Writes bench_pool.json and plots/bench_pool.png into --out and prints the table. ``iouctl bench-pool`` runs the
same engine inside a run directory.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from iouctl.engine.bench_pool import MIXED, run_bench_pool
from iouctl.fileio import atomic_write_json

QUICK = {"feature_shape": (1, 16, 25, 38), "num_rois": [32], "roi_sizes": [MIXED, 32, 128], "repeats": 3, "warmup": 1}


class DirRun:
    """The part of a run the engine uses, writing into one folder (metrics.jsonl for the logged rows)."""

    def __init__(self, root: Path):
        self.dir = root
        self.console = Console(width=max(Console().width, 120))  # full table when piped to a file
        root.mkdir(parents=True, exist_ok=True)
        self._metrics = (root / "metrics.jsonl").open("a")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, relpath: str, obj) -> Path:
        return atomic_write_json(self.path(relpath), obj)

    def log_table(self, name: str, columns: list, rows: list) -> None:
        pass  # the JSON holds the rows

    def log_image(self, name: str, png_path: Path) -> None:
        self.console.print(f"plot: {png_path}")

    def progress(self, transient: bool = False) -> Progress:
        return Progress(console=self.console, transient=transient)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--impl", nargs="+", default=["prroi"], help="prroi, prroi_reference, roi_align, "
                    "roi_align_adaptive, roi_pool or all (roi_align is always included)")
    ap.add_argument("--device", nargs="+", default=["auto"])
    ap.add_argument("--sizes", nargs="+", default=None, help="RoI sides in image pixels, or 'mixed'")
    ap.add_argument("--num-rois", nargs="+", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    kw: dict = dict(QUICK) if a.quick else {}
    if a.sizes:
        kw["roi_sizes"] = [s if s == MIXED else float(s) for s in a.sizes]
    if a.num_rois:
        kw["num_rois"] = a.num_rois
    if a.repeats:
        kw["repeats"] = a.repeats
    run_bench_pool(DirRun(a.out), impls=a.impl, devices=a.device, threads=a.threads, **kw)


if __name__ == "__main__":
    main()
