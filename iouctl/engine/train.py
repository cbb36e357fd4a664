"""`iouctl train`: an iteration-based training loop with exact resume, and the evaluation that ends it.

Exact resume: the data order and each sample's augmentation are pure functions of (seed, iteration) (IterationSampler
hands every sample its own seed; iouctl.data.augment), the learning rate a pure
function of the iteration, and a checkpoint holds the model, the optimizer, the iteration and the RNG states; a run
killed at any point and resumed from its last checkpoint reaches the same weights as an uninterrupted one (on CPU).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from iouctl.data import collate_detection
from iouctl.data.augment import AugmentedDataset, sample_seed
from iouctl.errors import IouctlError
from iouctl.fileio import atomic_write_with
from iouctl.models.backbones import load_failure

CHECKPOINT = "checkpoints/last.pt"


class CategoryMap:
    """Dataset COCO category ids <-> the contiguous class indices [0, C) the models use."""

    def __init__(self, categories: list[dict]) -> None:
        self.ids = torch.tensor(sorted(int(c["id"]) for c in categories), dtype=torch.int64)

    def to_index(self, category_ids: Tensor) -> Tensor:
        return torch.searchsorted(self.ids, category_ids.cpu()).to(category_ids.device)

    def to_id(self, index: Tensor) -> Tensor:
        return self.ids.to(index.device)[index]


class IterationSampler(torch.utils.data.Sampler):
    """Batches of (dataset index, augmentation seed) pairs for iterations [start, stop): sample k of the global stream
    is (permutation(seed, epoch = k // n)[k % n], sample_seed(seed, k)); rank r of w takes its own slice of each global
    batch. Both are functions of (seed, iteration, position in the global batch) only."""

    def __init__(self, n: int, batch_size: int, start: int, stop: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise IouctlError("the training split has no images")
        self.n, self.batch_size, self.start, self.stop = n, batch_size, start, stop
        self.seed, self.rank, self.world = seed, rank, world
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world
        for it in range(self.start, self.stop):
            first = it * global_batch + self.rank * self.batch_size
            yield [(int(self._perm(k // self.n)[k % self.n]), sample_seed(self.seed, k))
                   for k in range(first, first + self.batch_size)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def lr_factor(it: int, warmup_iters: int, warmup_factor: float, lr_steps: list[int], gamma: float) -> float:
    """Linear warm-up from warmup_factor to 1, then x gamma at each step (detectron2's WarmupMultiStepLR)."""
    warm = 1.0 if it >= warmup_iters else warmup_factor + (1 - warmup_factor) * it / max(1, warmup_iters)
    return warm * gamma ** sum(it >= s for s in lr_steps)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IouctlError(f"device={device} but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(device)


def _to_model_targets(targets: list[dict], cats: CategoryMap, device: torch.device) -> list[dict]:
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0  # crowd regions are not objects to regress to
        out.append({"boxes": t["boxes"][keep].to(device), "labels": cats.to_index(t["labels"][keep]).to(device)})
    return out


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    extra: dict) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
             "rng_cpu": torch.get_rng_state(), **extra}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    atomic_write_with(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (only tensors and plain values are unpickled); one line
    (IouctlError) when it cannot be read or holds no model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- empty, truncated, foreign, or holding pickled objects
        raise IouctlError(f"cannot read checkpoint {path}: {load_failure(e)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise IouctlError(f"{path} is not an iouctl checkpoint (no 'model' state_dict); give a train run's "
                          f"{CHECKPOINT}")
    return state


def load_model_state(model: torch.nn.Module, state: dict, path: Path, model_name: str,
                     model_cfg: Any = None) -> None:
    """Load a checkpoint's weights into `model`. A mismatch is one line (IouctlError) naming the first tensor that
    differs and the overrides the checkpoint's run was made with, instead of torch's list of every tensor."""
    own, theirs = model.state_dict(), state["model"]
    shapes = [f"{k} is {list(v.shape)} there but {list(own[k].shape)} here" for k, v in theirs.items()
              if k in own and isinstance(v, Tensor) and v.shape != own[k].shape]
    missing = [f"{k} is missing there" for k in own if k not in theirs]
    unexpected = [f"{k} is not in this model" for k in theirs if k not in own]
    problems = shapes + missing + unexpected
    if not problems:
        model.load_state_dict(theirs)
        return
    raise IouctlError(f"checkpoint {path} does not fit model={model_name}: {len(problems)} tensors differ (first: "
                      f"{problems[0]}); {_trained_with(path, model_cfg)}")


def _trained_with(checkpoint: Path, model_cfg: Any = None) -> str:
    """Advice naming how the run that wrote `checkpoint` (<run>/checkpoints/last.pt) configured its model: the model
    keys that differ from `model_cfg` (the config now), else its overrides."""
    import yaml

    run_dir = Path(checkpoint).parent.parent
    try:
        given = yaml.safe_load((run_dir / "overrides.yaml").read_text()) or []
        saved = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return "use the model config it was trained with"
    now = dict(model_cfg.items()) if model_cfg is not None else {}
    diff = [f"model.{k}={v}" for k, v in saved.items() if k in now and now[k] != v]
    kept = [str(o) for o in given if str(o).split("=", 1)[0].lstrip("+~") not in ("resume", "run", "checkpoint")]
    had = " ".join(diff[:4]) if diff else "overrides " + " ".join(kept) if kept else "the default config"
    return f"its run had {had} (see {run_dir / 'config.yaml'}): use the same model config"


def train(cfg: Any, run: Any, data: Any, model: torch.nn.Module, make_optimizer: Callable,
          resume_from: Optional[Path] = None, evaluate_fn: Optional[Callable] = None,
          augment: Optional[Callable] = None) -> dict:
    """Train `model` on `data`'s train split for cfg.schedule.max_iters iterations, evaluating with
    `evaluate_fn(model, step)` every cfg.eval_every iterations and at the end.

    cfg: the plain keys of conf/train.yaml; make_optimizer: params -> optimizer (the `optim` config, partial);
    resume_from: a checkpoint to continue from exactly; augment: the `augment` config's object
    (iouctl.data.augment), None for no augmentation.
    """
    from iouctl.engine import distributed as dist

    device = dist.device_for(resolve_device(str(cfg.device)))
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(int(cfg.seed))
    cats = CategoryMap(data.categories)
    model.to(device)
    optimizer = make_optimizer(model.parameters())
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        absent = [k for k in ("optimizer", "iteration", "rng_cpu") if k not in state]
        if absent:
            raise IouctlError(f"cannot resume from {resume_from}: it has no {', '.join(absent)} (not a train "
                              f"checkpoint; eval checkpoint= or model.init_from= take model weights)")
        load_model_state(model, state, resume_from, str(cfg.model._target_), cfg.model)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise IouctlError(f"cannot resume from {resume_from}: its optimizer state does not fit "
                              f"optim={cfg.optim._target_} ({' '.join(str(e).split())[:160]}); "
                              f"{_trained_with(resume_from, cfg.model)}") from None
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        start = int(state["iteration"])
        run.console.print(f"resumed from {resume_from} at iteration {start}", markup=False, soft_wrap=True)
    init = getattr(model, "init_report", None)  # set by model.init_from (iouctl.models.init_from)
    if init is not None and rank == 0:
        if resume_from is None:
            for line in init.lines():
                run.console.print(line, markup=False, highlight=False, soft_wrap=True)
            run.write_json("init_from.json", init.to_dict())
        else:  # the checkpoint was loaded after init_from, so its weights won
            run.console.print(f"model.init_from {init.file} not used: the weights come from the checkpoint",
                              markup=False, highlight=False, soft_wrap=True)
    net = dist.wrap(model, device)
    s = cfg.schedule
    max_iters = int(s.max_iters)
    dataset = AugmentedDataset(data.dataset("train"), augment)  # an epoch: every image x augment.variants
    sampler = IterationSampler(len(dataset), int(cfg.batch_size), start, max_iters, int(cfg.seed), rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_detection,
                                         num_workers=int(cfg.num_workers), pin_memory=device.type == "cuda")
    amp = bool(cfg.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    ckpt_path = run.path(CHECKPOINT)
    t0, seen = time.perf_counter(), 0
    net.train()
    with run.progress() as progress:
        task = progress.add_task("train", total=max_iters, completed=start)
        for it, (images, targets) in enumerate(loader, start=start):
            factor = lr_factor(it, int(s.warmup_iters), float(s.warmup_factor), list(s.lr_steps), float(s.gamma))
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * factor
            images = [im.to(device, non_blocking=True) for im in images]
            with torch.autocast(device.type, enabled=amp):
                losses = net(images, _to_model_targets(targets, cats, device))
            for name, value in losses.items():
                if not torch.isfinite(value):
                    raise IouctlError(f"iteration {it}: loss term '{name}' is {value.item()}; stopped. The last good "
                                      f"checkpoint is {ckpt_path if ckpt_path.is_file() else '(none yet)'}")
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.clip_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            seen += len(images) * world
            done = it + 1
            row = {"loss": float(total.detach()), **{f"loss_{k}": float(v.detach()) for k, v in losses.items()},
                   "lr": optimizer.param_groups[0]["lr"], "img_per_s": seen / max(1e-9, time.perf_counter() - t0)}
            if rank == 0:
                run.log(row, step=done)
                terms = " ".join(f"{k} {row['loss_' + k]:.3f}" for k in losses)
                progress.update(task, completed=done, description=f"train loss {row['loss']:.3f} ({terms}) "
                                f"lr {row['lr']:.2g} {row['img_per_s']:.0f} img/s")
                if done % int(cfg.checkpoint_every) == 0 or done == max_iters:
                    save_checkpoint(ckpt_path, model, optimizer, done, {"config_name": str(cfg.name)})
            if done % int(cfg.eval_every) == 0 and done < max_iters:
                if evaluate_fn is not None and rank == 0:
                    evaluate_fn(model, step=done)
                    net.train()
                dist.barrier()  # the other ranks wait here while rank 0 evaluates, not in the next all-reduce
    if start >= max_iters and rank == 0:
        run.console.print(f"nothing to train: the checkpoint is at iteration {start} >= max_iters {max_iters}")
    result = {"iterations": max_iters, "checkpoint": str(ckpt_path)}
    if evaluate_fn is not None and rank == 0:
        result["eval"] = evaluate_fn(model, step=max_iters)
    dist.barrier()  # every rank leaves together, after rank 0's final evaluation
    dist.shutdown()
    return result


def run(cfg: Any, run: Any, resume: Optional[Path] = None) -> dict:
    """`iouctl train` on a composed config (conf/train.yaml) in an open run (iouctl.runs): build data, model and
    optimizer, train, and evaluate on the val split. resume: the checkpoint to continue from exactly (None: with
    resume=true the one iouctl.engine.inputs.resume_checkpoint finds, else a fresh start). Returns
    {"iterations", "checkpoint", "eval"}."""
    from iouctl import config
    from iouctl.engine.build import detector_setup
    from iouctl.engine.inputs import resume_checkpoint

    if resume is None:
        resume = resume_checkpoint(cfg)
    if resume is not None:  # resumed_from: the run this one continues (`iouctl runs` shows it as resumed)
        src = Path(resume).parent.parent
        run.update_meta(resume_checkpoint=str(resume),
                        resumed_from=str(src) if (src / "meta.json").is_file() else None)
    setup = detector_setup(cfg, run)
    return train(cfg, run, setup.data, setup.model, config.instantiate(cfg.optim), resume,
                 lambda model, step=None: setup.evaluate(model, step),
                 augment=config.instantiate(cfg.augment))
