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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise IouctlError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


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
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        start = int(state["iteration"])
        run.console.print(f"resumed from {resume_from} at iteration {start}")
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
            if evaluate_fn is not None and rank == 0 and done % int(cfg.eval_every) == 0 and done < max_iters:
                evaluate_fn(model, step=done)
                net.train()
    if start >= max_iters and rank == 0:
        run.console.print(f"nothing to train: the checkpoint is at iteration {start} >= max_iters {max_iters}")
    result = {"iterations": max_iters, "checkpoint": str(ckpt_path)}
    if evaluate_fn is not None and rank == 0:
        result["eval"] = evaluate_fn(model, step=max_iters)
    dist.shutdown()
    return result
