"""Preview grid: a valid PNG whose tiles show the GT boxes in their class colour."""
import numpy as np
import pytest
import torch
from PIL import Image

from iouctl.data.preview import _color, render_preview
from iouctl.data.shapes import ShapesData


class FakeDataset:
    """n black 32x32 images, each with one box [4, 6, 20, 26] of label 2 (named 'dog')."""

    categories = [{"id": 2, "name": "dog"}]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 32, 32), {"boxes": torch.tensor([[4.0, 6.0, 20.0, 26.0]]),
                                        "labels": torch.tensor([2]), "iscrowd": torch.tensor([0]), "image_id": i}


def test_grid_geometry_and_box_pixels(tmp_path):
    out = render_preview(FakeDataset(5), tmp_path / "p" / "prev.png", num_images=4)
    img = Image.open(out)
    assert img.format == "PNG"
    # 32 px tiles upscaled x8 to 256; 4 tiles -> 2x2 grid with 4 px padding
    assert img.size == (2 * 260 + 4, 2 * 260 + 4)
    arr = np.asarray(img.convert("RGB"))
    ox, oy = 4, 4  # first tile's origin
    col = np.array(_color(2))
    # right edge of the box at x = 20*8 - 1 (inclusive), halfway down: box colour
    assert (arr[oy + 16 * 8, ox + 20 * 8 - 1] == col).all()
    # inside the box, away from the label text: still the black image
    assert (arr[oy + 20 * 8, ox + 12 * 8] == 0).all()


def test_deterministic_and_clamped_to_dataset_size(tmp_path):
    a = render_preview(FakeDataset(3), tmp_path / "a.png", num_images=8, seed=1).read_bytes()
    b = render_preview(FakeDataset(3), tmp_path / "b.png", num_images=8, seed=1).read_bytes()
    assert a == b
    assert Image.open(tmp_path / "a.png").size == (2 * 260 + 4, 2 * 260 + 4)  # 3 tiles -> 2x2 grid


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        render_preview(FakeDataset(0), tmp_path / "x.png")
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        render_preview(FakeDataset(2), tmp_path / "x.png", num_images=0)
    assert not (tmp_path / "x.png").exists()


def test_preview_of_shapes_dataset(tmp_path):
    d = ShapesData(str(tmp_path / "cache"), num_train=2, num_val=3, image_size=64, max_objects=4, max_size=24)
    out = render_preview(d.dataset("val"), tmp_path / "shapes.png", num_images=3)
    img = Image.open(out)
    img.verify()
    assert img.size == (2 * 260 + 4, 2 * 260 + 4)


def test_augmented_rows_show_the_image_then_its_draws(tmp_path):
    from iouctl.data.augment import MirrorPairs

    out = render_preview(FakeDataset(5), tmp_path / "aug.png", num_images=3, augment=MirrorPairs(), draws=1)
    arr = np.asarray(Image.open(out).convert("RGB"))
    assert arr.shape[:2] == (3 * 260 + 4, 2 * 260 + 4)  # a row per image: itself, then one draw
    col = np.array(_color(2))
    for row in range(3):
        oy = 4 + row * 260
        assert (arr[oy + 16 * 8, 4 + 20 * 8 - 1] == col).all()  # the original's right edge at x = 20
        mirrored = 4 + 260  # the mirror (MirrorPairs' first draw): box [12, 6, 28, 26]
        assert (arr[oy + 16 * 8, mirrored + 28 * 8 - 1] == col).all()
        assert (arr[oy + 16 * 8, mirrored + 12 * 8] == col).all()
        assert (arr[oy + 16 * 8, mirrored + 8 * 8] == 0).all()  # left of the mirrored box: black


@pytest.mark.slow
def test_preview_command_with_augment(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from iouctl.cli import app

    monkeypatch.setenv("IOUCTL_CACHE_DIR", str(tmp_path / "cache"))
    args = ["data", "preview", "--split", "train", "-n", "2", "data.num_train=4", "data.num_val=2",
            "data.image_size=64", f"paths.runs_dir={tmp_path / 'runs'}"]
    r = CliRunner().invoke(app, [*args, "--augment", "standard", "augment.crop_prob=0.0"])
    assert r.exit_code == 0, r.output
    (d,) = (tmp_path / "runs" / "data").iterdir()
    img = Image.open(d / "preview_train_standard.png")
    assert img.size == (4 * 260 + 4, 2 * 260 + 4)  # 2 images x (itself + 3 draws); 64 px tiles x4, no crop
    assert "crop_prob: 0.0" in (d / "config.yaml").read_text()  # augment.* overrides reach the preview

    r = CliRunner().invoke(app, [*args, "--augment", "fancy"])
    assert r.exit_code == 2
    assert "unknown option 'fancy' for config group 'augment'; valid: flip, none, standard" in r.output
