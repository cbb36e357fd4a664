"""Benchmark: `iouctl nms-ablate` end to end, the default grid with every analysis, per phase and per worker count.

Two cases:

  --coco      a COCO-val-sized split written to disk (annotations + empty image files, never opened): --images images
              (5,000 for COCO val) of 640x480 with Poisson(7.3) objects in 80 classes (bench_analyses.coco_like), and
              --per-image raw detections per image (1,000: a detector's pre-NMS budget) synthesized from it
              (synthesize_detections: --per-gt jittered copies per object, the rest background boxes), passed to
              the command as run=<file.npz> with data=coco
  --builtin   `iouctl nms-ablate --synthetic` on the built-in val split (128 images, ~16k raw boxes)

Each case runs the CLI in a subprocess once per --workers value. Reported per run: wall and CPU seconds (the
command's own and its children's) of each phase the command records in results.json ("phases": load, true_iou,
shared, arms, outputs; inside arms the NMS / evaluation / analyses / oracle share summed over the arms), and the
peak memory of the process tree, sampled every 0.2 s from /proc: PSS (shared pages split between the processes
that map them: what the tree costs the machine) and the sum of RSS (counts forked workers' shared pages once per
worker: an upper bound). The results of every worker count are checked identical to the first's (every arm's AP
keys, errors, calibration and oracle rows), else the script exits 1.

    .venv/bin/python benchmarks/bench_nms_ablate.py --coco --images 500 --workers 1 2 [--json out.json]
    .venv/bin/python benchmarks/bench_nms_ablate.py --builtin --workers 1 2
    .venv/bin/python benchmarks/bench_nms_ablate.py --coco --images 5000 --workers 2 --work W 'analyses=[]'

Trailing arguments are nms-ablate overrides (``analyses=[]``: the grid without errors, calibration and oracles).
With --work, a COCO-sized split already written there with the same settings is reused. Each run also reports the
machine's load average before and after it (the CPU seconds are the figures to compare on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

COMPARED = ("baseline", "num_detections", "arms", "correlation_before_nms", "ap_per_threshold", "errors",
            "calibration", "oracle")


def coco_split(work: Path, images: int, per_image: float, per_gt: int, classes: int, seed: int = 0) -> Path:
    """Write the COCO-sized dataset (data.root = `work`/data) and its raw detections; returns the .npz path. A split
    already written there with the same settings is reused."""
    from bench_analyses import coco_like

    stamp = work / "split.json"
    settings = {"images": images, "per_image": per_image, "per_gt": per_gt, "classes": classes, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and (work / "val.npz").is_file():
        print(f"COCO-sized split: reusing {work} ({settings})")
        return work / "val.npz"

    from iouctl.analysis import synthesize_detections

    g = coco_like(seed=seed, images=images, classes=classes)
    objects = len(g.keys) / images
    background = max(0.0, per_image - per_gt * objects)
    dets = synthesize_detections(g, seed=seed + 1, per_gt=per_gt, background_per_image=background)
    root = work / "data"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for im in g.dataset["images"]:
        (root / "images" / im["file_name"]).touch()  # listed, never opened (nms-ablate reads no pixels)
    val = dict(g.dataset)
    train = {"images": val["images"][:1], "categories": val["categories"],
             "annotations": [a for a in val["annotations"] if a["image_id"] == val["images"][0]["id"]]}
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    (root / "annotations" / "train.json").write_text(json.dumps(train))
    path = work / "val.npz"
    dets.save(path)
    stamp.write_text(json.dumps(settings))
    print(f"COCO-sized split: {images} images, {len(g.keys)} objects ({objects:.1f} per image), {classes} classes, "
          f"{len(dets)} raw detections ({len(dets) / images:.0f} per image: {per_gt} per object + "
          f"{background:.0f} background)")
    return path


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/*/stat."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def _memory(pids: list[int]) -> tuple[float, float]:
    """(sum of PSS, sum of RSS) in MiB."""
    pss = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return pss / 1024, rss / 1024


def run_cli(args: list[str], runs_dir: Path) -> dict:
    """One `iouctl nms-ablate` in a subprocess; its results.json, wall time and memory timeline."""
    cmd = [sys.executable, "-c", "import sys; from iouctl.cli import main; sys.argv[0] = 'iouctl'; main()",
           "nms-ablate", *args, f"paths.runs_dir={runs_dir}"]
    samples: list[tuple[float, float, float]] = []
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), *_memory(_tree(proc.pid))))
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    done.set()
    th.join()
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"nms-ablate failed ({proc.returncode}):\n{err[-3000:]}")
    (res,) = list(runs_dir.glob("nms-ablate/*/results.json"))
    out = json.loads(res.read_text())
    return {"results": out, "wall_s": wall, "samples": samples, "start": t0, "load": (load_before, os.getloadavg())}


def phase_memory(run: dict) -> dict[str, tuple[float, float]]:
    """Peak (PSS, RSS sum) MiB sampled during each phase (phases end at their recorded end_unix)."""
    out, start = {}, run["start"]
    for name, p in run["results"]["phases"].items():
        inside = [(pss, rss) for t, pss, rss in run["samples"] if start <= t <= p["end_unix"]]
        out[name] = tuple(max((s[j] for s in inside), default=float("nan")) for j in (0, 1))
        start = p["end_unix"]
    return out


def report(label: str, run: dict) -> dict:
    res = run["results"]
    mem = phase_memory(run)
    peak_pss = max((s[1] for s in run["samples"]), default=float("nan"))
    peak_rss = max((s[2] for s in run["samples"]), default=float("nan"))
    cpu = sum(p["cpu_s"] for p in res["phases"].values())
    print(f"\n{label}: {len(res['arms'])} arms, {res['workers']} worker(s), arms evaluated by "
          f"{res.get('arm_evaluator')}; wall {run['wall_s']:.1f} s (process), CPU {cpu:.1f} s (phases, from the "
          f"engine's start); peak memory of the process tree: PSS {peak_pss:.0f} MiB, RSS sum {peak_rss:.0f} MiB; "
          f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in run['load'][0])}, after "
          f"{'/'.join(f'{x:.1f}' for x in run['load'][1])}")
    print(f"  {'phase':<22}{'wall s':>9}{'CPU s':>9}{'peak PSS MiB':>14}{'peak RSS MiB':>14}")
    for name, p in res["phases"].items():
        print(f"  {name:<22}{p['wall_s']:9.1f}{p['cpu_s']:9.1f}{mem[name][0]:14.0f}{mem[name][1]:14.0f}")
        for sub, q in (p.get("per_arm_phase") or {}).items():
            print(f"    {sub:<20}{q['wall_s']:9.1f}{q['cpu_s']:9.1f}   (summed over arms)")
    return {"wall_s": run["wall_s"], "cpu_s": cpu, "peak_pss_mib": peak_pss, "peak_rss_sum_mib": peak_rss,
            "phases": res["phases"], "phase_peak_mib": mem, "load_average": run["load"],
            "arm_evaluator": res.get("arm_evaluator")}


def same_results(a: dict, b: dict) -> list[str]:
    """Keys of results.json that differ between two runs (timings excluded)."""
    def strip(r: dict) -> dict:
        r = {k: r[k] for k in COMPARED}
        r["arms"] = [{k: v for k, v in arm.items() if k != "seconds"} for arm in r["arms"]]
        return r

    sa, sb = strip(a), strip(b)
    return [k for k in COMPARED if sa[k] != sb[k]]


def evaluator_ratio(npz: Path, data_root: Path, repeats: int) -> dict:
    """One arm's evaluation (greedy NMS at 0.5 on the split's raw detections, 100 per image) by faster-coco-eval and
    by cocoeval_arrays in this process, one thread: median CPU seconds of `repeats`, and whether the metrics are
    identical."""
    import statistics

    import torch

    from iouctl.analysis import evaluate, load_gt
    from iouctl.analysis.cocoeval_arrays import evaluate_arrays, gt_arrays
    from iouctl.data.detections import Detections
    from iouctl.postprocess.suppression import GreedyNMS

    torch.set_num_threads(1)
    g = load_gt(data_root / "annotations" / "val.json")
    raw = Detections.load(npz)
    out = GreedyNMS(0.5).keep(raw).apply(raw)
    g.coco("faster-coco-eval"), gt_arrays(g)  # the ground truth's indexes, built once as nms-ablate does
    times: dict[str, list[float]] = {"faster-coco-eval": [], "cocoeval-arrays": []}
    got = {}
    for _ in range(repeats):
        for name, fn in (("faster-coco-eval", lambda: evaluate(g, out, backend="faster-coco-eval")),
                         ("cocoeval-arrays", lambda: evaluate_arrays(g, out))):
            t = time.process_time()
            got[name] = fn()
            times[name].append(time.process_time() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = got["faster-coco-eval"] == got["cocoeval-arrays"]
    print(f"one arm's evaluation ({len(out)} detections after greedy NMS), median CPU s of {repeats}: faster-coco-eval "
          f"{med['faster-coco-eval']:.2f}, cocoeval-arrays {med['cocoeval-arrays']:.2f} "
          f"({med['faster-coco-eval'] / med['cocoeval-arrays']:.1f}x); metrics identical: {same}")
    return {"median_cpu_s": med, "identical": same, "detections": len(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", action="store_true", help="the COCO-sized case")
    ap.add_argument("--builtin", action="store_true", help="the built-in val split, --synthetic")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--per-image", type=float, default=1000.0, help="raw detections per image")
    ap.add_argument("--per-gt", type=int, default=64, help="jittered detections per object (the rest: background)")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", help="folder for the dataset and runs (default: a temporary one)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--evaluator", type=int, metavar="REPEATS", default=0,
                    help="with --coco: only time one arm's evaluation, faster-coco-eval vs cocoeval-arrays")
    ap.add_argument("overrides", nargs="*", help="more nms-ablate overrides, e.g. analyses=[]")
    args = ap.parse_args()
    if not (args.coco or args.builtin):
        ap.error("give --coco and/or --builtin")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-nms-ablate-"))
    out: dict = {}
    cases = []
    if args.builtin:
        cases.append(("builtin", ["--synthetic", *args.overrides]))
    if args.coco:
        t = time.perf_counter()
        npz = coco_split(work / "coco", args.images, args.per_image, args.per_gt, args.classes)
        print(f"  (built in {time.perf_counter() - t:.0f} s)")
        if args.evaluator:
            out["evaluator"] = evaluator_ratio(npz, work / "coco" / "data", args.evaluator)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            sys.exit(0 if out["evaluator"]["identical"] else 1)
        cases.append(("coco", [f"run={npz}", "data=coco", f"data.root={work / 'coco' / 'data'}", *args.overrides]))
    failed = False
    for case, cli in cases:
        runs = {}
        for w in args.workers:
            runs[w] = run_cli([*cli, f"workers={w}"], work / f"runs-{case}-{w}-{time.strftime('%Y%m%d-%H%M%S')}")
            out.setdefault(case, {})[w] = report(f"{case}, workers={w}", runs[w])
        first = args.workers[0]
        for w in args.workers[1:]:
            diff = same_results(runs[first]["results"], runs[w]["results"])
            same = "identical results" if not diff else f"DIFFER in {diff}"
            print(f"{case}: workers={w} vs workers={first}: {same}")
            failed |= bool(diff)
            arms_first = runs[first]["results"]["phases"]["arms"]
            arms_w = runs[w]["results"]["phases"]["arms"]
            print(f"  arms phase wall {arms_w['wall_s']:.1f} s vs {arms_first['wall_s']:.1f} s: "
                  f"{arms_first['wall_s'] / arms_w['wall_s']:.2f}x faster; CPU {arms_w['cpu_s']:.1f} vs "
                  f"{arms_first['cpu_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
