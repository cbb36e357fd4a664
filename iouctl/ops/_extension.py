"""Build-on-first-use loader for the C++/CUDA kernels in ``kernels/<op>/`` and the ``impl=`` selector.

Each ``kernels/<op>/`` folder is one shared library. Its sources register their schemas with
``TORCH_LIBRARY_FRAGMENT(iouctl, m)`` (several libraries share the ``iouctl`` namespace) and their kernels with
``TORCH_LIBRARY_IMPL(iouctl, CPU|CUDA, m)``; loading the library makes them visible as ``torch.ops.iouctl.*``.

Sources include the shared per-element math across folders (``#include "nms/nms_math.h"``): ``kernels/`` is on
every library's include path, and every header under ``kernels/`` keys every library's build.

Builds go to ``$IOUCTL_KERNEL_CACHE/<op>_<hash>`` (default ``~/.cache/iouctl/torch_extensions``; deliberately not
under ``$IOUCTL_CACHE_DIR``, so pointing the dataset cache at a temp folder keeps the compiled kernels); the hash
covers the sources, every header, the torch/CUDA/Python versions and the build flags, so an edit or an upgrade never
loads a stale library. A failed build warns once, loudly, naming its log, and callers fall back to the pure-PyTorch
reference. :func:`implementations` says which implementation each op resolved to in this process.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from iouctl.fileio import atomic_write

IMPLS = ("auto", "cpp", "cuda", "reference")

# -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP; at load time the
# extension's libgomp.so.1 resolves to the one torch already loaded, so both share one thread pool
_CXX_FLAGS = ["-O3", "-fopenmp"]
_LD_FLAGS = ["-fopenmp"]
# No --use_fast_math: it flushes denormals and approximates division/exp, and the CUDA kernels are tested equal to the
# CPU ones (NMS bit for bit). The NMS math uses round-to-nearest intrinsics, immune to FMA contraction as well.
_CUDA_FLAGS = ["-O3"]
_SOURCE_SUFFIXES = (".cpp", ".cc")
_CUDA_SUFFIXES = (".cu",)
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh")

_lock = threading.Lock()
_loaded: dict[str, bool] = {}
_logs: dict[str, Path] = {}
_resolved: dict[str, dict] = {}  # op -> what select_impl/record_impl resolved in this process (implementations())
_resolved_lock = threading.Lock()  # not _lock: that one is held through a whole build


class KernelBuildWarning(RuntimeWarning):
    """A kernel library failed to build or load; the pure-PyTorch reference is used instead."""


def kernels_dir() -> Path:
    """The repository's ``kernels/`` folder (next to the ``iouctl`` package; needs an editable install)."""
    root = Path(__file__).resolve().parents[2] / "kernels"
    if not root.is_dir():
        raise FileNotFoundError(
            f"iouctl kernel sources not found at {root}: install iouctl from a source checkout "
            "(pip install -e .) or use impl='reference'"
        )
    return root


def cache_root() -> Path:
    """Folder of the compiled kernel libraries: ``$IOUCTL_KERNEL_CACHE`` or ``~/.cache/iouctl/torch_extensions``."""
    return Path(os.environ.get("IOUCTL_KERNEL_CACHE") or "~/.cache/iouctl/torch_extensions").expanduser()


def kernel_libraries() -> list[str]:
    """The kernel libraries: the folders of kernels/ with C++ sources (one of headers only, kernels/common, is not)."""
    root = kernels_dir()
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and any(f.suffix in _SOURCE_SUFFIXES for f in p.iterdir()))


def _sources(op: str, with_cuda: bool) -> tuple[list[Path], list[Path]]:
    """(compiled sources of ``kernels/<op>/``, every file whose content must key its cache: those sources and every
    header under ``kernels/``, since any library may include any folder's header)."""
    root = kernels_dir()
    folder = root / op
    if op not in kernel_libraries():
        raise ValueError(f"no kernel folder kernels/{op}; valid ops: {', '.join(kernel_libraries()) or 'none'}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    suffixes = _SOURCE_SUFFIXES + (_CUDA_SUFFIXES if with_cuda else ())
    compiled = [p for p in files if p.suffix in suffixes]
    headers = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _HEADER_SUFFIXES)
    return compiled, compiled + headers


def _build_key(op: str, keyed: list[Path], with_cuda: bool) -> str:
    h = hashlib.sha256()
    root = kernels_dir()
    for p in keyed:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")  # the path: a header moved between folders
        h.update(p.read_bytes())
    facts = [
        torch.__version__, str(torch.version.cuda), str(with_cuda), sys.version.split()[0], platform.machine(),
        " ".join(_CXX_FLAGS), " ".join(_LD_FLAGS), " ".join(_CUDA_FLAGS) if with_cuda else "",
        os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "", os.environ.get("CXX", ""),
    ]
    if with_cuda and torch.cuda.is_available():  # without an arch list, nvcc targets the visible GPUs
        facts += [str(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    h.update("\0".join(facts).encode())
    return f"{op}_{h.hexdigest()[:16]}"


def build_log(op: str) -> Path | None:
    """Path of the build log of ``op`` in this process, once ``load_library(op)`` has tried to build it."""
    return _logs.get(op)


def load_library(op: str) -> bool:
    """Build (first use) and load ``kernels/<op>/`` into this process; True when its ops are registered.

    CUDA sources (``*.cu``) are compiled only when ``torch.cuda.is_available()`` (or ``IOUCTL_BUILD_CUDA=1``, a
    compile check without a GPU). The result is cached per process;
    a failure warns once (``KernelBuildWarning``, naming the build log) and returns False.
    """
    with _lock:
        if op not in _loaded:
            _loaded[op] = _load(op)
        return _loaded[op]


def _load(op: str) -> bool:
    # IOUCTL_BUILD_CUDA=1 also compiles the CUDA sources without a GPU (a compile check; the kernels load unused)
    with_cuda = torch.cuda.is_available() or os.environ.get("IOUCTL_BUILD_CUDA") == "1"
    log: Path | str = "(no log: the build did not start)"
    try:
        compiled, keyed = _sources(op, with_cuda)
        build_dir = cache_root() / _build_key(op, keyed, with_cuda)
        build_dir.mkdir(parents=True, exist_ok=True)
        name = f"iouctl_{op}"
        log = _logs[op] = build_dir / "build.log"
        library = build_dir / f"{name}.so"
        marker = build_dir / "built.ok"  # written only after a build loaded fine: then the .so is whole
        if marker.is_file() and library.is_file():
            torch.ops.load_library(str(library))
            return True
        _build(name, compiled, build_dir, log, with_cuda)
        atomic_write(marker, f"{library.name}\n")
        return True
    except Exception as e:  # noqa: BLE001 -- any build/load failure means: fall back, loudly, once
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"iouctl: building the '{op}' kernels failed ({first[:300]}); using the slower pure-PyTorch reference. "
            f"Build log: {log}",
            KernelBuildWarning, stacklevel=3,
        )
        return False


def _build(name: str, sources: list[Path], build_dir: Path, log: Path, with_cuda: bool) -> None:
    """Compile with ninja under cpp_extension's file lock (safe when processes race), compiler output to ``log``."""
    console = _console()
    # cpp_extension's own notes ("No CUDA runtime is found", ...) belong in the log, not on the user's terminal
    ext_logger = logging.getLogger("torch.utils.cpp_extension")
    handler = logging.FileHandler(log)
    ext_logger.addHandler(handler)
    propagate, ext_logger.propagate = ext_logger.propagate, False
    try:
        from torch.utils import cpp_extension

        with _build_environment(cpp_extension, with_cuda):
            _compile(cpp_extension, console, name, sources, build_dir, log, with_cuda)
    finally:
        ext_logger.removeHandler(handler)
        ext_logger.propagate = propagate
        handler.close()


def _console():
    """rich's stderr console for the "compiling" spinner; without rich (a bare GPU image), a plain one-line note."""
    try:
        from rich.console import Console

        return Console(stderr=True)
    except ImportError:
        class Plain:
            @contextlib.contextmanager
            def status(self, text: str):
                print(text.replace("[bold]", ""), file=sys.stderr, flush=True)
                yield

        return Plain()


@contextlib.contextmanager
def _build_environment(cpp_extension, with_cuda: bool):
    """PATH (ninja) and CUDA_HOME as the build needs them, restored on exit, also when the build fails."""
    saved_env = {k: os.environ.get(k) for k in ("PATH", "CUDA_HOME")}
    saved_home = cpp_extension.CUDA_HOME
    try:
        _ninja_on_path()
        if with_cuda:
            _fix_cuda_home(cpp_extension)
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cpp_extension.CUDA_HOME = saved_home


def _ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; a venv's bin folder (where pip's ninja lives) is on PATH only when the venv
    is activated, not when its `iouctl` is called by full path."""
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path] + path)


def _fix_cuda_home(cpp_extension) -> None:
    """cpp_extension guesses CUDA_HOME from the nvcc on PATH; a wrapper script in /usr/local/bin makes that
    /usr/local, which has no CUDA headers. Prefer the standard toolkit location then."""
    home = cpp_extension.CUDA_HOME
    if (home is None or not Path(home, "include", "cuda_runtime.h").is_file()) and \
            Path("/usr/local/cuda/include/cuda_runtime.h").is_file():
        cpp_extension.CUDA_HOME = "/usr/local/cuda"


def _load_kwargs(name: str, sources: list[Path], build_dir: Path, with_cuda: bool) -> dict:
    """cpp_extension.load's arguments: the one place the build flags are set (the build and the CUDA compile check)."""
    return dict(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=list(_CXX_FLAGS),
        extra_cuda_cflags=list(_CUDA_FLAGS) if with_cuda else None,
        extra_ldflags=list(_LD_FLAGS),
        extra_include_paths=[str(kernels_dir())],  # `#include "nms/nms_math.h"` from any folder
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=True,
    )


def _compile(cpp_extension, console, name: str, sources: list[Path], build_dir: Path, log: Path,
             with_cuda: bool) -> None:
    with open(log, "ab") as logf:
        logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} building {name}\n".encode())
        logf.flush()
        # cpp_extension's verbose build writes the compiler output to fd 1: point fd 1 at the log for the build
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with console.status(f"[bold]iouctl: compiling the {name.removeprefix('iouctl_')} kernels "
                                f"(first use, about a minute; log: {log})"):
                os.dup2(logf.fileno(), 1)
                try:
                    cpp_extension.load(**_load_kwargs(name, sources, build_dir, with_cuda))
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
        except Exception as e:
            logf.write(f"\n=== failed: {type(e).__name__}: {e}\n".encode())
            raise
        finally:
            os.close(saved)


def has_kernel(qualname: str, device_type: str) -> bool:
    """Whether ``iouctl::<op>`` has a kernel registered for ``device_type`` ('cpu' or 'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    except RuntimeError:  # op not defined at all
        return False


def record_impl(library: str, op: str, device_type: str, kind: str) -> str:
    """Note that ``iouctl::<op>`` (of kernel library ``library``) resolved to ``kind`` on ``device_type``; returns
    ``kind``. select_impl calls it; an op that resolves on its own (e.g. a host copy) calls it too."""
    global _sequence
    with _resolved_lock:
        _sequence += 1
        entry = _resolved.setdefault(op, {"library": library, "devices": {}, "seen": {}})
        entry["impl"] = kind
        entry["devices"][device_type] = kind
        entry["seen"][device_type] = _sequence
    return kind


_sequence = 0  # resolutions so far: a run reports the ops resolved since it opened (implementations(since=...))


def sequence() -> int:
    """How many resolutions record_impl has noted in this process (a mark for implementations(since=...))."""
    return _sequence


def implementations(since: int = 0) -> dict[str, dict]:
    """What each op resolved to in this process, for a run's meta.json (JSON-serializable)::

        {"prroi_pool": {"impl": "cpp", "devices": {"cpu": "cpp"}, "library": "prroi_pool",
                        "build_failed": False, "build_log": "/home/u/.cache/iouctl/torch_extensions/.../build.log"},
         "batched_iou_guided_nms": {...}, ...}

    impl: 'cpp' | 'cuda' | 'reference' | 'direct' (the latest resolution); devices: device type -> impl;
    build_failed: the op's library failed to build or load (so 'auto' fell back to the reference); build_log: its
    log (None when no build was tried). Ops never called in this process are absent; with ``since`` (a
    sequence() mark, e.g. taken when a run opened), so are the ops and devices not resolved after it.
    """
    with _resolved_lock:
        out = {}
        for op, entry in sorted(_resolved.items()):
            devices = {d: k for d, k in entry["devices"].items() if entry["seen"][d] > since}
            if not devices:
                continue
            lib = entry["library"]
            log = _logs.get(lib)
            out[op] = {"impl": entry["impl"], "devices": devices, "library": lib,
                       "build_failed": _loaded.get(lib) is False, "build_log": str(log) if log else None}
        return out


def select_impl(library: str, impl: str, device: torch.device | str, op: str | None = None) -> str:
    """Resolve ``impl`` ('auto' | 'cpp' | 'cuda' | 'reference') for tensors on ``device``.

    'auto' picks the compiled kernel for the device ('cpp' on CPU, 'cuda' on CUDA) and falls back to 'reference'
    when the library failed to build (after one warning) or the device has no kernel. 'cpp' and 'cuda' insist:
    a wrong device raises ValueError, a missing build raises RuntimeError naming the log. ``op`` is the op name
    inside the ``iouctl`` namespace (default: the library name). Returns 'cpp', 'cuda' or 'reference'.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    device_type = torch.device(device).type
    op = op or library
    qualname = f"iouctl::{op}"
    if impl == "reference":
        return record_impl(library, op, device_type, "reference")
    if impl == "auto":
        if device_type not in ("cpu", "cuda") or not load_library(library):
            return record_impl(library, op, device_type, "reference")
        kind = "cuda" if device_type == "cuda" else "cpp"
        return record_impl(library, op, device_type, kind if has_kernel(qualname, device_type) else "reference")
    wanted = "cuda" if impl == "cuda" else "cpu"
    if device_type != wanted:
        raise ValueError(
            f"impl={impl!r} runs on {wanted.upper()} tensors but the input is on {device_type}; "
            "use impl='auto' or move the tensors"
        )
    if not load_library(library):
        raise RuntimeError(f"impl={impl!r}: the '{library}' kernels failed to build; see "
                           f"{build_log(library) or 'the KernelBuildWarning above'}")
    if not has_kernel(qualname, wanted):
        why = "" if wanted == "cpu" else " (CUDA sources are compiled only when a GPU is visible at first use)"
        raise RuntimeError(f"impl={impl!r}: {qualname} has no {wanted.upper()} kernel in this build{why}")
    return record_impl(library, op, device_type, impl)


def check_cuda_compiles(build_root: Path, archs: tuple[str, ...] = ("8.0", "9.0")) -> dict[str, tuple[bool, Path]]:
    """Compile (and link) every ``kernels/<op>/*.cu`` for the GPU architectures ``archs`` with the build's own flags,
    without a GPU: {op: (compiled, log)}. Only the CUDA sources are built (the CPU ones are the normal build's).

    The libraries are loaded into this process as cpp_extension does (their CUDA kernels register unused): run it in
    a process of its own (see :func:`main`). Needs nvcc (CUDA_HOME or PATH).
    """
    from torch.utils import cpp_extension

    results = {}
    ext_logger = logging.getLogger("torch.utils.cpp_extension")
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    try:
        for folder in sorted(p for p in kernels_dir().iterdir() if p.is_dir()):
            sources = sorted(p for p in folder.iterdir() if p.suffix in _CUDA_SUFFIXES)
            if not sources:
                continue
            build_dir = build_root / folder.name
            build_dir.mkdir(parents=True, exist_ok=True)
            log = build_dir / "build.log"
            handler = logging.FileHandler(log)
            ext_logger.addHandler(handler)
            try:
                with _build_environment(cpp_extension, with_cuda=True), open(log, "a") as logf, \
                        contextlib.redirect_stdout(logf):
                    sys.stdout.flush()
                    saved = os.dup(1)
                    os.dup2(logf.fileno(), 1)  # nvcc's output (a child process) goes to the log too
                    try:
                        cpp_extension.load(**_load_kwargs(f"iouctl_{folder.name}_cuda_check", sources, build_dir,
                                                          with_cuda=True))
                    finally:
                        os.dup2(saved, 1)
                        os.close(saved)
                results[folder.name] = (True, log)
            except Exception as e:  # noqa: BLE001 -- a compile error is the result being reported
                with open(log, "a") as logf:
                    logf.write(f"\n=== failed: {type(e).__name__}: {e}\n")
                results[folder.name] = (False, log)
            finally:
                ext_logger.removeHandler(handler)
                handler.close()
    finally:
        if saved_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    return results


def main(argv: list[str] | None = None) -> int:
    """The CUDA compile check as a command (exit status 0: every .cu compiled), e.g. in CI::

        python -c "import sys; from iouctl.ops._extension import main; sys.exit(main(['--check-cuda', '8.0', '9.0']))"
    """
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="iouctl.ops._extension.main",
                                 description="Compile every kernels/<op>/*.cu for the given GPU architectures.")
    ap.add_argument("--check-cuda", nargs="*", metavar="ARCH", default=None,
                    help="architectures (default: 8.0 9.0, i.e. sm_80 and sm_90)")
    ap.add_argument("--build-dir", type=Path, default=None, help="where the objects go (default: a temp folder)")
    a = ap.parse_args(argv)
    if a.check_cuda is None:
        ap.error("nothing to do: pass --check-cuda")
    root = a.build_dir or Path(tempfile.mkdtemp(prefix="iouctl-cuda-check-"))
    results = check_cuda_compiles(root, tuple(a.check_cuda) or ("8.0", "9.0"))
    for op, (ok, log) in results.items():
        print(f"{op}: {'compiled' if ok else 'FAILED'} (log: {log})")
    return 0 if results and all(ok for ok, _ in results.values()) else 1


def resolve_or_host_copy(library: str, impl: str, device: torch.device, op: str) -> str:
    """select_impl, except that 'auto' for CUDA tensors takes the op's CUDA kernel when the library has one, else the
    CPU kernel on a host copy (it beats a Python loop of tiny GPU launches), else 'reference' (library not built);
    the choice is recorded like select_impl's. call_kernel makes the host copy."""
    if impl == "auto" and device.type == "cuda":
        if not load_library(library):
            kind = "reference"
        else:
            kind = "cuda" if has_kernel(f"iouctl::{op}", "cuda") else "cpp"
        return record_impl(library, op, device.type, kind)
    return select_impl(library, impl, device, op)


def call_kernel(op: str, device: torch.device, *args: Any) -> Any:
    """``torch.ops.iouctl.<op>(*args)`` with its outputs on ``device``; tensors go to the host first when the op has
    no kernel for ``device`` (see resolve_or_host_copy)."""
    if device.type != "cpu" and not has_kernel(f"iouctl::{op}", device.type):
        args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(torch.ops.iouctl, op)(*args)
    return out.to(device) if isinstance(out, torch.Tensor) else tuple(t.to(device) for t in out)
