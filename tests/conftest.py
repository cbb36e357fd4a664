import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Runs go to a fresh folder per test; wandb never sees credentials, so it can only go offline."""
    monkeypatch.setenv("IOUCTL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    yield


def pytest_configure(config):
    # One shared cache per test session for generated datasets (CI starts cold once). The compiled kernels have their
    # own folder ($IOUCTL_KERNEL_CACHE), so a test that points IOUCTL_CACHE_DIR at a temp folder does not rebuild them.
    os.environ.setdefault("IOUCTL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "iouctl"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped without a GPU; CPU tests never skip."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
