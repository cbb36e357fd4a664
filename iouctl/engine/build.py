"""The objects a composed config describes, built once for train, eval and refine: the prepared dataset, the
detector, its post-processing, the device and the category map; with the inference and evaluation that use them."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from iouctl.data.detections import Detections


@dataclasses.dataclass
class DetectorSetup:
    """What train, eval and refine share, from one config: `cfg` (model sizes `auto` resolved from the data),
    `data` (prepared), `model` (initial weights: cfg.seed), `nms` (the configured post-processing), `device`,
    `cats` (COCO category ids <-> class indices)."""

    cfg: Any
    run: Any
    data: Any
    model: torch.nn.Module
    nms: Any
    device: torch.device
    cats: Any
    _gts: dict = dataclasses.field(default_factory=dict)

    @property
    def detector(self) -> dict:
        """The detector's contract as plain values (iouctl.models.contract.describe): recorded with its detections
        and in the run's meta.json, so later commands read capabilities instead of guessing from the config."""
        from iouctl.models.contract import describe

        return describe(self.model)

    def predict(self, model: torch.nn.Module | None = None, split: str = "val") -> Detections:
        """Raw (pre-NMS) detections of `model` (default: this setup's) on `split`."""
        from iouctl.engine.evaluate import predict
        from iouctl.engine.prepare import dataset_record

        net = self.model if model is None else model
        meta = {"model": self.cfg.model._target_, "split": split, "data": dataset_record(self.data, split),
                "cls_weight": float(self.cfg.model.cls_weight), "detector": self.detector}
        return predict(net.to(self.device), self.data.dataset(split), self.cats.ids, self.device,
                       int(self.cfg.batch_size), int(self.cfg.num_workers), self.run, meta)

    def evaluate(self, model: torch.nn.Module | None = None, step: int | None = None, split: str = "val") -> dict:
        """Inference on `split`, the configured NMS, AP and correlations (engine.evaluate.evaluate_detections)."""
        from iouctl.engine.evaluate import evaluate_detections
        from iouctl.engine.prepare import ground_truth

        if split not in self._gts:  # one ground truth per split: its COCO index is built once for all evaluations
            self._gts[split] = ground_truth(self.data, split)
        return evaluate_detections(self.run, self.predict(model, split), self._gts[split], self.nms,
                                   str(self.cfg.eval_backend), split, step)


def detector_setup(cfg: Any, run: Any) -> DetectorSetup:
    """Build everything a command with a detector needs from its composed config `cfg`, into `run`: prepares the
    dataset (generated the first time), resolves `auto` model sizes (recorded in the run's config.yaml), seeds and
    builds the model, records the device, dtype and the detector's contract in meta.json."""
    from iouctl import config
    from iouctl.engine.prepare import prepare_dataset
    from iouctl.engine.sizes import resolve_auto_sizes
    from iouctl.engine.train import CategoryMap, resolve_device

    data = config.instantiate(cfg.data)
    with run.progress(transient=True) as progress:
        prepare_dataset(data, progress)
    cfg = resolve_auto_sizes(cfg, data, run)  # model sizes `auto` -> values from the train split, in config.yaml
    torch.manual_seed(int(cfg.seed))  # the initial weights are part of the experiment
    model = config.instantiate_model(cfg.model, num_classes=data.num_classes, pool=config.instantiate(cfg.pool))
    nms = config.instantiate(cfg.nms)
    device = resolve_device(str(cfg.device))
    amp = bool(cfg.get("amp", False)) and device.type == "cuda"  # as engine.train decides it: autocast on CUDA only
    run.record_runtime(device, "float16 autocast" if amp else "float32")
    setup = DetectorSetup(cfg, run, data, model, nms, device, CategoryMap(data.categories))
    run.update_meta(detector=setup.detector)
    return setup


def load_weights(model: torch.nn.Module, checkpoint: Path, model_cfg: Any) -> dict:
    """Load a train checkpoint into `model`; a mismatch is one line. Returns the checkpoint."""
    from iouctl.engine.train import load_checkpoint, load_model_state

    state = load_checkpoint(checkpoint)
    load_model_state(model, state, checkpoint, str(model_cfg._target_), model_cfg)
    return state
