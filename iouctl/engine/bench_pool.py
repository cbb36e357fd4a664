"""``iouctl bench-pool``: time PrRoI pooling against torchvision's roi_align / roi_pool.

Timing: warm-up calls first, then ``repeats`` rounds; each round runs every (RoI size, implementation) once in turn
(so drifting machine load hits all of them alike) and the median per case is reported. CPU times are wall-clock
(``time.perf_counter``); CUDA times come from CUDA events on the current stream. Ratios are to torchvision
``roi_align(sampling_ratio=2, aligned=True)`` at the same device, phase, RoI count and RoI size.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

IMPLS = ("prroi", "prroi_reference", "roi_align", "roi_align_adaptive", "roi_pool")
BASELINE = "roi_align"
PHASES = ("forward", "forward_backward")
MIXED = "mixed"  # proposal-like: log-uniform sides in [32, 512] image pixels, aspect ratios in [1/2, 2]


def _impls(impls: Sequence[str]) -> list[str]:
    chosen = list(IMPLS) if "all" in impls else list(dict.fromkeys(impls))
    bad = [i for i in chosen if i not in IMPLS]
    if bad or not chosen:
        raise ValueError(f"unknown impl {bad[0] if bad else '(none)'!r}; valid: all, {', '.join(IMPLS)}")
    if BASELINE not in chosen:  # every ratio is to roi_align
        chosen.append(BASELINE)
    return chosen


def _devices(devices: Sequence[str]) -> list[str]:
    out = []
    for d in devices:
        if d == "auto":
            out += ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        elif d in ("cpu", "cuda"):
            if d == "cuda" and not torch.cuda.is_available():
                raise ValueError("device 'cuda' requested but no CUDA GPU is visible; valid here: cpu, auto")
            out.append(d)
        else:
            raise ValueError(f"unknown device {d!r}; valid: cpu, cuda, auto")
    return list(dict.fromkeys(out))


def make_boxes(num_rois: int, roi_size: float | str, batch: int, image_hw: tuple[int, int],
               gen: torch.Generator) -> Tensor:
    """Tensor[K, 5] (batch index, x1, y1, x2, y2) in image pixels: centres uniform over the image (boxes may cross
    its border), area of a square of side ``roi_size`` (or the 'mixed' proposal-like law), aspect ratio in [1/2, 2]."""
    u = lambda: torch.rand(num_rois, generator=gen, dtype=torch.float64)
    H, W = image_hw
    if roi_size == MIXED:
        side = torch.exp(math.log(32) + u() * math.log(512 / 32))
    else:
        side = torch.full((num_rois,), float(roi_size), dtype=torch.float64)
    aspect = torch.exp((u() * 2 - 1) * math.log(2))
    w, h = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = u() * W, u() * H
    b = torch.randint(0, batch, (num_rois,), generator=gen).double()
    return torch.stack([b, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).float()


def _pool_fn(impl: str, device: str, output_size: int, scale: float) -> tuple[Callable, str]:
    """(fn(features, rois) -> Tensor, resolved name) for one implementation."""
    from torchvision.ops import roi_align, roi_pool

    if impl in ("prroi", "prroi_reference"):
        from iouctl.ops import _extension, prroi_pool

        kind = _extension.select_impl("prroi_pool", "auto" if impl == "prroi" else "reference", device)
        return (lambda x, r: prroi_pool(x, r, output_size, scale, impl=kind)), f"prroi[{kind}]"
    if impl == "roi_align":
        return (lambda x, r: roi_align(x, r, output_size, scale, sampling_ratio=2, aligned=True)), "roi_align(sr=2)"
    if impl == "roi_align_adaptive":
        # torchvision: sampling_ratio <= 0 means ceil(roi size / output size) samples per bin and axis
        return (lambda x, r: roi_align(x, r, output_size, scale, sampling_ratio=-1, aligned=True)), \
            "roi_align(adaptive)"
    return (lambda x, r: roi_pool(x, r, output_size, scale)), "roi_pool"


class _Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds for one call of ``fn``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _case(fn: Callable, phase: str, x: Tensor, rois: Tensor, grad: Tensor, box_grad: bool) -> Callable[[], None]:
    if phase == "forward":
        def forward() -> None:
            with torch.no_grad():
                fn(x, rois)
        return forward

    def forward_backward() -> None:
        xx = x.detach().requires_grad_()
        rr = rois.detach().requires_grad_(box_grad)  # prroi also differentiates the boxes; roi_align cannot
        fn(xx, rr).backward(grad)
    return forward_backward


def _machine(devices: list[str]) -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if "cuda" in devices:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_bench_pool(run, impls: Sequence[str] = ("prroi",), devices: Sequence[str] = ("auto",),
                   feature_shape: Sequence[int] = (2, 256, 100, 152), stride: int = 8, output_size: int = 7,
                   num_rois: Sequence[int] = (512,), roi_sizes: Sequence[float | str] = (MIXED, 32, 64, 128, 256, 512),
                   repeats: int = 11, warmup: int = 2, threads: int | None = 2, seed: int = 0) -> list[dict]:
    """Time forward and forward+backward of each implementation over devices x RoI counts x RoI sizes.

    Args:
        run: the run (``console``, ``log``, ``log_table``, ``log_image``, ``write_json``, ``path``, ``progress``).
        impls: subset of ``IMPLS`` or ['all']; 'prroi' is the compiled kernel of the device (its fallback is
            reported as such), roi_align (sampling_ratio 2, aligned) is always added as the baseline.
        devices: 'cpu', 'cuda' or 'auto' (CPU, plus CUDA when present).
        feature_shape: (N, C, H, W) of the feature map; the image is (H * stride, W * stride) pixels.
        num_rois: RoI counts; roi_sizes: square-equivalent sides in image pixels, or 'mixed' (proposal-like).
        threads: CPU threads for the measurement (torch.set_num_threads), None to leave as is.
    Returns:
        One dict per (device, impl, phase, num_rois, roi_size): median/min ms and ratio to roi_align.
    """
    impls_, devices_ = _impls(impls), _devices(devices)
    if len(feature_shape) != 4 or any(int(s) <= 0 for s in feature_shape):
        raise ValueError(f"feature_shape must be 4 positive ints (N, C, H, W); got {list(feature_shape)}")
    if repeats < 1 or warmup < 0 or output_size < 1 or stride < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, output_size >= 1, stride >= 1; got repeats={repeats}, "
                         f"warmup={warmup}, output_size={output_size}, stride={stride}")
    if not num_rois or any(not isinstance(k, int) or k < 1 for k in num_rois):
        raise ValueError(f"num_rois must be a non-empty list of positive ints; got {list(num_rois)}")
    for s in roi_sizes:
        if s != MIXED and not (isinstance(s, (int, float)) and s > 0):
            raise ValueError(f"roi_sizes entries must be positive numbers or '{MIXED}'; got {s!r}")
    N, C, H, W = (int(s) for s in feature_shape)
    scale = 1.0 / stride
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        rows = _measure(run, impls_, devices_, (N, C, H, W), stride, scale, output_size, list(num_rois),
                        list(roi_sizes), repeats, warmup, seed)
        machine = _machine(devices_)
    finally:
        torch.set_num_threads(old_threads)
    summary = _summary(rows, roi_sizes)
    config = {"impls": impls_, "devices": devices_, "feature_shape": [N, C, H, W], "stride": stride,
              "output_size": output_size, "num_rois": list(num_rois), "roi_sizes": list(roi_sizes),
              "repeats": repeats, "warmup": warmup, "threads": threads, "seed": seed}
    _report(run, rows, summary, machine, config)
    return rows


def _measure(run, impls, devices, shape, stride, scale, output_size, num_rois, roi_sizes, repeats, warmup,
             seed) -> list[dict]:
    N, C, H, W = shape
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(seed)
    x_cpu = torch.randn(N, C, H, W, generator=gen)
    with run.progress() as progress:
        task = progress.add_task("bench-pool", total=len(devices) * len(num_rois) * len(PHASES) * repeats)
        for device in devices:
            x = x_cpu.to(device)
            fns = {impl: _pool_fn(impl, device, output_size, scale) for impl in impls}
            timer = _Timer(device)
            for k in num_rois:
                data = {}
                for size in roi_sizes:
                    rois = make_boxes(k, size, N, (H * stride, W * stride), gen).to(device)
                    data[size] = (rois, torch.randn(k, C, output_size, output_size, generator=gen).to(device))
                agreement = _cuda_vs_cpu(fns, x, x_cpu, data, output_size, scale) if device == "cuda" else {}
                for phase in PHASES:
                    cases = {(size, impl): _case(fn, phase, x, *data[size], impl.startswith("prroi"))
                             for size in roi_sizes for impl, (fn, _) in fns.items()}
                    for case in cases.values():
                        for _ in range(warmup):
                            case()
                    times: dict[tuple, list[float]] = {key: [] for key in cases}
                    for rep in range(repeats):
                        progress.update(task, description=f"{device} K={k} {phase} round {rep + 1}/{repeats}")
                        # one round runs every (size, impl) once: load drift hits all of them alike, so both the
                        # ratios to roi_align and the growth with RoI size compare like with like
                        for key, case in cases.items():
                            times[key].append(timer(case))
                        progress.advance(task)
                    for (size, impl), ts in times.items():
                        med, base = statistics.median(ts), statistics.median(times[(size, BASELINE)])
                        rows.append({"device": device, "impl": impl, "resolved": fns[impl][1], "phase": phase,
                                     "num_rois": k, "roi_size": size, "median_ms": med * 1e3,
                                     "min_ms": min(ts) * 1e3, "repeats": repeats,
                                     "ratio_to_roi_align": med / base if base > 0 else math.nan})
                        if impl == "prroi" and size in agreement:
                            rows[-1]["max_rel_diff_vs_cpu"] = agreement[size]
    return rows


def _cuda_vs_cpu(fns, x, x_cpu, data, output_size, scale) -> dict:
    """Per RoI size: max |prroi CUDA - prroi CPU kernel| / max |CPU| (the kernels must agree to float32 precision)."""
    if "prroi" not in fns or fns["prroi"][1] != "prroi[cuda]":
        return {}
    from iouctl.ops import prroi_pool

    out = {}
    with torch.no_grad():
        for size, (rois, _) in data.items():
            a = fns["prroi"][0](x, rois).double().cpu()
            b = prroi_pool(x_cpu, rois.cpu(), output_size, scale).double()
            out[size] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0
    return out


def _summary(rows: list[dict], roi_sizes) -> dict:
    """Worst cost growth for 4x larger RoI sides, per (device, impl, phase, num_rois)."""
    numeric = sorted({float(s) for s in roi_sizes if s != MIXED})
    pairs = [(s, 4 * s) for s in numeric if 4 * s in numeric]
    growth: dict[str, float] = {}
    for r in rows:
        if r["roi_size"] == MIXED or float(r["roi_size"]) not in {a for a, _ in pairs}:
            continue
        big = next(q for q in rows if q["device"] == r["device"] and q["impl"] == r["impl"]
                   and q["phase"] == r["phase"] and q["num_rois"] == r["num_rois"]
                   and q["roi_size"] != MIXED and float(q["roi_size"]) == 4 * float(r["roi_size"]))
        key = f"{r['device']}/{r['impl']}/{r['phase']}/K={r['num_rois']}"
        growth[key] = max(growth.get(key, 0.0), big["median_ms"] / r["median_ms"])
    return {"pairs_4x": pairs, "max_cost_growth_4x_side": growth}


def _report(run, rows: list[dict], summary: dict, machine: dict, config: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    columns = ["device", "impl", "phase", "num_rois", "roi_size", "median_ms", "min_ms", "ratio_to_roi_align"]
    table = Table(title=f"bench-pool ({machine.get('cpu')}, {config['threads'] or machine['threads']} threads"
                        + (f", {machine['gpu']}" if "gpu" in machine else "") + ")")
    for c in ["device", "impl", "phase", "RoIs", "RoI size", "median ms", "min ms", "x roi_align"]:
        table.add_column(c, justify="right" if c not in ("device", "impl", "phase") else "left")
    for r in rows:
        ratio = r["ratio_to_roi_align"]
        style = "" if r["impl"] == BASELINE else ("green" if ratio <= 1.0 else "red")
        table.add_row(r["device"], escape(r["resolved"]), r["phase"], str(r["num_rois"]), str(r["roi_size"]),
                      f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"[{style}]{ratio:.3f}[/]" if style
                      else f"{ratio:.3f}")
    run.console.print(table)
    diffs = [r["max_rel_diff_vs_cpu"] for r in rows if "max_rel_diff_vs_cpu" in r]
    if diffs:
        summary["cuda_vs_cpu_max_rel_diff"] = max(diffs)
        run.console.print(f"prroi CUDA vs CPU kernel, max relative difference: {max(diffs):.2e}")
    for key, g in summary["max_cost_growth_4x_side"].items():
        if key.split("/")[1] == "prroi":
            run.console.print(f"prroi cost growth for 4x larger RoI sides, {key}: {g:.2f}x")
    for i, r in enumerate(rows):
        run.log({f"bench/{r['device']}/{r['impl']}/{r['phase']}/median_ms": r["median_ms"],
                 f"bench/{r['device']}/{r['impl']}/{r['phase']}/ratio_to_roi_align": r["ratio_to_roi_align"],
                 "bench/num_rois": r["num_rois"], "bench/roi_size": str(r["roi_size"])}, step=i)
    run.log_table("bench_pool", columns, [[r[c] if c != "roi_size" else str(r[c]) for c in columns] for r in rows])
    run.write_json("bench_pool.json", {"config": config, "machine": machine, "rows": rows, "summary": summary})
    png = _plot(run, rows)
    if png is not None:
        run.log_image("bench_pool", png)


def _plot(run, rows: list[dict]):
    """Median time vs RoI size (numeric sizes only), one panel per (device, phase), one line per impl."""
    from iouctl.analysis.plots import new_figure, save_png

    panels = sorted({(r["device"], r["phase"], r["num_rois"]) for r in rows if r["roi_size"] != MIXED})
    if not panels:
        return None
    fig = new_figure(5 * len(panels), 4)
    for i, (device, phase, k) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((float(r["roi_size"]), r["median_ms"], r["resolved"]) for r in rows
                         if (r["device"], r["phase"], r["num_rois"], r["impl"]) == (device, phase, k, impl)
                         and r["roi_size"] != MIXED)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pts[0][2])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("RoI side (image pixels)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{device}, {phase}, {k} RoIs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, run.path("plots", "bench_pool.png"))


def bench_pool(cfg, run) -> list[dict]:
    """`iouctl bench-pool`: run_bench_pool with the keys of conf/bench_pool.yaml."""
    run.update_meta(device=",".join(_devices(list(cfg.devices))), dtype="float32",  # what run_bench_pool times with
                    threads=int(cfg.threads) if cfg.threads else torch.get_num_threads())
    return run_bench_pool(
        run, impls=list(cfg.impls), devices=list(cfg.devices), feature_shape=tuple(cfg.feature_shape),
        stride=int(cfg.stride), output_size=int(cfg.output_size), num_rois=[int(k) for k in cfg.num_rois],
        roi_sizes=list(cfg.roi_sizes), repeats=int(cfg.repeats), warmup=int(cfg.warmup), threads=cfg.threads,
        seed=int(cfg.seed),
    )


def run(cfg, run) -> list[dict]:
    """`iouctl bench-pool` on a composed config (conf/bench_pool.yaml) in an open run: one row per op, device, phase,
    RoI count and size (iouctl.engine.bench_pool.run_bench_pool)."""
    return bench_pool(cfg, run)
