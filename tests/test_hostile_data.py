"""Hostile data (reliability issue 20, data layer): each row of a table is one file a user could really hand us.

Images in every PIL mode must reach the model as the 8-bit RGB they depict; links, truncated files, decompression
bombs, foreign encodings and one-class data must be refused as bad rows or DataErrors naming the file, the row and
the fix, or accepted where they are fine. Offline, CPU, seconds.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpeft.core.schema import RecipeError
from mmpeft.data import DataError, Example, ImageDataset, apply_shifts, load_data, load_image
from mmpeft.data.sources import DatasetImage
from mmpeft.runs.recipe import load_recipe
from mmpeft.specs import DataSpec, SplitSpec

SPLIT = SplitSpec(val=0, test=0.5)
# PIL warns when it opens a file claiming > 89M pixels; the bombs below are meant to be refused, not decoded
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
TOLERANCE = 1.0  # per-channel mean, in 8-bit levels (rounding only)


def halves(left: np.ndarray | float, right: np.ndarray | float, dtype: type, shape: tuple[int, ...] = (4, 4),
           ) -> np.ndarray:
    """An array whose left half holds `left` and right half `right` (per pixel, broadcast over channels)."""
    pixels = np.zeros(shape, dtype=dtype)
    pixels[:, : shape[1] // 2] = left
    pixels[:, shape[1] // 2:] = right
    return pixels


def save(tmp: Path, name: str, image: Image.Image, **params) -> str:
    path = tmp / name
    image.save(path, **params)
    return str(path)


def write_pgm16(tmp: Path) -> str:
    """A 16-bit PGM (maxval 65535): PIL opens it as mode I, not I;16."""
    pixels = halves(0, 40000, np.dtype(">u2"))
    path = tmp / "gray16.pgm"
    path.write_bytes(b"P5\n4 4\n65535\n" + pixels.tobytes())
    return str(path)


def write_palette(tmp: Path) -> str:
    """Palette image: index 0 black and transparent (left half), index 1 opaque red (right half)."""
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (2, 0, 4, 4))
    return save(tmp, "palette.png", image, transparency=0)


def write_cmyk(tmp: Path) -> str:
    image = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # left: full cyan
    image.paste((0, 0, 0, 128), (2, 0, 4, 4))  # right: half black
    return save(tmp, "cmyk.tif", image)


# (mode the file opens in, how to make it, expected mean of R, G, B after conversion). Each mean is what the
# picture shows in 8 bits; "old" is what convert("RGB") gave.
MODE_CASES: list = [
    # 16-bit: scaled by 65535 (40000 -> 155.6). Old: clipped to 0/255 -> 127.5.
    pytest.param("I;16", lambda t: save(t, "gray16.png", Image.fromarray(halves(0, 40000, np.uint16))),
                 (77.8, 77.8, 77.8), id="I;16-png"),
    pytest.param("I", write_pgm16, (77.8, 77.8, 77.8), id="I-16bit-pgm"),
    # 32-bit ints outside 16 bits: min-max over the image (0, 127.5, 255). Old: clipped -> 0, 255, 255 = 170.
    pytest.param("I", lambda t: save(t, "int32.tif", Image.fromarray(
        np.repeat(np.array([[-1000], [49500], [100000]], dtype=np.int32), 3, axis=1))),
                 (127.7, 127.7, 127.7), id="I-wide-tif"),
    # float in [0, 1]: x 255. Old: 0.6 -> 1 (black).
    pytest.param("F", lambda t: save(t, "float01.tif", Image.fromarray(np.full((4, 4), 0.6, np.float32))),
                 (153.0, 153.0, 153.0), id="F-unit-tif"),
    # float in [0, 255]: kept (min-max would give 127.5).
    pytest.param("F", lambda t: save(t, "float255.tif", Image.fromarray(halves(10.0, 200.0, np.float32))),
                 (105.0, 105.0, 105.0), id="F-8bit-range-tif"),
    # float beyond both: min-max (0, 127.5, 255). Old: clipped -> 0, 0, 5.
    pytest.param("F", lambda t: save(t, "float-wide.tif", Image.fromarray(
        np.repeat(np.array([[-5.0], [0.0], [5.0]], dtype=np.float32), 3, axis=1))),
                 (127.7, 127.7, 127.7), id="F-wide-tif"),
    # transparent red (left) on white + opaque blue (right). Old: alpha dropped -> red.
    pytest.param("RGBA", lambda t: save(t, "rgba.png", Image.fromarray(
        halves(np.array([255, 0, 0, 0]), np.array([0, 0, 255, 255]), np.uint8, (4, 4, 4)))),
                 (127.5, 127.5, 255.0), id="RGBA-png"),
    # grey 50 fully transparent -> white. Old: 50.
    pytest.param("LA", lambda t: save(t, "la.png", Image.new("LA", (4, 4), (50, 0))),
                 (255.0, 255.0, 255.0), id="LA-png"),
    # black half 50% transparent over white: 127; opaque black: 0. Old: 0 everywhere.
    pytest.param("LA", lambda t: save(t, "la-half.png", Image.fromarray(
        halves(np.array([0, 128]), np.array([0, 255]), np.uint8, (4, 4, 2)))),
                 (63.5, 63.5, 63.5), id="LA-half-alpha-png"),
    # transparent index -> white, red index stays. Old: transparent black.
    pytest.param("P", write_palette, (255.0, 127.5, 127.5), id="P-transparency-png"),
    # grey-level transparency key of a 16-bit PNG: key 0 -> white, 40000 -> 155.6. Old: 0 and 255.
    pytest.param("I;16", lambda t: save(t, "gray16-key.png", Image.fromarray(halves(0, 40000, np.uint16)),
                                        transparency=0), (205.5, 205.5, 205.5), id="I;16-transparency-key-png"),
    # colour-key transparency of an RGB PNG -> white. Old: the key colour (10, 20, 30).
    pytest.param("RGB", lambda t: save(t, "rgb-key.png", Image.fromarray(
        halves(np.array([10, 20, 30]), np.array([0, 0, 200]), np.uint8, (4, 4, 3))), transparency=(10, 20, 30)),
                 (127.5, 127.5, 227.5), id="RGB-transparency-key-png"),
    # PIL's multiplicative CMYK: full cyan -> (0, 255, 255), K 128 -> 127. Unchanged from before.
    pytest.param("CMYK", write_cmyk, (63.5, 191.0, 191.0), id="CMYK-tif"),
    # bilevel: half black, half white. Unchanged from before.
    pytest.param("1", lambda t: save(t, "bilevel.png", Image.fromarray(halves(False, True, bool))),
                 (127.5, 127.5, 127.5), id="1-png"),
    # in-memory premultiplied modes (no file format stores them): fully transparent -> white.
    pytest.param("RGBa", lambda t: Image.new("RGBa", (4, 4), (0, 0, 0, 0)), (255.0, 255.0, 255.0), id="RGBa-memory"),
    # Old: ValueError "conversion from La to RGB not supported".
    pytest.param("La", lambda t: Image.new("La", (4, 4), (0, 0)), (255.0, 255.0, 255.0), id="La-memory"),
]


@pytest.mark.parametrize(("mode", "make", "expected"), MODE_CASES)
def test_every_mode_converts_to_the_8bit_rgb_it_shows(tmp_path: Path, mode: str, make: Callable,
                                                       expected: tuple[float, float, float]) -> None:
    ref = make(tmp_path)
    if isinstance(ref, str):
        with Image.open(ref) as opened:
            assert opened.mode == mode  # the case really exercises the mode it names
    else:
        assert ref.mode == mode
    image = load_image(ref)
    assert image.mode == "RGB" and image.size in ((4, 4), (3, 3))
    means = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert np.allclose(means, expected, atol=TOLERANCE), (means.tolist(), expected)


def test_every_reader_uses_the_one_conversion(tmp_path: Path) -> None:
    """A 16-bit PNG gives the same pixels through load_image, the dataset, shifts and a `datasets` table."""
    import datasets

    path = save(tmp_path, "gray16.png", Image.fromarray(halves(0, 40000, np.uint16)))
    expected = np.asarray(load_image(path))
    assert expected[0, 3].tolist() == [156, 156, 156] and expected[0, 0].tolist() == [0, 0, 0]
    assert np.array_equal(np.asarray(ImageDataset([Example(path, 0)])[0]["image"]), expected)
    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(apply_shifts(opened, (), 0)), expected)
    table = datasets.Dataset.from_dict({"image": [{"bytes": Path(path).read_bytes(), "path": None}]},
                                       features=datasets.Features({"image": datasets.Image(decode=False)}))
    ref = DatasetImage(table, "image", 0)
    assert np.array_equal(np.asarray(load_image(ref)), expected)



@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_backbone_preprocesses_any_mode_as_the_data_pipeline_does(tmp_path: Path, kind: str) -> None:
    """`backbone.preprocess([Image.open(path)])` (the Python API, the model card's snippet): a dual encoder handed a
    16-bit PNG to its processor, whose RGB conversion clipped it to white."""
    from mmpeft.backbones import load_backbone
    from mmpeft.specs import BackboneSpec
    from mmpeft.tiny.store import tiny_backbone

    backbone = load_backbone(BackboneSpec(id=str(tiny_backbone(kind))))
    path = save(tmp_path, "gray16.png", Image.fromarray(halves(0, 40000, np.uint16)))
    with Image.open(path) as opened:
        given = backbone.preprocess([opened])
    assert torch_equal(given, backbone.preprocess([load_image(path)]))
    assert not torch_equal(given, backbone.preprocess([Image.new("RGB", (4, 4), (255, 255, 255))]))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


# ---------------------------------------------------------------- hostile files through load_data


@dataclass
class Outcome:
    """What load_data must do: raise a DataError (`error` exactly, or containing `error_part`), or keep `kept`."""

    error: str | None = None
    error_part: str | None = None
    kept: list[str] = field(default_factory=list)  # image file names of the kept examples, sorted
    warning: str | None = None  # part of the logged warning (on_bad_rows: skip)
    classes: list[str] | None = None


def write_png(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_rows(tmp: Path, extra: list[str], header: str = "image,label") -> tuple[Path, Path]:
    """data/rows.csv with four good rows (cat 0-1, dog 2-3) then `extra`; returns (csv, image root)."""
    root = tmp / "data"
    lines = [header]
    for i in range(4):
        write_png(root / f"{i}.png", value=i)
        lines.append(f"{i}.png,{'cat' if i < 2 else 'dog'}" + (",a caption" if header.count(",") == 2 else ""))
    path = root / "rows.csv"
    path.write_text("\n".join(lines + extra) + "\n")
    return path, root


GOOD = ["0.png", "1.png", "2.png", "3.png"]


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: `Image.verify()` passes it (it does not decode JPEG data), decoding fails."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()  # the old check: passes
    return path


def write_bomb(path: Path, width: int = 12000, height: int = 12000) -> Path:
    """A valid-looking PNG of under 200 bytes whose header claims width x height 8-bit grey pixels (144 MB here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
                     + chunk(b"IEND", b""))
    assert path.stat().st_size < 200
    return path


def symlink_to_file(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["link.png,cat"])
    secret = write_png(tmp / "outside" / "secret.png", value=9)
    os.symlink(secret, root / "link.png")
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"1 bad row in {csv}: line 6: image path 'link.png' leads through a symbolic link to {secret.resolve()}, "
        f"outside the image root {root}. Fix them or set data.on_bad_rows: skip"))


def symlink_to_folder(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["linked/secret.png,dog"])
    secret = write_png(tmp / "outside" / "secret.png", value=9)
    os.symlink(secret.parent, root / "linked", target_is_directory=True)
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"1 bad row in {csv}: line 6: image path 'linked/secret.png' leads through a symbolic link to "
        f"{secret.resolve()}, outside the image root {root}. Fix them or set data.on_bad_rows: skip"))


def symlink_to_etc_passwd_skipped(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["passwd.png,cat"])
    os.symlink("/etc/passwd", root / "passwd.png")
    return DataSpec(source="csv", path=str(csv), on_bad_rows="skip", split=SPLIT), Outcome(
        kept=GOOD, warning=f"line 6: image path 'passwd.png' leads through a symbolic link to "
                           f"{os.path.realpath('/etc/passwd')}, outside the image root {root}")


def symlink_inside_root(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["alias.png,dog"])
    os.symlink(root / "3.png", root / "alias.png")  # a link that stays inside the root is fine
    return DataSpec(source="csv", path=str(csv), split=SPLIT), Outcome(kept=sorted(GOOD + ["alias.png"]))


def truncated_jpeg(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["cut.jpg,dog"])
    path = write_truncated_jpeg(root / "cut.jpg")
    return DataSpec(source="csv", path=str(csv)), Outcome(
        error_part=f"1 bad row in {csv}: line 6: image '{path}' is unreadable (OSError: image file is truncated")


def truncated_jpeg_skipped(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["cut.jpg,dog"])
    path = write_truncated_jpeg(root / "cut.jpg")
    return DataSpec(source="csv", path=str(csv), on_bad_rows="skip", split=SPLIT), Outcome(
        kept=GOOD, warning=f"(1 unreadable image): line 6: image '{path}' is unreadable (OSError: image file is "
                           "truncated")


def truncated_jpeg_in_datasets_table(tmp: Path) -> tuple[DataSpec, Outcome]:
    """Image bytes stored inside a saved `datasets` table are checked by decoding too."""
    import datasets

    cut = write_truncated_jpeg(tmp / "cut.jpg").read_bytes()
    images = [{"bytes": write_png(tmp / f"{i}.png", value=i).read_bytes(), "path": None} for i in range(4)]
    table = datasets.Dataset.from_dict(
        {"image": images + [{"bytes": cut, "path": None}], "label": [0, 0, 1, 1, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}))
    table.save_to_disk(str(tmp / "saved"))
    return DataSpec(source="hf_disk", path=str(tmp / "saved")), Outcome(
        error_part=f"1 bad row in {tmp / 'saved'}: row 4: image is unreadable (OSError: image file is truncated")


def bomb(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["bomb.png,cat"])
    path = write_bomb(root / "bomb.png")
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"1 bad row in {csv}: line 6: image '{path}' is too large (12000x12000 = 144,000,000 pixels, over "
        "data.max_image_pixels = 50,000,000): downscale it or raise data.max_image_pixels (null: no cap). "
        "Fix them or set data.on_bad_rows: skip"))


def bomb_skipped(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["bomb.png,cat"])
    write_bomb(root / "bomb.png")
    return DataSpec(source="csv", path=str(csv), on_bad_rows="skip", split=SPLIT), Outcome(
        kept=GOOD, warning="skipped 1 bad row in")


def bomb_in_folder_source(tmp: Path) -> tuple[DataSpec, Outcome]:
    for label in ("cat", "dog"):
        for i in range(2):
            write_png(tmp / "imgs" / label / f"{label}{i}.png", value=i)
    path = write_bomb(tmp / "imgs" / "dog" / "bomb.png")
    return DataSpec(source="folder", path=str(tmp / "imgs")), Outcome(
        error_part=f"1 bad row in {tmp / 'imgs'}: dog/bomb.png: image '{path}' is too large (12000x12000")


def small_cap(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["big.png,cat"])
    path = write_png(root / "big.png", size=20)
    return DataSpec(source="csv", path=str(csv), max_image_pixels=100), Outcome(error_part=(
        f"line 6: image '{path}' is too large (20x20 = 400 pixels, over data.max_image_pixels = 100)"))


def no_cap(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, ["big.png,cat"])
    write_png(root / "big.png", size=20)
    return DataSpec(source="csv", path=str(csv), max_image_pixels=None, split=SPLIT), Outcome(
        kept=sorted(GOOD + ["big.png"]))


def latin1_csv(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, [])
    csv.write_bytes(csv.read_bytes() + "café.png,dog\n".encode("latin-1"))
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"{csv}: line 6 is not UTF-8 text (byte 0xe9 at column 4, near 'café.png,dog'): the file uses another "
        "encoding (latin-1 or cp1252, as older spreadsheet exports do). Save it as UTF-8 and run again"))


def jsonl_rows(root: Path) -> list[str]:
    for i in range(4):
        write_png(root / f"{i}.png", value=i)
    return [json.dumps({"image": f"{i}.png", "label": "cat" if i < 2 else "dog"}) for i in range(4)]


def latin1_jsonl(tmp: Path) -> tuple[DataSpec, Outcome]:
    path = tmp / "rows.jsonl"
    lines = jsonl_rows(tmp) + ['{"image": "0.png", "label": "chat noir\xe9"}']
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return DataSpec(source="jsonl", path=str(path)), Outcome(error=(
        f"{path}: line 5 is not UTF-8 text (byte 0xe9 at column 39, near 'el\": \"chat noir\xe9\"}}'): the file "
        "uses another encoding (latin-1 or cp1252, as older spreadsheet exports do). Save it as UTF-8 and run again"))


def jsonl_with_bom(tmp: Path) -> tuple[DataSpec, Outcome]:
    path = tmp / "rows.jsonl"
    path.write_text("\ufeff" + "\n".join(jsonl_rows(tmp)) + "\n", encoding="utf-8")
    return DataSpec(source="jsonl", path=str(path), split=SPLIT), Outcome(kept=GOOD, classes=["cat", "dog"])


def one_class_folder(tmp: Path) -> tuple[DataSpec, Outcome]:
    for i in range(6):
        write_png(tmp / "imgs" / "cat" / f"{i}.png", value=i)
    return DataSpec(source="folder", path=str(tmp / "imgs")), Outcome(error=(
        f"1 class ('cat') found in {tmp / 'imgs'} (data.source: folder): classification needs at least 2. Add images "
        "of other classes, or give every row its own caption (data.text_column: 'text') for caption data"))


def one_class_left_after_skipping(tmp: Path) -> tuple[DataSpec, Outcome]:
    csv, root = write_rows(tmp, [])
    return DataSpec(source="csv", path=str(csv), classes=("cat",), on_bad_rows="skip"), Outcome(error=(
        f"1 class ('cat') in data.classes for {csv} (data.source: csv): classification needs at least 2. Add images "
        "of other classes, or give every row its own caption (data.text_column: 'text') for caption data"))


def one_class_captions(tmp: Path) -> tuple[DataSpec, Outcome]:
    """Caption data (every row has its own text) may carry one placeholder label: still accepted."""
    root = tmp / "data"
    lines = ["image,label,text"] + [f"{i}.png,photo,caption {i}" for i in range(4)]
    for i in range(4):
        write_png(root / f"{i}.png", value=i)
    (root / "rows.csv").write_text("\n".join(lines) + "\n")
    return DataSpec(source="csv", path=str(root / "rows.csv"), split=SPLIT), Outcome(kept=GOOD, classes=["photo"])


def label_column_twice(tmp: Path) -> tuple[DataSpec, Outcome]:
    """Two `label` columns: csv.DictReader would silently keep the last one for every row."""
    csv, root = write_rows(tmp, [], header="image,label,label")
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"{csv}: the header names column 'label' 2 times (columns: image, label, label), so which one to read is "
        "ambiguous; rename all but one"))


def url_image_column(tmp: Path) -> tuple[DataSpec, Outcome]:
    """img2dataset's input (a table of URLs) given as the training table: not a missing file under ./https:/."""
    csv, root = write_rows(tmp, ["https://example.com/cat.jpg,cat"])
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"1 bad row in {csv}: line 6: image 'https://example.com/cat.jpg' is a URL; image paths name local files: "
        "download the images first (img2dataset writes them as files or shards). Fix them or set data.on_bad_rows: "
        "skip"))


def windows_path(tmp: Path) -> tuple[DataSpec, Outcome]:
    """A table written on Windows: `sub\\cat.png` is no file here; the error says to write /."""
    csv, root = write_rows(tmp, ["sub\\4.png,cat"])
    write_png(root / "sub" / "4.png", value=4)
    return DataSpec(source="csv", path=str(csv)), Outcome(error=(
        f"1 bad row in {csv}: line 6: image 'sub\\\\4.png' not found under {root}; it is written with backslashes: "
        "write paths with / (images/cat.png). Fix them or set data.on_bad_rows: skip"))


DATA_CASES = [pytest.param(build, id=build.__name__) for build in (
    symlink_to_file, symlink_to_folder, symlink_to_etc_passwd_skipped, symlink_inside_root,
    truncated_jpeg, truncated_jpeg_skipped, truncated_jpeg_in_datasets_table,
    bomb, bomb_skipped, bomb_in_folder_source, small_cap, no_cap,
    latin1_csv, latin1_jsonl, jsonl_with_bom, one_class_folder, one_class_left_after_skipping, one_class_captions,
    label_column_twice, url_image_column, windows_path,
)]


@pytest.mark.parametrize("build", DATA_CASES)
def test_hostile_data(build: Callable[[Path], tuple[DataSpec, Outcome]], tmp_path: Path,
                      caplog: pytest.LogCaptureFixture) -> None:
    spec, expected = build(tmp_path)
    if expected.error or expected.error_part:
        with pytest.raises(DataError) as caught:
            load_data(spec, seed=0)
        if expected.error:
            assert str(caught.value) == expected.error
        else:
            assert expected.error_part in str(caught.value)
        return
    with caplog.at_level(logging.WARNING, logger="mmpeft"):
        data = load_data(spec, seed=0)
    assert sorted(Path(e.image).name for e in data.train + data.val + data.test) == expected.kept
    if expected.warning:
        assert expected.warning in " ".join(r.getMessage() for r in caplog.records)
    if expected.classes:
        assert data.labels.keys == expected.classes


def test_a_file_broken_after_checking_names_itself_when_read(tmp_path: Path) -> None:
    """The dataset raises a DataError naming the file, not a bare PIL error that stops an epoch anonymously."""
    csv, root = write_rows(tmp_path, ["late.jpg,dog"])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "late.jpg")
    data = load_data(DataSpec(source="csv", path=str(csv), split=SPLIT), seed=0)
    examples = data.train + data.test
    write_truncated_jpeg(root / "late.jpg")  # damaged after the bad-row checks passed
    index = [Path(e.image).name for e in examples].index("late.jpg")
    with pytest.raises(DataError) as caught:
        ImageDataset(examples)[index]
    assert str(caught.value).startswith(f"cannot read image '{root / 'late.jpg'}': OSError: image file is truncated")
    assert str(caught.value).endswith("Replace or remove the file (it was damaged or changed after the data was "
                                      "checked)")


# ---------------------------------------------------------------- recipe: templates


TEMPLATE_CASES = [
    pytest.param("{label} {x}", "data.templates[1]: '{label} {x}' has the unknown field {x}: only {label} is filled "
                 "in; write {{ or }} for a literal brace", id="unknown-name"),  # old: KeyError at zero-shot
    pytest.param("{label} {0}", "data.templates[1]: '{label} {0}' has the unknown field {0}: only {label} is filled "
                 "in; write {{ or }} for a literal brace", id="positional"),  # old: IndexError
    pytest.param("{label} {", "data.templates[1]: '{label} {' is not a valid template (Single '{' encountered in "
                 "format string); write {{ or }} for a literal brace", id="lone-brace"),  # old: ValueError
    pytest.param("a {{label}}", "data.templates[1]: 'a {{label}}' has no {label} field ({{label}} is literal text)",
                 id="escaped-label"),  # old: accepted, every class got the same prompt "a {label}"
    pytest.param("{{x}} of a {label}", None, id="escaped-braces-ok"),
]


@pytest.mark.parametrize(("template", "problem"), TEMPLATE_CASES)
def test_template_fields_are_checked_in_the_recipe(template: str, problem: str | None) -> None:
    source = {"method": "lora", "data": {"templates": ["a photo of a {label}.", template]}}
    if problem is None:
        assert load_recipe(source).data.templates[1].format(label="cat") == "{x} of a cat"
        return
    with pytest.raises(RecipeError) as caught:
        load_recipe(source)
    assert caught.value.problems == [problem]
