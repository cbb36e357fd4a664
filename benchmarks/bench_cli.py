"""Wall time of `iouctl --help` (must stay instant: no torch/torchvision/wandb import), median of repeats,
against `python -c "import torch"` as the peer it avoids.

    python benchmarks/bench_cli.py [--repeats 11]
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args()
    iouctl = shutil.which("iouctl") or sys.exit("iouctl is not on PATH: pip install -e . first")
    help_s = wall([iouctl, "--help"], args.repeats)
    sub_s = wall([iouctl, "nms-ablate", "--help"], args.repeats)
    torch_s = wall([sys.executable, "-c", "import torch"], args.repeats)
    print(f"iouctl --help            median {help_s * 1000:.0f} ms")
    print(f"iouctl nms-ablate --help median {sub_s * 1000:.0f} ms")
    print(f"python -c 'import torch' median {torch_s * 1000:.0f} ms  (ratio help/import torch: {help_s / torch_s:.2f})")


if __name__ == "__main__":
    main()
