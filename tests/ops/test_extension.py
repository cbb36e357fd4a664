"""The kernel loader: where builds go, what keys them, process state during a build, what each op resolved to, and
the CUDA compile check."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from iouctl.ops import _extension, batched_iou_guided_nms, prroi_pool

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_cache_has_its_own_variable(tmp_path, monkeypatch):
    # datasets move with IOUCTL_CACHE_DIR; compiled kernels stay put unless IOUCTL_KERNEL_CACHE says otherwise
    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "datasets"))
    monkeypatch.delenv("IOUCTL_KERNEL_CACHE", raising=False)
    assert _extension.cache_root() == Path("~/.cache/iouctl/torch_extensions").expanduser()
    monkeypatch.setenv("IOUCTL_KERNEL_CACHE", str(tmp_path / "kernels"))
    assert _extension.cache_root() == tmp_path / "kernels"


def _tree(root: Path, header: str = "#define VALUE 1\n") -> Path:
    """kernels/ with two op folders and a shared header folder."""
    for op in ("op_a", "op_b"):
        (root / op).mkdir(parents=True)
        (root / op / f"{op}.cpp").write_text(f'#include "shared/value.h"\n// {op}\n')
    (root / "shared").mkdir()
    (root / "shared" / "value.h").write_text(header)
    return root


def _key(op: str) -> str:
    _, keyed = _extension._sources(op, with_cuda=False)
    return _extension._build_key(op, keyed, with_cuda=False)


def test_build_key_covers_every_header_under_kernels(tmp_path, monkeypatch):
    root = _tree(tmp_path / "kernels")
    monkeypatch.setattr(_extension, "kernels_dir", lambda: root)
    before = {op: _key(op) for op in ("op_a", "op_b")}
    compiled, keyed = _extension._sources("op_a", with_cuda=False)
    assert compiled == [root / "op_a" / "op_a.cpp"]  # another folder's sources are not compiled in
    assert root / "shared" / "value.h" in keyed
    (root / "shared" / "value.h").write_text("#define VALUE 2\n")
    after = {op: _key(op) for op in ("op_a", "op_b")}
    assert all(after[op] != before[op] for op in before)  # a shared header's edit rebuilds every library
    (root / "op_b" / "value.h").write_text("#define VALUE 2\n")
    (root / "shared" / "value.h").unlink()
    assert _key("op_a") != after["op_a"]  # same content, another folder: the include path resolves differently


@pytest.mark.slow
def test_cross_folder_include_builds_and_an_edit_rebuilds(tmp_path):
    # a library includes a header of another folder ("shared/value.h"); editing the header changes the loaded op
    root = tmp_path / "kernels"
    (root / "op_a").mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "op_a" / "op_a.cpp").write_text(textwrap.dedent("""
        #include <torch/library.h>
        #include "shared/value.h"
        at::Tensor shared_value(const at::Tensor& x) { return x.add(VALUE); }
        TORCH_LIBRARY_FRAGMENT(iouctl, m) { m.def("shared_value(Tensor x) -> Tensor"); }
        TORCH_LIBRARY_IMPL(iouctl, CPU, m) { m.impl("shared_value", &shared_value); }
    """))
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from iouctl.ops import _extension
        _extension.kernels_dir = lambda: Path({str(root)!r})
        assert _extension.load_library("op_a")
        print(float(torch.ops.iouctl.shared_value(torch.tensor(0.0))))
    """)
    env = {**os.environ, "IOUCTL_KERNEL_CACHE": str(tmp_path / "cache")}
    values = []
    for v in (1, 2):
        (root / "shared" / "value.h").write_text(f"#define VALUE {v}\n")
        r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        values.append(r.stdout.strip().splitlines()[-1])
    assert values == ["1.0", "2.0"]
    assert len(list((tmp_path / "cache").iterdir())) == 2


class _FakeExtension:
    """The slice of torch.utils.cpp_extension the loader touches, failing like a compiler would."""

    CUDA_HOME = None

    def __init__(self, fail: bool):
        self.fail = fail
        self.seen_path = self.seen_home = None

    def load(self, **kwargs):
        self.seen_path, self.seen_home = os.environ["PATH"], self.CUDA_HOME
        os.write(1, b"compiler says: no\n")  # to fd 1, as ninja's child processes write
        if self.fail:
            raise RuntimeError("Error building extension")


@pytest.mark.parametrize("fail", [True, False])
def test_build_state_is_restored_also_on_failure(tmp_path, monkeypatch, fail):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("CUDA_HOME", "/opt/somewhere")
    fake = _FakeExtension(fail)
    fd1 = os.fstat(1)
    log = tmp_path / "build.log"
    from rich.console import Console

    console = Console(file=open(os.devnull, "w"))
    try:
        with _extension._build_environment(fake, with_cuda=True):
            _extension._compile(fake, console, "iouctl_x", [], tmp_path, log, with_cuda=True)
    except RuntimeError as e:
        assert fail and "Error building extension" in str(e)
    else:
        assert not fail
    assert fake.seen_path != "/usr/bin:/bin" and fake.seen_path.endswith("/usr/bin:/bin")  # ninja's folder added
    assert os.environ["PATH"] == "/usr/bin:/bin" and os.environ["CUDA_HOME"] == "/opt/somewhere"
    if Path("/usr/local/cuda/include/cuda_runtime.h").is_file():
        assert fake.seen_home == "/usr/local/cuda"  # the build's guess was fixed for the build...
    assert fake.CUDA_HOME is None  # ...and only for the build
    after = os.fstat(1)
    assert (after.st_dev, after.st_ino) == (fd1.st_dev, fd1.st_ino)  # fd 1 points where it did
    assert "compiler says: no" in log.read_text()


def test_implementations_report_what_each_op_resolved_to(monkeypatch):
    x, rois = torch.randn(1, 2, 5, 5), torch.tensor([[0, 0.5, 0.5, 3.0, 4.0]])
    prroi_pool(x, rois, 2)
    prroi_pool(x, rois, 2, impl="direct")
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]])
    batched_iou_guided_nms(b, torch.rand(2), torch.rand(2), torch.zeros(2, dtype=torch.long), 0.5)
    impls = _extension.implementations()
    assert impls["prroi_pool"]["impl"] == "direct"  # the latest resolution
    assert impls["prroi_pool"]["devices"] == {"cpu": "direct"}
    nms = impls["batched_iou_guided_nms"]
    assert nms["impl"] == "cpp" and nms["library"] == "nms" and not nms["build_failed"]
    assert Path(nms["build_log"]).is_file()
    import json

    json.dumps(impls)  # goes into meta.json as is

    # a library whose build failed: 'auto' falls back, and the report says so, with the log
    log = Path("/nonexistent/build.log")

    def failed_load(op):
        _extension._logs[op] = log
        return False

    monkeypatch.setattr(_extension, "_load", failed_load)
    try:
        assert _extension.select_impl("broken_lib", "auto", "cpu", "broken_op") == "reference"
        entry = _extension.implementations()["broken_op"]
    finally:
        for state, key in ((_extension._loaded, "broken_lib"), (_extension._logs, "broken_lib"),
                           (_extension._resolved, "broken_op")):
            state.pop(key, None)
    assert entry == {"impl": "reference", "devices": {"cpu": "reference"}, "library": "broken_lib",
                     "build_failed": True, "build_log": str(log)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA compile check needs it")
def test_cuda_compile_check_reports_compile_errors(tmp_path):
    # the check itself, on a small tree (the real .cu files are compiled by .ci/run): a good and a broken source
    root = tmp_path / "kernels"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / "good" / "good.cu").write_text("__global__ void twice(float* x) { x[threadIdx.x] *= 2; }\n")
    (root / "bad" / "bad.cu").write_text("__global__ void twice(float* x) { x[threadIdx.x] *= 2 }\n")  # no ';'
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from iouctl.ops import _extension
        _extension.kernels_dir = lambda: Path({str(root)!r})
        sys.exit(_extension.main(["--check-cuda", "8.0", "--build-dir", {str(tmp_path / "build")!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = sorted(r.stdout.strip().splitlines())
    assert lines[0].startswith("bad: FAILED") and lines[1].startswith("good: compiled"), r.stdout
    assert "error" in (tmp_path / "build" / "bad" / "build.log").read_text().lower()
    assert (tmp_path / "build" / "good" / "good.cuda.o").is_file()
