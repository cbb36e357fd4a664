"""A command's config as every caller composes it (the CLI, the demo's steps, a script): config.compose, then the
model's own post-processing, then the checks that need more than the schema (model sizes, the ablation grid).

Imports stay light (no torch): the CLI imports this module before it knows whether torch is needed.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

# `bench-pool --quick` and the demo's pooling step: seconds, not minutes, on a 2-core CPU.
QUICK_BENCH = ["feature_shape=[1,64,50,76]", "num_rois=[128]", "roi_sizes=[mixed,32,128]", "repeats=3", "warmup=1"]


def compose(command: str, overrides: Optional[Sequence[str]], allow_missing: bool = False,
            choices: Optional[dict] = None) -> Any:
    """The command's config; values the schema cannot type (model sizes: a number, a list or `auto`) are checked
    here too, so that a bad one is refused before a run directory or the data is touched. choices: filled with the
    option chosen in each config group (config.compose), which the run records."""
    from iouctl import config

    overrides = list(overrides or [])
    check_override_keys(overrides)
    cfg = config.compose(command, overrides, allow_missing=allow_missing, choices=choices)
    inference = model_inference(cfg, overrides)
    if inference:
        cfg = config.compose(command, [*inference, *overrides], allow_missing=allow_missing, choices=choices)
    if not allow_missing and "model" in cfg:
        from iouctl.engine.sizes import check_model_sizes

        check_model_sizes(cfg.model)
    if not allow_missing and "grid" in cfg:
        config.grid_arms(cfg)  # a bad arm is refused before a run directory is made
    return cfg


def model_inference(cfg: Any, overrides: Sequence[str]) -> List[str]:
    """The model's own post-processing (nms overrides such as [nms=greedy, nms.score=fused]) for a command that
    composes a model and an NMS, unless the user chose the NMS (nms=...): applied before the user's overrides, so
    nms.iou_threshold=0.6 still refines it."""
    if "model" not in cfg or "nms" not in cfg or any(o.split("=", 1)[0].lstrip("+~") == "nms" for o in overrides):
        return []
    return own_inference(cfg.model)


def own_inference(model_cfg: Any) -> List[str]:
    """`model.inference` when given, else (null) the paper's of its quality head (iouctl.models.contract): a RetinaNet
    with model.quality=qfl ranks by cls, with model.quality=iou by the fused score."""
    from omegaconf import OmegaConf

    if "inference" not in model_cfg or OmegaConf.is_missing(model_cfg, "inference"):
        return []
    if model_cfg.inference is None:
        if "quality" not in model_cfg:
            return []
        from iouctl.models.contract import QUALITY_HEADS

        return list(QUALITY_HEADS[model_cfg.quality].inference)
    from iouctl.config import group_options
    from iouctl.errors import ConfigError

    inference = [str(o) for o in model_cfg.inference]
    bad = [o for o in inference if not o.startswith(("nms=", "nms."))]
    if bad:
        raise ConfigError(f"model.inference holds {bad[0]!r}; valid: nms overrides only, e.g. "
                          f"[nms=greedy, nms.score=fused] (options: {', '.join(group_options('nms'))})")
    return inference


def inference_note(cfg: Any, overrides: Sequence[str]) -> Optional[str]:
    """For a command that evaluates a model: which post-processing it uses and why (printed at the start)."""
    if "model" not in cfg or "nms" not in cfg or "inference" not in cfg.model:
        return None
    own = " ".join(own_inference(cfg.model))
    if model_inference(cfg, overrides):
        return f"inference: {own} (the model's own: model.inference)"
    given = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] == "nms")
    return f"inference: {given} (given; the model's own: {own})"


def check_override_keys(overrides: Sequence[str]) -> None:
    """Keys Hydra cannot take: none at all (`=5`), or one too long for a file name (Hydra looks keys up as files)."""
    from iouctl.errors import ConfigError

    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~") if "=" in o else None
        if key == "":
            raise ConfigError(f"override {o!r} has no key: use key=value, group=option, +new_key=value or ~key")
        if key is not None and len(key) > 200:
            raise ConfigError(f"unknown config key {key[:40] + '...'!r} ({len(key)} characters)")


def override_key(override: str) -> str:
    """`model.min_size` of `+model.min_size=64`."""
    return override.split("=", 1)[0].lstrip("+~")
