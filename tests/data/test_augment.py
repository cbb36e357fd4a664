"""Augmentation (conf/augment/): exact boxes against the pixels they enclose, the min-visible filter, per-sample
determinism (seeds, not the global RNG or the worker count), the config options, detectors taking empty targets."""
import pytest
import torch
from torchvision import tv_tensors

from iouctl import config
from iouctl.data import collate_detection
from iouctl.data.augment import AugmentedDataset, ClipBoxes, MirrorPairs, RandomAugment, sample_seed
from iouctl.engine.train import IterationSampler
from iouctl.errors import ConfigError
from tests.lanes import sample

OFF = dict(crop_prob=0.0, crop_scale=[0.3, 1.0], crop_aspect=[0.75, 1.333], min_visible=0.4, min_box_size=1.0,
           hflip=0.0, vflip=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
# non-overlapping integer boxes; object j is painted with the value VALUE[j] in channel 0, so its pixels locate it
BOXES = [[3, 4, 20, 14], [30, 2, 38, 40], [45, 30, 60, 47], [8, 25, 24, 44], [26, 44, 40, 50]]
VALUE = [0.2, 0.4, 0.6, 0.8, 1.0]


def painted(h=50, w=64):
    img = torch.zeros(3, h, w)
    img[1] = torch.linspace(0, 1, w)  # a left-right gradient and a top-bottom one: flips are visible
    img[2] = torch.linspace(0, 1, h)[:, None]
    for (x1, y1, x2, y2), v in zip(BOXES, VALUE):
        img[0, y1:y2, x1:x2] = v
    target = {"boxes": torch.tensor(BOXES, dtype=torch.float32), "labels": torch.tensor([10, 11, 12, 13, 14]),
              "iscrowd": torch.tensor([0, 1, 0, 1, 0]), "image_id": 7}
    return img, target


def pixels_of(img, value):
    """(bounding box xyxy of the pixels painted `value`, their count); None when none are left."""
    ys, xs = torch.where((img[0] - value).abs() < 1e-6)
    if len(xs) == 0:
        return None, 0
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1], len(xs)


class Painted(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        img, t = painted()
        return img * (1 - 0.1 * i), {**t, "image_id": i}


def test_mirror_pairs_are_the_exact_mirror_and_leave_variant_0_alone():
    img, t = painted()
    t["boxes"][0, 0] = -2.5  # a box sticking out of the image stays unclipped, as without augmentation
    a, ta = MirrorPairs()(img, t, variant=0)
    assert a is img and ta is t
    b, tb = MirrorPairs()(img, t, variant=1)
    assert torch.equal(b, img.flip(-1))
    expect = t["boxes"].clone()
    expect[:, 0], expect[:, 2] = 64 - t["boxes"][:, 2], 64 - t["boxes"][:, 0]
    assert torch.equal(tb["boxes"], expect) and type(tb["boxes"]) is torch.Tensor
    for box, v in zip(expect[1:].tolist(), VALUE[1:]):
        assert pixels_of(b, v)[0] == box
    assert torch.equal(tb["labels"], t["labels"]) and torch.equal(tb["iscrowd"], t["iscrowd"])

    ds = AugmentedDataset(Painted(), MirrorPairs())  # an epoch: 3 images, then their 3 mirrors
    assert len(ds) == 6
    assert torch.equal(ds[(1, 99)][0], Painted()[1][0]) and torch.equal(ds[(4, 5)][0], Painted()[1][0].flip(-1))
    with pytest.raises(IndexError, match="3 images x 2 variants"):
        ds[(6, 0)]


@pytest.mark.parametrize("flips", [0.0, 0.5])
def test_random_crop_boxes_match_the_pixels_and_the_min_visible_filter(flips):
    img, t = painted()
    aug = RandomAugment(**{**OFF, "crop_prob": 1.0, "crop_scale": [0.2, 0.8], "crop_aspect": [0.5, 2.0],
                           "hflip": flips, "vflip": flips, "min_visible": 0.5})
    full_area = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in BOXES]
    kept_some = dropped_some = cut_some = 0
    for seed in range(60):
        out, ot = aug(img, t, seed=seed)
        area = out.shape[1] * out.shape[2]  # cropped to 0.2-0.8 of the area (+ rounding), never resized
        assert 0.2 * 3200 - 60 <= area <= 0.8 * 3200 + 60 or out.shape[1:] == (50, 64)  # or the 10-tries fallback
        assert ot["boxes"].dtype == torch.float32 and type(ot["boxes"]) is torch.Tensor
        kept = {int(lab) - 10: box for lab, box in zip(ot["labels"], ot["boxes"].tolist())}
        for j, v in enumerate(VALUE):
            box, count = pixels_of(out, v)
            visible = count / full_area[j]
            if j in kept:  # the box is exactly the visible part of the object, and enough of it is visible
                assert kept[j] == box and visible >= 0.5, (seed, j)
                kept_some += 1
                cut_some += visible < 1
            else:
                assert visible < 0.5, (seed, j, visible)
                dropped_some += box is not None
        assert ot["iscrowd"].tolist() == [(lab - 10) % 2 for lab in ot["labels"].tolist()]  # aligned with labels
        assert (ot["boxes"] >= 0).all() and (ot["boxes"][:, 2] <= out.shape[2]).all()
        assert (ot["boxes"][:, 3] <= out.shape[1]).all()
    assert kept_some and dropped_some and cut_some  # the cases above all occurred


def test_clip_boxes_drops_below_min_visible():
    b = tv_tensors.BoundingBoxes([[-10.0, 0, 10, 10], [5, 5, 9, 9], [90, 0, 110, 10]], format="XYXY",
                                 canvas_size=(20, 100), clamping_mode=None)
    out = ClipBoxes(0.6)(b)  # half of the first and of the last box are visible: collapsed for Sanitize to drop
    assert out.tolist() == [[0, 0, 0, 10], [5, 5, 9, 9], [90, 0, 90, 10]]
    assert ClipBoxes(0.5)(b).tolist() == [[0, 0, 10, 10], [5, 5, 9, 9], [90, 0, 100, 10]]


def test_flips_and_colour_jitter():
    img, t = painted()
    out, ot = RandomAugment(**{**OFF, "hflip": 1.0, "vflip": 1.0})(img, t, seed=3)
    assert torch.equal(out, img.flip(-1).flip(-2))
    assert ot["boxes"].tolist() == [[64 - x2, 50 - y2, 64 - x1, 50 - y1] for x1, y1, x2, y2 in BOXES]

    flipped = [torch.equal(RandomAugment(**{**OFF, "hflip": 0.5})(img, t, seed=s)[0], img.flip(-1))
               for s in range(400)]
    assert 0.42 < sum(flipped) / 400 < 0.58  # p = 0.5

    grey = torch.full((3, 8, 8), 0.5)
    factors = set()
    for s in range(50):
        out, _ = RandomAugment(**{**OFF, "brightness": 0.2})(grey, {"boxes": torch.zeros(0, 4)}, seed=s)
        f = out / grey
        assert torch.allclose(f, f.flatten()[0]) and 0.8 - 1e-6 <= f.flatten()[0] <= 1.2 + 1e-6
        factors.add(round(f.flatten()[0].item(), 4))
    assert len(factors) > 40  # a new factor per seed


def test_empty_targets_pass_through():
    img, t = painted()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "iscrowd": torch.zeros(0, dtype=torch.int64), "image_id": 1}
    aug = RandomAugment(**{**OFF, "crop_prob": 1.0, "hflip": 0.5, "brightness": 0.2})
    for s in range(5):
        out, ot = aug(img, empty, seed=s)
        assert ot["boxes"].shape == (0, 4) and ot["labels"].shape == (0,) and ot["image_id"] == 1


def test_the_draws_come_from_the_seed_only():
    img, t = painted()
    aug = RandomAugment(**{**OFF, "crop_prob": 0.5, "hflip": 0.5, "vflip": 0.5, "brightness": 0.3, "hue": 0.1})
    torch.manual_seed(1)
    a = aug(img, t, seed=5)
    torch.manual_seed(2)  # another global RNG state: the same sample
    b = aug(img, t, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    outs = [aug(img, t, seed=s)[0] for s in range(8)]
    assert len({(o.shape, o.sum().item()) for o in outs}) == 8  # another seed, another sample


def test_global_rng_is_left_alone():
    img, t = painted()
    torch.manual_seed(0)
    RandomAugment(**{**OFF, "crop_prob": 1.0, "hflip": 0.5, "brightness": 0.3})(img, t, seed=11)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, k) for s in range(20) for k in range(2000)}
    assert len(seeds) == 40_000 and all(0 <= x < 2 ** 63 for x in seeds)


def test_workers_do_not_change_the_samples():
    aug = RandomAugment(**{**OFF, "crop_prob": 0.7, "hflip": 0.5, "vflip": 0.5, "brightness": 0.2, "hue": 0.05})
    ds = AugmentedDataset(Painted(), aug)

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=IterationSampler(len(ds), 2, 0, 5, seed=3),
                                             collate_fn=collate_detection, num_workers=workers)
        return list(loader)

    a, b = batches(0), batches(2)
    for (ia, ta), (ib, tb) in zip(a, b, strict=True):
        for x, y, u, v in zip(ia, ib, ta, tb, strict=True):
            assert torch.equal(x, y) and torch.equal(u["boxes"], v["boxes"]) and torch.equal(u["labels"], v["labels"])
    drawn = {}  # 10 samples of 3 images: each image comes back, augmented anew
    for images, targets in a:
        for x, u in zip(images, targets):
            drawn.setdefault(u["image_id"], []).append(x)
    for versions in drawn.values():
        assert len(versions) >= 3 and not all(torch.equal(versions[0], x) for x in versions[1:])


@pytest.mark.slow
def test_config_options():
    none = config.instantiate(config.compose("train", ["augment=none"]).augment)
    assert none is None and len(AugmentedDataset(Painted(), none)) == 3
    assert isinstance(config.instantiate(config.compose("train", []).augment), MirrorPairs)  # the default
    std = config.instantiate(config.compose("train", ["augment=standard", "augment.vflip=0"]).augment)
    assert isinstance(std, RandomAugment) and std.params["vflip"] == 0.0 and std.params["hflip"] == 0.5
    # an experiment pins the augmentation of its dataset; the command line still wins
    coco = ["experiment=coco_r50_iou_net", "data.root=/data/coco"]
    assert config.compose("train", coco).augment._target_.endswith("MirrorPairs")
    assert config.compose("train", [*coco, "augment=standard"]).augment._target_.endswith("RandomAugment")


def test_an_experiment_file_sets_the_augmentation_of_its_dataset(tmp_path, monkeypatch):
    """The README's recipe for choosing augmentation per dataset, in a copy of conf/."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    (conf / "experiment" / "aerial.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /data: coco\n  - override /augment: standard\n"
        "data:\n  root: /data/aerial\naugment:\n  vflip: 0.5\n  crop_scale: [0.5, 1.0]\n")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    cfg = config.compose("train", ["experiment=aerial"])
    aug = config.instantiate(cfg.augment)
    assert isinstance(aug, RandomAugment) and aug.params["crop_scale"] == [0.5, 1.0] and cfg.data.root == "/data/aerial"
    assert config.compose("train", ["experiment=aerial", "augment.vflip=0"]).augment.vflip == 0.0  # command line wins
    # its keys merged over augment=none leave no augmentation to build: one line, not a crash in a worker
    keys_only = config.instantiate(config.compose("train", ["experiment=aerial", "augment=none"]).augment)
    with pytest.raises(ConfigError, match=r"^augment is \{'vflip': 0.5, 'crop_scale': \[0.5, 1.0\]\}, not an augm"):
        AugmentedDataset(Painted(), keys_only)


@pytest.mark.parametrize("key, value, message", sample([
    ("crop_scale", [0.5, 0.2], "augment.crop_scale=[0.5, 0.2] must be [min, max] with 0 < min <= max <= 1"),
    ("hflip", 1.5, "augment.hflip=1.5 is not in [0, 1]"),
    ("hue", 0.7, "augment.hue=0.7 is not in [0, 0.5]"),
    ("min_box_size", 0.0, "augment.min_box_size=0.0 must be >= 1"),
], 2))
def test_bad_values_are_one_line(key, value, message):
    # refused at composition (the schema's ranges), before any run folder...
    with pytest.raises(ConfigError) as e:
        config.compose("train", ["augment=standard", f"augment.{key}={value}".replace(" ", "")])
    assert str(e.value).startswith(f"augment.{key}=") and "\n" not in str(e.value)
    # ...and by the library itself, for callers that build it from Python
    params = {k: v for k, v in config.to_dict(config.compose("train", ["augment=standard"]).augment).items()
              if k != "_target_"}
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        RandomAugment(**{**params, key: value})


@pytest.mark.slow
@pytest.mark.parametrize("model", ["retina", "iou_retina", "faster_rcnn", "iou_net"])
def test_detectors_train_on_images_without_boxes(model):
    """Crops can leave an image with no box: every detector's loss must stay finite (and backward work)."""
    cfg = config.compose("train", [f"model={model}", "model.min_size=64", "model.max_size=64"])
    torch.manual_seed(0)
    net = config.instantiate_model(cfg.model, num_classes=3, pool=config.instantiate(cfg.pool)).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    for targets in ([{"boxes": torch.tensor([[5.0, 5, 30, 30]]), "labels": torch.tensor([1])}, empty],
                    [empty, empty]):
        losses = net([torch.rand(3, 64, 64), torch.rand(3, 50, 60)], targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
