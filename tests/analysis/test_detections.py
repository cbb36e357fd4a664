"""The raw-detections file format and the Detections table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iouctl.data.detections import FORMAT_NAME, FORMAT_VERSION, Detections, DetectionsFormatError
from iouctl.errors import IouctlError


def make(n: int = 7, with_ious: bool = True, seed: int = 0) -> Detections:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 50
    return Detections(
        image_ids=torch.randint(1, 4, (n,), generator=g) * 10,
        boxes=torch.cat([xy, xy + wh], 1),
        labels=torch.randint(1, 3, (n,), generator=g),
        scores=torch.rand(n, generator=g),
        ious=torch.rand(n, generator=g) if with_ious else None,
        meta={"model": "m", "split": "val", "nested": {"a": [1, 2]}},
    )


def assert_same(a: Detections, b: Detections) -> None:
    for k in ("image_ids", "boxes", "labels", "scores"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert (a.ious is None) == (b.ious is None)
    if a.ious is not None:
        assert torch.equal(a.ious, b.ious)
    assert a.meta == b.meta


def write_npz(path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def good_arrays(n: int = 3, version: int = FORMAT_VERSION) -> dict:
    return {
        "header": np.array(json.dumps({"format": FORMAT_NAME, "version": version, "meta": {"m": 1}})),
        "image_ids": np.arange(n, dtype=np.int64),
        "boxes": np.tile(np.array([[0, 0, 2, 3]], np.float32), (n, 1)),
        "labels": np.ones(n, np.int64),
        "scores": np.full(n, 0.5, np.float32),
    }


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("with_ious", [True, False])
@pytest.mark.parametrize("n", [0, 1, 9])
def test_save_load_roundtrip_is_bit_exact(tmp_path, n, with_ious):
    d = make(n, with_ious)
    p = d.save(tmp_path / "sub" / "val.npz")
    assert p == tmp_path / "sub" / "val.npz"
    assert sorted(x.name for x in p.parent.iterdir()) == ["val.npz"]  # no temp file left behind
    back = Detections.load(p)
    assert_same(d, back)
    assert back.image_ids.dtype == torch.int64 and back.boxes.dtype == torch.float32
    assert back.has_ious is with_ious
    with np.load(p, allow_pickle=False) as z:  # the documented key set, nothing else
        assert set(z.files) == {"header", "image_ids", "boxes", "labels", "scores"} | ({"ious"} if with_ious else set())


def test_hand_written_numpy_file_with_other_widths_loads_and_casts(tmp_path):
    # The docs/detections.md recipe with int32 ids and float64 boxes, as another framework might write.
    a = good_arrays(4)
    a["image_ids"] = a["image_ids"].astype(np.int32)
    a["labels"] = a["labels"].astype(np.uint16)
    a["boxes"] = a["boxes"].astype(np.float64)
    a["ious"] = np.linspace(0, 1, 4).astype(np.float16)
    write_npz(tmp_path / "d.npz", **a)
    d = Detections.load(tmp_path / "d.npz")
    assert d.image_ids.dtype == torch.int64 and d.labels.dtype == torch.int64
    assert d.boxes.dtype == torch.float32 and d.ious.dtype == torch.float32
    assert d.image_ids.tolist() == [0, 1, 2, 3] and d.meta == {"m": 1}
    assert d.ious.tolist() == [0.0, pytest.approx(1 / 3, abs=1e-3), pytest.approx(2 / 3, abs=1e-3), 1.0]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 2**31 - 1), with_ious=st.booleans())
def test_roundtrip_property(tmp_path_factory, n, seed, with_ious):
    d = make(n, with_ious, seed)
    p = d.save(tmp_path_factory.mktemp("rt") / "d.npz")
    assert_same(d, Detections.load(p))


# ---------------------------------------------------------------- bad files: one clear error naming the file
def _bad(name: str, tmp_path):
    a = good_arrays()
    if name == "missing_key":
        del a["scores"]
    elif name == "unknown_key":
        a["iou"] = np.zeros(3, np.float32)  # a typo of "ious"
    elif name == "wrong_shape":
        a["boxes"] = np.zeros((3, 5), np.float32)
    elif name == "wrong_length":
        a["labels"] = np.ones(2, np.int64)
    elif name == "float_ids":
        a["image_ids"] = a["image_ids"].astype(np.float32)
    elif name == "int_boxes":
        a["boxes"] = a["boxes"].astype(np.int64)
    elif name == "string_scores":
        a["scores"] = np.array(["a", "b", "c"])
    elif name == "nan_box":
        a["boxes"][1, 2] = np.nan
    elif name == "inf_score":
        a["scores"][0] = np.inf
    elif name == "inverted_box":
        a["boxes"][2] = [5, 5, 1, 9]
    elif name == "bad_version":
        a = good_arrays(version=99)
    elif name == "bad_header_json":
        a["header"] = np.array("{not json")
    elif name == "header_not_string":
        a["header"] = np.array([1, 2])
    elif name == "wrong_format":
        a["header"] = np.array(json.dumps({"format": "other", "version": 1}))
    elif name == "huge_float64":
        a["scores"] = np.array([1e300, 0, 0])
    elif name == "score_above_1":
        a["scores"][1] = 1.5
    elif name == "negative_score":
        a["scores"][2] = -0.25
    elif name == "iou_minus_1":
        a["ious"] = np.array([0.5, -1, 0.5], np.float32)
    elif name == "iou_2":
        a["ious"] = np.array([2, 2, 0.5], np.float32)
    p = tmp_path / f"{name}.npz"
    write_npz(p, **a)
    return p


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("missing_key", "missing keys ['scores']"),
        ("unknown_key", "unknown keys ['iou']"),
        ("wrong_shape", "'boxes' has shape [3, 5]; expected [N, 4]"),
        ("wrong_length", "'labels' has shape [2]; expected [N] with N=3"),
        ("float_ids", "'image_ids' has dtype float32; expected an integer dtype"),
        ("int_boxes", "'boxes' has dtype int64; expected a floating dtype"),
        ("string_scores", "'scores' has dtype <U1"),
        ("nan_box", "'boxes' has a non-finite value (first at detection 1)"),
        ("inf_score", "'scores' has a non-finite value (first at detection 0)"),
        ("inverted_box", "1 boxes have x2 < x1 or y2 < y1 (first at detection 2"),
        ("bad_version", "format version 99 is not supported"),
        ("bad_header_json", "'header' is not valid JSON"),
        ("header_not_string", "'header' must be a 0-d unicode string"),
        ("wrong_format", "header 'format' must be 'iouctl-detections'"),
        ("huge_float64", "'scores' has a non-finite value"),
        ("score_above_1", "'scores' has 1 values outside [0, 1] (first at detection 1: 1.5)"),
        ("negative_score", "'scores' has 1 values outside [0, 1] (first at detection 2: -0.25)"),
        ("iou_minus_1", "'ious' has 1 values outside [0, 1] (first at detection 1: -1)"),
        ("iou_2", "'ious' has 2 values outside [0, 1] (first at detection 0: 2)"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path, name, fragment):
    p = _bad(name, tmp_path)
    with pytest.raises(DetectionsFormatError) as e:
        Detections.load(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and fragment in msg and "\n" not in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, IouctlError)  # the CLI prints it as one line


def test_pickled_object_array_is_refused_without_unpickling(tmp_path):
    p = tmp_path / "evil.npz"
    a = good_arrays()
    a["scores"] = np.array([object(), 1, 2], dtype=object)  # savez pickles object arrays
    write_npz(p, **a)
    with pytest.raises(DetectionsFormatError, match="without pickles"):
        Detections.load(p)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_garbage_and_missing_files(tmp_path, content):
    p = tmp_path / "x.npz"
    p.write_bytes(content)
    with pytest.raises(DetectionsFormatError, match=str(p)):
        Detections.load(p)
    with pytest.raises(DetectionsFormatError, match="no such detections file"):
        Detections.load(tmp_path / "absent.npz")


def test_bounds_of_the_unit_range_are_valid(tmp_path):
    a = good_arrays()
    a["scores"] = np.array([0, 1, 0.5], np.float32)
    a["ious"] = np.array([1, 0, 0.25], np.float32)
    write_npz(tmp_path / "d.npz", **a)
    d = Detections.load(tmp_path / "d.npz")
    assert d.scores.tolist() == [0, 1, 0.5] and d.ious.tolist() == [1, 0, 0.25]


def _npy_member(shape, dtype="<f4", data=b"") -> bytes:
    import io

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue() + data


@pytest.mark.parametrize("compression", ["stored", "deflated"])
def test_a_header_declaring_terabytes_is_refused_before_reading(tmp_path, compression, monkeypatch):
    import zipfile

    p = tmp_path / "huge.npz"
    write_npz(p, **good_arrays())
    members = {}
    with zipfile.ZipFile(p) as z:
        for name in z.namelist():
            members[name] = z.read(name)
    # boxes [4e11, 4] float32: 1.46 TiB declared, 48 bytes held
    members["boxes.npy"] = _npy_member((400_000_000_000, 4), data=np.zeros((3, 4), np.float32).tobytes())
    how = zipfile.ZIP_STORED if compression == "stored" else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(p, "w", how) as z:
        for name, data in members.items():
            z.writestr(name, data)

    def no_reading(*a, **k):  # the refusal must come from the header, before numpy reads (and allocates) the array
        raise AssertionError("np.load was called")

    monkeypatch.setattr(np, "load", no_reading)
    with pytest.raises(DetectionsFormatError) as e:
        Detections.load(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    assert "'boxes' declares shape [400000000000, 4] float32 (6,400,000,000,000 bytes) but holds 48 bytes" in msg


def test_single_npy_is_not_a_detections_file(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros(3))
    with pytest.raises(DetectionsFormatError, match="single .npy array"):
        Detections.load(p)


def test_truncated_file_raises_format_error(tmp_path):
    p = make(50).save(tmp_path / "d.npz")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DetectionsFormatError):
        Detections.load(p)


def test_meta_must_be_json(tmp_path):
    d = make(2)
    d.meta = {"f": object()}
    with pytest.raises(DetectionsFormatError, match="meta is not JSON-serialisable"):
        d.save(tmp_path / "d.npz")
    assert not (tmp_path / "d.npz").exists()


# ---------------------------------------------------------------- in-memory validation
def test_constructor_validates_and_casts():
    d = Detections(
        np.array([1, 2], np.int32),
        np.zeros((2, 4)),
        torch.tensor([3, 3], dtype=torch.int16),
        torch.zeros(2, dtype=torch.float64),
    )
    assert d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64 and d.scores.dtype == torch.float32
    with pytest.raises(DetectionsFormatError, match="'scores' has shape \\[3\\]; expected \\[N\\] with N=2"):
        Detections(torch.tensor([1, 2]), torch.zeros(2, 4), torch.tensor([1, 1]), torch.zeros(3))
    with pytest.raises(DetectionsFormatError, match="'labels' has dtype torch.bool"):
        Detections(torch.tensor([1]), torch.zeros(1, 4), torch.tensor([True]), torch.zeros(1))
    with pytest.raises(DetectionsFormatError, match="must be a torch.Tensor or numpy array"):
        Detections([1], torch.zeros(1, 4), torch.tensor([1]), torch.zeros(1))
    with pytest.raises(DetectionsFormatError, match="'meta' must be a dict"):
        Detections(torch.tensor([1]), torch.zeros(1, 4), torch.tensor([1]), torch.zeros(1), meta=["x"])
    with pytest.raises(DetectionsFormatError, match=r"'scores' has 1 values outside \[0, 1\]"):
        Detections(torch.tensor([1]), torch.zeros(1, 4), torch.tensor([1]), torch.tensor([1.01]))
    with pytest.raises(DetectionsFormatError, match=r"'ious' has 1 values outside \[0, 1\]"):
        Detections(torch.tensor([1]), torch.zeros(1, 4), torch.tensor([1]), torch.ones(1), torch.tensor([-0.5]))


# ---------------------------------------------------------------- table operations vs plain loops
def test_select_mask_index_slice():
    d = make(9)
    mask = d.scores > 0.5
    s = d.select(mask)
    assert s.scores.tolist() == [x for x, m in zip(d.scores.tolist(), mask.tolist()) if m]
    idx = torch.tensor([4, 0, 4])
    s = d.select(idx)
    assert s.image_ids.tolist() == [d.image_ids[4].item(), d.image_ids[0].item(), d.image_ids[4].item()]
    assert torch.equal(s.ious, d.ious[idx])
    assert_same(
        d.select(slice(2, 5)),
        Detections(d.image_ids[2:5], d.boxes[2:5], d.labels[2:5], d.scores[2:5], d.ious[2:5], d.meta),
    )
    with pytest.raises(ValueError, match="bool mask has shape \\[3\\]; expected \\[9\\]"):
        d.select(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        d.select(torch.tensor([9]))
    with pytest.raises(ValueError, match="1-d integer tensor"):
        d.select(torch.tensor([0.5]))
    assert len(d.select([])) == 0 and d.select([1, 2]).scores.tolist() == d.scores[1:3].tolist()


def test_concat_and_empty():
    a, b = make(3, seed=1), make(4, seed=2)
    c = Detections.concat([a, b])
    assert len(c) == 7 and c.meta == a.meta
    assert c.boxes.tolist() == a.boxes.tolist() + b.boxes.tolist()
    assert c.ious.tolist() == a.ious.tolist() + b.ious.tolist()
    assert len(Detections.concat([Detections.empty(True), a])) == 3
    with pytest.raises(ValueError, match="all or none"):
        Detections.concat([a, make(2, with_ious=False)])
    with pytest.raises(ValueError, match="empty list"):
        Detections.concat([])


def test_image_index_and_by_image_match_a_loop():
    d = make(30, seed=3)
    expect: dict[int, list[int]] = {}
    for i, img in enumerate(d.image_ids.tolist()):
        expect.setdefault(img, []).append(i)
    idx = d.image_index()
    assert list(idx) == sorted(expect)
    assert {k: v.tolist() for k, v in idx.items()} == expect
    per = d.by_image()
    for img, rows in expect.items():
        assert per[img].scores.tolist() == [d.scores[i].item() for i in rows]
    assert Detections.empty().image_index() == {} and Detections.empty().by_image() == {}


@pytest.mark.parametrize("k", [0, 1, 3, 100])
def test_top_k_per_image_matches_a_loop_with_ties(k):
    d = make(40, seed=4)
    d.scores = torch.round(d.scores * 4) / 4  # many ties: the earlier row must win
    expect = []
    for img in sorted(set(d.image_ids.tolist())):
        rows = [i for i in range(len(d)) if d.image_ids[i] == img]
        rows = sorted(rows, key=lambda i: (-d.scores[i].item(), i))[:k]
        expect += rows
    d.ious = torch.arange(len(d), dtype=torch.float32) / 64  # row ids ride along (exact in float32, in [0, 1])
    kept = d.top_k_per_image(k)
    assert (kept.ious * 64).long().tolist() == sorted(expect)  # row order preserved
    alt = d.top_k_per_image(k, scores=-d.scores)  # a score override ranks by it instead
    assert len(alt) == len(kept)
    with pytest.raises(ValueError, match="k must be >= 0"):
        d.top_k_per_image(-1)


def test_to_coco_results_and_export(tmp_path):
    d = make(5)
    res = d.to_coco_results()
    for i, r in enumerate(res):
        x1, y1, x2, y2 = (
            float(v) for v in d.boxes[i]
        )  # float32 -> float64 is exact; so is the subtraction check below
        assert r == {
            "image_id": int(d.image_ids[i]),
            "category_id": int(d.labels[i]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(d.scores[i]),
        }
        assert type(r["image_id"]) is int and type(r["score"]) is float
    fused = (d.scores * d.ious).sqrt()
    assert [r["score"] for r in d.to_coco_results(fused)] == fused.double().tolist()
    p = d.export_coco_json(tmp_path / "res.json", scores=fused)
    assert json.loads(p.read_text()) == d.to_coco_results(fused)
    with pytest.raises(ValueError, match="scores must be a float Tensor\\[5\\]"):
        d.to_coco_results(torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        d.to_coco_results(torch.full((5,), float("nan")))
    assert Detections.empty().to_coco_results() == []
