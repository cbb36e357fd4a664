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
