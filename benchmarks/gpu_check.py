"""One GPU check (issue 14): the kernels, their benchmarks and short CUDA training runs, into one report.

    bash benchmarks/gpu_check.sh OUT                  # or: python benchmarks/gpu_check.py --out OUT

Writes OUT/gpu_check.json (one file; every other output goes to a temp folder) and prints a summary. Sections, each
with a status ("ok", "failed" or "skipped: <why>"), its seconds and the peak GPU memory it allocated:

- environment: torch / torchvision / CUDA versions, the GPU's name and capability, the git commit.
- build: the kernel libraries built with CUDA (first use compiles for the visible GPU), which implementation each op
  resolved to.
- tests: ``pytest -m cuda tests/ops`` (CUDA vs CPU kernel equality in every dtype, gradients, opcheck,
  torch.compile, checks, read-backs), counts and the failures' tails.
- pool: PrRoI vs torchvision roi_align on CUDA at the issue-3 shapes (features [2, 256, 100, 152], stride 8, 512 RoIs,
  7x7, proposal-like sizes): forward and forward+backward (PrRoI also differentiates the boxes), median of CUDA-event
  timings; CUDA vs CPU agreement per dtype; and, when ``rich`` is importable, the ``bench-pool --impl all`` sweep.
- nms: the NMS ops on CUDA vs torchvision's CUDA nms / batched_nms (N = 5000; N = 20000 with 80 classes), keep sets
  checked against the CPU kernels.
- train, torchrun, refine: ``iouctl train model=iou_net device=cuda`` (AMP, tiny schedule), the same under a 1-process
  ``torchrun`` (and an nccl all_reduce in that process), ``iouctl refine`` of that run on CUDA; peak memory of each.
  Skipped when hydra / omegaconf / typer are not importable: the kernel part needs only torch and torchvision.

Without a GPU every CUDA section says "skipped: no GPU" (a dry run). ``--device cpu`` runs the kernel sections on the
CPU at tiny sizes to check the script itself (its figures are not GPU figures). The whole run keeps to --budget-s
(default 450 s, under the 8 minutes it is given on one H100/H200): a section that would start past it is skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torchvision  # noqa: E402

REPORT = "gpu_check.json"
TRAIN_MODULES = ("hydra", "omegaconf", "typer")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def section(report: dict, name: str, fn, budget: Budget, device: str, need_s: float, skip: str | None = None):
    """Run one section into report["sections"][name]; a failure is recorded with its traceback, never raised."""
    entry: dict = {}
    report["sections"][name] = entry
    if skip is None and budget.left() < need_s:
        skip = f"time budget: {budget.left():.0f} s left, the section needs ~{need_s:.0f} s"
    if skip is not None:
        entry["status"] = f"skipped: {skip}"
        print(f"[{name}] {entry['status']}", flush=True)
        return entry
    print(f"[{name}] running", flush=True)
    t0 = time.monotonic()
    try:
        _peak_reset(device)
        entry.update(fn() or {})
        entry.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 -- the report carries the failure; later sections still run
        entry["status"] = "failed"
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc()[-4000:]
    entry["seconds"] = round(time.monotonic() - t0, 2)
    peak = _peak_mib(device)
    if peak is not None and "peak_gpu_mib" not in entry:
        entry["peak_gpu_mib"] = round(peak, 1)
    print(f"[{name}] {entry['status']} ({entry['seconds']} s)", flush=True)
    return entry


# ------------------------------------------------------------------------------------------------ environment
def environment(device: str) -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda_runtime": torch.version.cuda, "machine": platform.machine(), "cpus": os.cpu_count(),
            "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                     timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    info["modules"] = {m: importlib.util.find_spec(m) is not None
                       for m in ("ninja", "rich", "pytest", "hypothesis", *TRAIN_MODULES, "pycocotools", "wandb")}
    return info


# ------------------------------------------------------------------------------------------------------ build
def build(budget: Budget) -> dict:
    from iouctl.ops import _extension

    # first use compiles: the libraries build side by side in processes of their own (into the shared kernel cache),
    # then load here from the cache
    ops = _extension.kernel_libraries()
    code = "import sys; from iouctl.ops import _extension; sys.exit(0 if _extension.load_library(sys.argv[1]) else 1)"
    t0 = time.monotonic()
    procs = {op: subprocess.Popen([sys.executable, "-c", code, op], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for op in ops}
    notes = {op: p.communicate(timeout=max(30, budget.left() - 120))[1][-2000:] for op, p in procs.items()}
    parallel_s = round(time.monotonic() - t0, 1)
    libs = {}
    for op in ops:
        folder = _extension.kernels_dir() / op
        t0 = time.monotonic()
        ok = _extension.load_library(folder.name)
        log = _extension.build_log(folder.name)
        entry = {"loaded": ok, "seconds": round(time.monotonic() - t0, 1), "build_log": str(log) if log else None,
                 "cuda_kernels": ok and any(_extension.has_kernel(f"iouctl::{op}", "cuda")
                                            for op in ("prroi_pool", "iou_guided_nms"))}
        if not ok:
            entry["stderr_tail"] = notes[op]
            if log and Path(log).is_file():
                entry["log_tail"] = Path(log).read_text(errors="replace")[-3000:]
        libs[folder.name] = entry
    failed = [k for k, v in libs.items() if not v["loaded"]]
    return {"status": "failed" if failed else "ok", "build_seconds": parallel_s, "libraries": libs}


# ------------------------------------------------------------------------------------------------------ tests
def tests(budget: Budget) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/ops", "-q", "-p", "no:cacheprovider", "-rfE"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, min(240, budget.left() - 200)))
    out = r.stdout + r.stderr
    summary = next((ln for ln in reversed(out.strip().splitlines()) if " in " in ln and ("passed" in ln or
                                                                                         "failed" in ln or
                                                                                         "error" in ln)), "")
    return {"status": "ok" if r.returncode == 0 else "failed", "returncode": r.returncode, "summary": summary,
            "command": " ".join(cmd[1:]), "output_tail": out[-6000:] if r.returncode else out[-800:]}


# ------------------------------------------------------------------------------------------------------- pool
def _cuda_time(fn, repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def _interleaved(fns: dict, repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median ms per contender; each round runs every contender once."""
    for f in fns.values():
        _cuda_time(f, 0, warmup, device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k] += _cuda_time(f, 1, 0, device)
    return {k: statistics.median(v) for k, v in times.items()}


def pool(device: str, smoke: bool, budget: Budget) -> dict:
    from torchvision.ops import roi_align

    from iouctl.engine.bench_pool import MIXED, make_boxes
    from iouctl.ops import _extension, prroi_pool

    impl = "cuda" if device == "cuda" else "cpp"
    N, C, H, W = (1, 8, 20, 30) if smoke else (2, 256, 100, 152)
    K, stride, size = (32 if smoke else 512), 8, 7
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=gen).to(device)
    rois = make_boxes(K, MIXED, N, (H * stride, W * stride), gen).to(device)
    g = torch.randn(K, C, size, size, generator=gen).to(device)

    def prroi_fb():
        xx, rr = x.detach().requires_grad_(), rois.detach().requires_grad_()
        prroi_pool(xx, rr, size, 1 / stride, impl=impl).backward(g)

    def align_fb():
        xx = x.detach().requires_grad_()
        roi_align(xx, rois, size, 1 / stride, sampling_ratio=2, aligned=True).backward(g)

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    repeats = 5 if smoke else 21
    med = _interleaved({
        "prroi_forward": fwd(lambda: prroi_pool(x, rois, size, 1 / stride, impl=impl)),
        "roi_align_forward": fwd(lambda: roi_align(x, rois, size, 1 / stride, sampling_ratio=2, aligned=True)),
        "prroi_forward_backward": prroi_fb, "roi_align_forward_backward": align_fb}, repeats, 3, device)
    ratio = med["prroi_forward_backward"] / med["roi_align_forward_backward"]
    out = {"shape": [N, C, H, W], "num_rois": K, "output_size": size, "stride": stride, "roi_sizes": MIXED,
           "repeats": repeats, "median_ms": {k: round(v, 4) for k, v in med.items()},
           "ratio_forward_backward": round(ratio, 3),
           "ratio_forward": round(med["prroi_forward"] / med["roi_align_forward"], 3),
           "target": "forward+backward <= 1.0x roi_align", "meets_target": ratio <= 1.0,
           "impl": _extension.implementations().get("prroi_pool")}
    out["agreement"] = _pool_agreement(device)
    if not smoke and importlib.util.find_spec("rich") is not None and budget.left() > 240:
        out["bench_pool_all"] = _bench_pool_all(device)
    return out


def _pool_agreement(device: str) -> dict:
    """Per dtype: the device kernel vs the CPU (float32/64: forward and gradients relative to their scale; half:
    box gradients per RoI relative to float64 at the same rounded inputs, the issue's 1e-2)."""
    from iouctl.engine.bench_pool import MIXED, make_boxes
    from iouctl.ops import prroi_pool

    impl = "cuda" if device == "cuda" else "direct"
    gen = torch.Generator().manual_seed(1)
    N, C, H, W, K, size, scale = 2, 16, 25, 38, 96, 7, 1 / 8
    x0 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    r0 = make_boxes(K, MIXED, N, (H * 8, W * 8), gen).double()
    r0[::8, 3] = r0[::8, 1] + 0.05  # some thin boxes: bins of ~1e-3 cells
    g0 = torch.randn(K, C, size, size, generator=gen, dtype=torch.float64)
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x, r, g = x0.to(dtype), r0.to(dtype), g0.to(dtype)
        ref_impl = "cpp" if dtype in (torch.float32, torch.float64) else "reference"
        xr = (x if dtype in (torch.float32, torch.float64) else x.double()).requires_grad_()
        rr = (r if dtype in (torch.float32, torch.float64) else r.double()).requires_grad_()
        ref = prroi_pool(xr, rr, size, scale, impl=ref_impl)
        ref.backward(g.to(ref.dtype))
        xd = x.detach().to(device).clone().requires_grad_()  # its own leaf and .grad, also on the CPU
        rd = r.detach().to(device).clone().requires_grad_()
        got = prroi_pool(xd, rd, size, scale, impl=impl)
        got.backward(g.to(device))
        rel = lambda a, b: float((a.double().cpu() - b.double()).abs().max() / b.double().abs().max())
        box_ref, box = rr.grad.double()[:, 1:], rd.grad.double().cpu()[:, 1:]
        live = box_ref.abs().amax(1) > 0
        per_roi = ((box - box_ref).abs().amax(1)[live] / box_ref.abs().amax(1)[live]).max().item()
        out[str(dtype).removeprefix("torch.")] = {
            "vs": f"{ref_impl} ({'float64' if ref_impl == 'reference' else str(dtype).removeprefix('torch.')})",
            "forward": rel(got.detach(), ref.detach()), "input_grad": rel(xd.grad, xr.grad),
            "box_grad_per_roi_max": per_roi}
    return out


def _bench_pool_all(device: str) -> dict:
    """The bench-pool engine's sweep (all implementations, RoI sizes mixed and 32..512) on the device."""
    from bench_pool import DirRun

    from iouctl.engine.bench_pool import run_bench_pool

    with tempfile.TemporaryDirectory() as d:
        rows = run_bench_pool(DirRun(Path(d)), impls=["all"], devices=[device], repeats=11, warmup=2)
    return {"rows": rows}


# -------------------------------------------------------------------------------------------------------- nms
def nms(device: str, smoke: bool) -> dict:
    from bench_nms import realistic_detections

    from iouctl.ops import _extension
    from iouctl.ops.nms import batched_iou_guided_nms, iou_guided_nms, soft_nms

    impl = "cuda" if device == "cuda" else "cpp"
    tv = torchvision.ops
    out: dict = {}
    n1, c1 = (500, 30) if smoke else (5000, 300)
    n2, c2 = (2000, 120) if smoke else (20000, 1200)
    repeats = 5 if smoke else 21

    def sync(f):
        def run():
            f()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    b, s, iou, _ = (t.to(device) for t in realistic_detections(n1, c1, seed=0))
    cpu = [t.cpu() for t in (b, s, iou)]
    same = torch.equal(iou_guided_nms(b, s, iou, 0.5, impl=impl)[0].cpu(), iou_guided_nms(*cpu, 0.5)[0])
    med = _interleaved({"torchvision nms": sync(lambda: tv.nms(b, iou, 0.5)),
                        "iou_guided_nms": sync(lambda: iou_guided_nms(b, s, iou, 0.5, impl=impl)),
                        "soft_nms gaussian": sync(lambda: soft_nms(b, s, "gaussian", 0.5, 0.3, 0.001))},
                       repeats, 3, device)
    out[f"N={n1}"] = {"median_ms": {k: round(v, 4) for k, v in med.items()}, "equal_to_cpu_kernel": same,
                      "ratio_iou_guided": round(med["iou_guided_nms"] / med["torchvision nms"], 3),
                      "ratio_soft_gaussian": round(med["soft_nms gaussian"] / med["torchvision nms"], 3)}

    b, s, iou, lab = (t.to(device) for t in realistic_detections(n2, c2, classes=80, seed=1))
    cpu = [t.cpu() for t in (b, s, iou, lab)]
    got = batched_iou_guided_nms(b, s, iou, lab, 0.5, impl=impl)
    want = batched_iou_guided_nms(*cpu, 0.5)
    same = torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    med = _interleaved({"torchvision batched_nms": sync(lambda: tv.batched_nms(b, iou, lab, 0.5)),
                        "batched_iou_guided_nms": sync(lambda: batched_iou_guided_nms(b, s, iou, lab, 0.5,
                                                                                      impl=impl))},
                       repeats, 3, device)
    ratio = med["batched_iou_guided_nms"] / med["torchvision batched_nms"]
    out[f"N={n2}, 80 classes"] = {"median_ms": {k: round(v, 4) for k, v in med.items()}, "equal_to_cpu_kernel": same,
                                  "ratio": round(ratio, 3), "target": "<= 1.3x torchvision batched_nms",
                                  "meets_target": ratio <= 1.3}
    out["impls"] = {k: v for k, v in _extension.implementations().items() if "nms" in k}
    out["status"] = "ok" if all(v.get("equal_to_cpu_kernel", True) for v in out.values()
                                if isinstance(v, dict)) else "failed"
    return out


# ---------------------------------------------------------------------------------------------- training part
def _run_iouctl(args: list[str], work: Path, peak_file: Path, budget: Budget, launcher: list[str] | None = None,
                limit: float = 150) -> dict:
    """Runs ``iouctl <args>`` (through --worker, which records the process's peak GPU memory) under ``launcher``."""
    worker = [str(Path(__file__).resolve()), "--worker", str(peak_file), "--"] + args
    cmd = (launcher or [sys.executable]) + worker
    env = {**os.environ, "IOUCTL_RUNS_DIR": str(work / "runs"), "IOUCTL_CACHE_DIR": str(work / "cache"),
           "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                       timeout=max(20, min(limit, budget.left() - 5)))
    out = {"command": " ".join(["iouctl"] + args) if launcher is None else " ".join(launcher[1:] + ["iouctl"] + args),
           "returncode": r.returncode, "seconds": round(time.monotonic() - t0, 1)}
    if peak_file.is_file():
        out.update(json.loads(peak_file.read_text()))
    if r.returncode != 0:
        out["output_tail"] = (r.stdout + r.stderr)[-4000:]
    out["status"] = "ok" if r.returncode == 0 else "failed"
    return out


TRAIN_ARGS = ["train", "experiment=tiny", "model=iou_net", "device=cuda", "amp=true", "schedule.max_iters=20",
              "schedule.lr_steps=[15]", "eval_every=20", "checkpoint_every=20", "name=gpu_check"]


def train(work: Path, budget: Budget) -> dict:
    out = _run_iouctl(TRAIN_ARGS, work, work / "peak_train.json", budget)
    runs = sorted((work / "runs" / "train").glob("*")) if (work / "runs" / "train").is_dir() else []
    out["run"] = str(runs[-1]) if runs else None
    if runs and (runs[-1] / "meta.json").is_file():
        out["meta"] = json.loads((runs[-1] / "meta.json").read_text())
    return out


def torchrun(work: Path, budget: Budget) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return _run_iouctl(TRAIN_ARGS[:-1] + ["name=gpu_check_torchrun"], work, work / "peak_torchrun.json", budget,
                       launcher)


def refine(work: Path, budget: Budget, trained: str | None) -> dict:
    if trained is None:
        return {"status": "skipped: the train section made no run"}
    return _run_iouctl(["refine", f"run={trained}", "device=cuda"], work, work / "peak_refine.json", budget)


def worker(peak_file: Path, args: list[str]) -> None:
    """Runs the iouctl CLI in this process, then writes its peak GPU memory (and, under torchrun, the result of an
    nccl all_reduce) to ``peak_file``."""
    import atexit

    facts: dict = {}
    if "RANK" in os.environ and torch.cuda.is_available():
        import torch.distributed as dist

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
        t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
        dist.all_reduce(t)
        facts["nccl_all_reduce"] = {"world_size": dist.get_world_size(), "result": t.tolist()}
        dist.destroy_process_group()  # the engine sets up its own group as it would without this probe

    def record():
        if torch.cuda.is_available():
            facts["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            facts["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        else:
            facts["peak_gpu_mib"] = None
        peak_file.write_text(json.dumps(facts))

    atexit.register(record)
    sys.argv = ["iouctl", *args]
    from iouctl.cli import main

    main()


# ------------------------------------------------------------------------------------------------------- main
def summarize(report: dict) -> str:
    lines = [f"GPU check: {report['environment'].get('gpu', 'no GPU')} ({report['environment']['device']})"]
    for name, entry in report["sections"].items():
        line = f"  {name:<10} {entry.get('status')}"
        if "seconds" in entry:
            line += f"  {entry['seconds']} s"
        if entry.get("peak_gpu_mib") is not None:
            line += f"  peak {entry['peak_gpu_mib']} MiB"
        if name == "pool" and "ratio_forward_backward" in entry:
            line += f"  PrRoI fwd+bwd {entry['ratio_forward_backward']}x roi_align"
        if name == "nms":
            key = next((k for k in entry if k.endswith("80 classes")), None)
            if key:
                line += f"  batched {entry[key]['ratio']}x torchvision"
        if name == "tests" and entry.get("summary"):
            line += f"  {entry['summary']}"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        rest = sys.argv[3:]
        worker(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder of the report (gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto",
                    help="cpu: run the kernel sections on the CPU at tiny sizes (checks this script, not the GPU)")
    a = ap.parse_args()
    smoke = a.device == "cpu"
    has_gpu = torch.cuda.is_available()
    device = "cuda" if has_gpu and not smoke else "cpu"
    budget = Budget(a.budget_s)
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"issue": 14, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke_cpu": smoke,
                    "environment": environment(device), "sections": {}}
    no_gpu = None if (has_gpu or smoke) else "no GPU"
    gpu_only = None if has_gpu else "no GPU"
    if smoke:
        gpu_only = "smoke run on the CPU"
    section(report, "build", lambda: build(budget), budget, device, 60, skip=None if (has_gpu or smoke) else "no GPU")
    section(report, "tests", lambda: tests(budget), budget, device, 90, skip=gpu_only)
    section(report, "pool", lambda: pool(device, smoke, budget), budget, device, 40, skip=no_gpu)
    section(report, "nms", lambda: nms(device, smoke), budget, device, 30, skip=no_gpu)
    missing = [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]
    train_skip = gpu_only or (f"{', '.join(missing)} not importable (the kernel part above ran without them)"
                              if missing else None)
    with tempfile.TemporaryDirectory(prefix="iouctl-gpu-check-") as tmp:
        work = Path(tmp)
        trained = section(report, "train", lambda: train(work, budget), budget, device, 60, skip=train_skip)
        section(report, "torchrun", lambda: torchrun(work, budget), budget, device, 60, skip=train_skip)
        section(report, "refine", lambda: refine(work, budget, trained.get("run")), budget, device, 30,
                skip=train_skip)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = a.out / REPORT
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp_path, path)
    print(summarize(report))
    print(f"report: {path}")
    failed = [k for k, v in report["sections"].items() if v.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
