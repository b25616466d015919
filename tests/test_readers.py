"""Readers for PIL images, NIfTI, .npy; the intensity step and volume slicing."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.readers import (
    MAX_PIXELS,
    ReadOptions,
    read_image,
    reader_for,
    to_unit_range,
    volume_to_2d,
)
from medxfer.errors import BadFileError, MedxferError


def nib_file(name: str) -> Path:
    nibabel = pytest.importorskip("nibabel")
    return Path(nibabel.__file__).parent / "tests" / "data" / name


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height grey pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------- PIL


def test_8bit_grey_png_is_value_over_255(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.dtype == np.float32 and out.shape == (1, 16, 16)
    np.testing.assert_allclose(out[0], arr / 255.0, atol=1e-7)


def test_16bit_png_keeps_full_range(tmp_path):
    arr = np.linspace(0, 4000, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(arr).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    out = read_image(tmp_path / "x16.png")
    assert out.shape == (1, 64, 64)
    np.testing.assert_allclose(out[0], arr / 4000.0, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    assert len(np.unique(out)) > 256  # not quantised to 8 bits


def test_16bit_tiff_percentile_intensity(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 60000, size=(50, 40)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.tif")
    out = read_image(tmp_path / "x.tif", ReadOptions(intensity="p1-p99"))
    lo, hi = np.percentile(arr.astype(np.float64), [1, 99])
    np.testing.assert_allclose(out[0], np.clip((arr - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_rgb_jpeg_gives_three_channels(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (3, 20, 30)
    assert abs(out[0].mean() - 200 / 255) < 0.02 and out[1].mean() < 0.05


@pytest.mark.parametrize(("mode", "channels"), [("LA", 1), ("RGBA", 3), ("1", 1), ("CMYK", 3)])
def test_other_modes_convert(tmp_path, mode, channels):
    img = Image.new(mode, (12, 10))
    suffix = ".tif" if mode == "CMYK" else ".png"
    img.save(tmp_path / f"m{suffix}")
    out = read_image(tmp_path / f"m{suffix}")
    assert out.shape == (channels, 10, 12)


def test_palette_grey_is_one_channel_and_colour_three(tmp_path):
    grey = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10)).convert("P")
    grey.save(tmp_path / "pg.png")
    assert read_image(tmp_path / "pg.png").shape == (1, 10, 10)
    colour = Image.new("RGB", (10, 10), (255, 0, 0)).convert("P")
    colour.save(tmp_path / "pc.png")
    out = read_image(tmp_path / "pc.png")
    assert out.shape == (3, 10, 10) and out[0].min() == 1.0 and out[1].max() == 0.0


def test_multipage_tiff_frame(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "p.tif", save_all=True, append_images=pages[1:])
    assert read_image(tmp_path / "p.tif")[0, 0, 0] == pytest.approx(20 / 255)
    assert read_image(tmp_path / "p.tif", ReadOptions(frame="2"))[0, 0, 0] == pytest.approx(30 / 255)
    with pytest.raises(BadFileError, match="frame 5"):
        read_image(tmp_path / "p.tif", ReadOptions(frame="5"))


@pytest.mark.parametrize("size", [(60000, 60000), (20000, 20000)])
def test_decompression_bomb_refused(tmp_path, size):
    path = bomb_png(tmp_path / "bomb.png", *size)
    with pytest.raises(BadFileError, match="decompression bomb") as info:
        read_image(path)
    assert info.value.path == str(path)
    assert size[0] * size[1] > MAX_PIXELS


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match="truncated"):
        read_image(tmp_path / "t.png")


def test_empty_missing_garbage_and_unsupported(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(BadFileError, match="empty file"):
        read_image(tmp_path / "e.png")
    with pytest.raises(BadFileError, match="file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "g.jpg").write_bytes(np.random.default_rng(2).bytes(500))
    with pytest.raises(BadFileError, match="not a readable image"):
        read_image(tmp_path / "g.jpg")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadFileError, match=r"unsupported file type '\.txt'"):
        read_image(tmp_path / "notes.txt")


def test_bad_file_error_message_format(tmp_path):
    (tmp_path / "e.dcm").write_bytes(b"")
    with pytest.raises(BadFileError) as info:
        read_image(tmp_path / "e.dcm")
    from medxfer.privacy import sample_id

    msg = str(info.value)  # names the sample by a pseudonymous id: file names can hold patient names
    assert msg.startswith(f"cannot read sample {sample_id(str(tmp_path / 'e.dcm'))}: empty file.") and "e.dcm" not in msg
    assert info.value.reason == "empty file"


# ------------------------------------------------------------------------------------- NIfTI


def _canonical_volume(name):
    nibabel = pytest.importorskip("nibabel")
    img = nibabel.as_closest_canonical(nibabel.load(str(nib_file(name))))
    data = img.get_fdata()
    if data.ndim == 4:
        data = data[..., data.shape[3] // 2]
    return np.transpose(data, (2, 1, 0))[:, ::-1, :]  # (D=z, H=y flipped, W=x)


def _minmax(a):
    a = np.asarray(a, np.float64)
    return (a - a.min()) / (a.max() - a.min())


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_nifti_slices_match_numpy(name):
    vol = _canonical_volume(name)
    path = nib_file(name)
    mid = read_image(path, ReadOptions(slice="middle"))
    np.testing.assert_allclose(mid[0], _minmax(vol[vol.shape[0] // 2]), atol=1e-5)
    idx = read_image(path, ReadOptions(slice="index 1"))
    np.testing.assert_allclose(idx[0], _minmax(vol[1]), atol=1e-5)
    mip = read_image(path, ReadOptions(slice="mip"))
    np.testing.assert_allclose(mip[0], _minmax(vol.max(axis=0)), atol=1e-5)
    ortho = read_image(path, ReadOptions(slice="orthogonal"))
    d, h, w = vol.shape
    assert ortho.shape == (3, h, w)
    planes = np.stack([vol[d // 2], *[np.asarray(Image.fromarray(p.astype(np.float32)).resize(
        (w, h), Image.BILINEAR)) for p in (vol[::-1, h // 2, :], vol[::-1, :, w // 2])]])
    np.testing.assert_allclose(ortho, _minmax(planes), atol=1e-5)


def test_nifti_4d_frame_and_bad_index():
    path = nib_file("example4d.nii.gz")
    nibabel = pytest.importorskip("nibabel")
    img = nibabel.as_closest_canonical(nibabel.load(str(path)))
    vol = np.transpose(img.get_fdata()[..., 0], (2, 1, 0))[:, ::-1, :]
    out = read_image(path, ReadOptions(frame="0"))
    np.testing.assert_allclose(out[0], _minmax(vol[vol.shape[0] // 2]), atol=1e-5)
    with pytest.raises(BadFileError, match="slice index 99"):
        read_image(path, ReadOptions(slice="index 99"))


def test_truncated_nifti(tmp_path):
    data = nib_file("anatomical.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[:400])
    with pytest.raises(BadFileError, match="NIfTI"):
        read_image(tmp_path / "t.nii")


# ------------------------------------------------------------------------------------- NumPy


def test_npy_shapes(tmp_path):
    rng = np.random.default_rng(3)
    cases = {"hw": (rng.random((9, 7)), (1, 9, 7)), "hwc": (rng.random((9, 7, 3)), (3, 9, 7)),
             "chw": (rng.random((3, 9, 7)), (3, 9, 7)), "dhw": (rng.random((5, 9, 7)), (1, 9, 7))}
    for name, (arr, shape) in cases.items():
        np.save(tmp_path / f"{name}.npy", arr)
        assert read_image(tmp_path / f"{name}.npy").shape == shape, name
    u8 = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    np.testing.assert_allclose(read_image(tmp_path / "u8.npy")[0], u8 / 255.0, atol=1e-7)


def test_npy_pickle_and_truncated_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadFileError):
        read_image(tmp_path / "obj.npy")
    np.save(tmp_path / "t.npy", np.zeros((100, 100)))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:1000])
    with pytest.raises(BadFileError):
        read_image(tmp_path / "t.npy")


# ------------------------------------------------------------------ intensity and volume helpers


def test_to_unit_range_rules():
    opts = ReadOptions()
    np.testing.assert_array_equal(to_unit_range(np.full((4, 4), 7, np.uint16), opts), 0)
    const = to_unit_range(np.full((4, 4), 3.5), opts)
    assert not np.isnan(const).any() and const.max() == 0
    x = np.array([[0, 50, 100]], np.int16)
    np.testing.assert_allclose(to_unit_range(x, opts), [[0, 0.5, 1]])
    np.testing.assert_allclose(to_unit_range(x, ReadOptions(window="50,51")), [[0, 0.51, 1]], atol=1e-6)
    from medxfer.data.intensity import NonFinitePixels

    with pytest.raises(NonFinitePixels, match="1 of 3 pixels are non-finite"):  # refused, never blanked
        to_unit_range(np.array([np.nan, 1.0, 3.0]), opts)
    assert to_unit_range(np.array([True, False]), opts).tolist() == [1.0, 0.0]


def test_window_formula_and_presets():
    hu = np.linspace(-1200, 1200, 97)
    expected = np.clip((hu - (-600 - 0.5)) / (1500 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(to_unit_range(hu, ReadOptions(window="lung")), expected, atol=1e-6)
    np.testing.assert_allclose(to_unit_range(hu, ReadOptions(window="-600,1500")), expected, atol=1e-6)
    np.testing.assert_allclose(to_unit_range(hu, ReadOptions(), dicom_window=(-600, 1500)),
                               expected, atol=1e-6)
    none = to_unit_range(hu, ReadOptions(window="none"), dicom_window=(-600, 1500))
    np.testing.assert_allclose(none, (hu + 1200) / 2400, atol=1e-6)


def test_volume_to_2d_batch():
    rng = np.random.default_rng(4)
    batch = rng.random((2, 5, 6, 7))
    assert volume_to_2d(batch, ReadOptions(slice="orthogonal")).shape == (2, 3, 6, 7)
    np.testing.assert_array_equal(volume_to_2d(batch, ReadOptions())[:, 0], batch[:, 2])
    np.testing.assert_array_equal(volume_to_2d(batch, ReadOptions(slice="mip"))[:, 0], batch.max(1))
    np.testing.assert_array_equal(volume_to_2d(batch[0], ReadOptions(slice="index 4"))[0], batch[0, 4])
    with pytest.raises(MedxferError, match="below 5"):
        volume_to_2d(batch, ReadOptions(slice="index 5"))


@pytest.mark.parametrize(("field", "value", "hint"), [
    ("window", "lungs", "Did you mean 'lung'"), ("window", "40,0", "above 0"),
    ("slice", "midle", "Did you mean 'middle'"), ("frame", "-1", "'middle'"),
    ("intensity", "p99-p1", "0 <= A < B"), ("intensity", "min-max", "minmax"),
])
def test_read_options_validation(field, value, hint):
    with pytest.raises(MedxferError) as info:
        ReadOptions(**{field: value})
    assert f"The '{field}' option must be" in str(info.value)
    assert hint in str(info.value) and repr(value) in str(info.value)


def test_options_key_and_reader_choice(tmp_path):
    assert ReadOptions(window="lung").key() == {
        "window": "lung", "frame": "middle", "slice": "middle", "intensity": "auto"}
    assert type(reader_for("a/b.NII.GZ")).__name__ == "NiftiReader"
    assert type(reader_for("x.JPEG")).__name__ == "PILReader"


# ------------------------------------------------------------------ empty arrays and the run's input type


def test_an_empty_npy_is_refused_by_name(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 5)))
    with pytest.raises(BadFileError, match="0x5 pixels.*empty"):
        read_image(tmp_path / "e.npy")


def test_the_runs_input_type_decides_the_scaling():
    from medxfer.data.intensity import OffContract

    u8 = np.array([[0, 51, 102, 255]], np.uint8)
    eight = ReadOptions(input_dtype="uint8")                      # a run trained on 8-bit images
    np.testing.assert_allclose(to_unit_range(u8 / 255, eight), to_unit_range(u8, eight), atol=1e-7)
    dim = np.array([[0.2, 0.4]], np.float32)
    np.testing.assert_array_equal(to_unit_range(dim, eight), dim)   # never stretched to [0, 1]
    with pytest.raises(OffContract, match=r"floats from 0 to 255.*8-bit.*\[0, 1\] \(x / 255\)"):
        to_unit_range(u8.astype(np.float32), eight)
    with pytest.raises(OffContract, match="type uint16.*8-bit"):
        to_unit_range(u8.astype(np.uint16), eight)
    wide = ReadOptions(input_dtype="uint16")                      # trained on 16-bit: per image, uint8 too
    np.testing.assert_allclose(to_unit_range(np.array([[10, 20, 30]], np.uint8), wide), [[0, 0.5, 1]])
    own = ReadOptions()                                           # training, earlier runs: each by its own type
    np.testing.assert_allclose(to_unit_range(np.array([[0, 51]], np.uint8), own), [[0, 0.2]])
    np.testing.assert_allclose(to_unit_range(np.array([[10, 30]], np.float32), own), [[0, 1]])
    assert eight.key()["input_dtype"] == "uint8" and "input_dtype" not in ReadOptions().key()
    with pytest.raises(MedxferError, match="input_dtype"):
        ReadOptions(input_dtype="pixels")


def test_a_16bit_png_is_refused_where_the_run_takes_8bit(tmp_path):
    Image.fromarray(np.arange(0, 60000, 1000, dtype=np.uint16).reshape(6, 10)).save(tmp_path / "a.png")
    with pytest.raises(BadFileError, match="uint16.*trained on 8-bit images"):
        read_image(tmp_path / "a.png", ReadOptions(input_dtype="uint8"))
    assert read_image(tmp_path / "a.png", ReadOptions(input_dtype="uint16")).max() == 1.0


def test_an_8bit_nifti_keeps_its_type(tmp_path):
    """uint8 is divided by 255 in every format: a NIfTI of stored uint8 is not min-max stretched."""
    nib = pytest.importorskip("nibabel")
    vol = np.full((4, 5, 6), 10, np.uint8)
    vol[1, 2, 3] = 200
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    x = read_image(tmp_path / "v.nii.gz", ReadOptions(slice="volume"))
    assert x.max() == pytest.approx(200 / 255) and x.min() == pytest.approx(10 / 255)
