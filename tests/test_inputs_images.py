"""Every image kind read as the user sees it: one table, expected pixels computed with numpy/PIL directly.

Covers EXIF orientations 1..8 (PNG, JPEG and a WebDataset member), 16-bit kinds scaled by mode
(round(v / 257)), 32-bit I/F refused by name, thin strips (aspect limit; crop before resize with bounded
memory), symlink loops / duplicate real paths / unreadable folders, and what already worked (gray, palette,
RGBA on white, CMYK, tiny, truncated, bombs, empty).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pytest
import tifffile
from PIL import Image

from xqtool.data.images import open_image_source
from xqtool.data.reading import BadInput, ReadOptions, decode_image
from xqtool.data.sources import resolve_source
from xqtool.data.transforms import center_crop_arr, to_rgb
from xqtool.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------ independent encoders / references
def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 48/64-bit PNG). Rows cycle through the
    None, Sub and Up filters so the reader's unfiltering is exercised."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = arr.reshape(h, w * channels).astype(">u2").view(np.uint8).reshape(h, -1).astype(np.int32)
    bpp = 2 * channels
    raw = bytearray()
    for r in range(h):
        ft = r % 3
        line = rows[r]
        if ft == 1:
            left = np.concatenate([np.zeros(bpp, np.int32), line[:-bpp]])
            line = (line - left) % 256
        elif ft == 2:
            up = rows[r - 1] if r else np.zeros_like(line)
            line = (line - up) % 256
        raw += bytes([ft]) + line.astype(np.uint8).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


def _r257(v: np.ndarray) -> np.ndarray:
    """Reference 16 -> 8 bit: round(v / 257) in float64."""
    return np.rint(v.astype(np.float64) / 257.0).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 composited over white (PIL's alpha_composite, the documented rule)."""
    white = Image.new("RGBA", rgba.shape[1::-1], (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))


def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[:, :, None], 3, axis=2)


# Display = f(stored) for each EXIF orientation value (EXIF 2.3 spec, written with numpy only).
ORIENT: Dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                       # mirror horizontal
    3: lambda a: a[::-1, ::-1],                    # rotate 180
    4: lambda a: a[::-1],                          # mirror vertical
    5: lambda a: np.swapaxes(a, 0, 1),             # mirror horizontal + rotate 270 CW (transpose)
    6: lambda a: np.rot90(a, k=-1),                # rotate 90 CW
    7: lambda a: np.rot90(a, k=2).swapaxes(0, 1),  # mirror horizontal + rotate 90 CW (transverse)
    8: lambda a: np.rot90(a, k=1),                 # rotate 270 CW
}


def _exif(value: int) -> Image.Exif:
    ex = Image.Exif()
    ex[0x0112] = value
    return ex


STORED = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # non-square, no symmetry
G16 = np.array([[200, 200, 256, 386], [385, 128, 51400, 65535], [0, 1, 257, 32896]], dtype=np.uint16)
RGB16 = RNG.integers(0, 65536, (6, 5, 3)).astype(np.uint16)
RGB16[0, 0] = (386, 385, 128)  # round(v/257) != v >> 8 here
RGBA16 = np.concatenate([RNG.integers(0, 65536, (4, 6, 3)), RNG.integers(0, 65536, (4, 6, 1))], 2).astype(np.uint16)
GRAY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
PAL = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
RGBA = np.concatenate([RNG.integers(0, 256, (4, 4, 3)), np.array([0, 64, 200, 255] * 4).reshape(4, 4, 1)], 2).astype(np.uint8)
LA = np.stack([GRAY[:4, :4], RGBA[..., 3]], 2)
CMYK = RNG.integers(0, 256, (4, 3, 4), dtype=np.uint8)


def _palette_img(transparent: bool) -> Image.Image:
    im = Image.fromarray(PAL, "P")
    im.putpalette(PALETTE)
    if transparent:
        im.info["transparency"] = 1
    return im


def _expected_palette(transparent: bool) -> np.ndarray:
    pal = np.array(PALETTE[:9], np.uint8).reshape(3, 3)
    rgb = pal[PAL]
    if transparent:
        alpha = np.where(PAL == 1, 0, 255).astype(np.uint8)
        return _on_white(np.concatenate([rgb, alpha[..., None]], 2))
    return rgb


def _truncated_png() -> bytes:
    data = _save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2]


# name -> (bytes, expected uint8 RGB array, or an error-message fragment)
CASES: Dict[str, tuple] = {}
for o in range(1, 9):
    CASES[f"exif{o}-png"] = (_save(Image.fromarray(STORED), "PNG", exif=_exif(o)), ORIENT[o](STORED))
_JPEG_STORED = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
for o in (3, 6, 8):
    data = _save(Image.fromarray(_JPEG_STORED), "JPEG", quality=95, exif=_exif(o))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # stored pixels as the codec gives them
    CASES[f"exif{o}-jpeg"] = (data, ORIENT[o](decoded))
CASES.update({
    "I;16 png uniform 200": (_png16(np.full((4, 4), 200, np.uint16)), _gray3(np.full((4, 4), 1, np.uint8))),
    "I;16 png mixed": (_png16(G16), _gray3(_r257(G16))),
    "I;16B tiff": (_tiff(G16, byteorder=">"), _gray3(_r257(G16))),
    "I;16 tiff": (_tiff(G16), _gray3(_r257(G16))),
    "48-bit rgb png": (_png16(RGB16), _r257(RGB16)),
    "64-bit rgba png": (_png16(RGBA16), _on_white(_r257(RGBA16))),
    "16-bit gray+alpha png": (_png16(RGBA16[..., [0, 3]]), _on_white(np.concatenate(
        [np.repeat(_r257(RGBA16[..., :1]), 3, 2), _r257(RGBA16[..., 3:])], 2))),
    "48-bit rgb tiff": (_tiff(RGB16), _r257(RGB16)),
    "48-bit rgb tiff big-endian zlib": (_tiff(RGB16, byteorder=">", compression="zlib"), _r257(RGB16)),
    "32-bit int tiff (mode I)": (_tiff(G16.astype(np.int32) * 3), "mode I"),
    "float tiff (mode F)": (_tiff(G16.astype(np.float32) / 65535), "mode F"),
    "gray": (_save(Image.fromarray(GRAY, "L"), "PNG"), _gray3(GRAY)),
    "1-bit": (_save(Image.fromarray(GRAY > 127).convert("1"), "PNG"), _gray3(np.where(GRAY > 127, 255, 0).astype(np.uint8))),
    "palette": (_save(_palette_img(False), "PNG"), _expected_palette(False)),
    "palette transparent": (_save(_palette_img(True), "PNG"), _expected_palette(True)),
    "rgba on white": (_save(Image.fromarray(RGBA, "RGBA"), "PNG"), _on_white(RGBA)),
    "gray+alpha on white": (_save(Image.fromarray(LA, "LA"), "PNG"), _on_white(np.concatenate(
        [_gray3(LA[..., 0]), LA[..., 1:]], 2))),
    "cmyk tiff": (_save(Image.frombytes("CMYK", (4, 3), np.moveaxis(CMYK, 0, -1).tobytes()), "TIFF"),
                  np.asarray(Image.frombytes("CMYK", (4, 3), np.moveaxis(CMYK, 0, -1).tobytes()).convert("RGB"))),
    "tiny 1x1": (_save(Image.fromarray(np.array([[[9, 8, 7]]], np.uint8)), "PNG"), np.array([[[9, 8, 7]]], np.uint8)),
    "truncated": (_truncated_png(), "truncated"),
    "empty": (b"", "empty file"),
    "not an image": (b"hello world, not pixels", "not a readable image"),
    "thin 1x4000 (default limit)": (_save(Image.new("RGB", (1, 4000), (10, 20, 30)), "PNG"), "aspect ratio 4000:1"),
})


@pytest.mark.parametrize("name", list(CASES))
def test_image_kind_table(name):
    data, want = CASES[name]
    if isinstance(want, str):
        with pytest.raises(BadInput, match=want.replace("(", r"\(").replace(")", r"\)")):
            to_rgb(decode_image(data, ReadOptions()))
        return
    got = np.asarray(to_rgb(decode_image(data, ReadOptions())))
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)


def test_bomb_is_refused_by_name(monkeypatch):
    data = _save(Image.new("RGB", (300, 300)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadInput, match="decompression bomb"):
        decode_image(data, ReadOptions())


@pytest.mark.parametrize("o", range(1, 9))
def test_exif_switch_off_keeps_stored_pixels(o, monkeypatch):
    data = CASES[f"exif{o}-png"][0]
    np.testing.assert_array_equal(np.asarray(decode_image(data, ReadOptions(exif_transpose=False))), STORED)
    monkeypatch.setenv("XQTOOL_EXIF_TRANSPOSE", "0")
    np.testing.assert_array_equal(np.asarray(decode_image(data)), STORED)
    assert "EXIF orientation ignored" in ReadOptions.from_env().describe()


def _adm_reference(arr: np.ndarray, size: int) -> np.ndarray:
    """ADM center crop written with plain PIL calls (BOX halving, bicubic resize of the whole image, crop)."""
    img = Image.fromarray(arr)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    t, l = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[t : t + size, l : l + size]


def test_folder_and_webdataset_streams_apply_exif(tmp_path):
    """Through the data layer (folder and a WebDataset shard): all 8 orientations are upright."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    members = {}
    for o in range(1, 9):
        data = CASES[f"exif{o}-png"][0]
        (folder / f"o{o}.png").write_bytes(data)
        members[f"o{o}"] = data
    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, data in members.items():
            for ext, payload in (("png", data), ("cls", b"0")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    want = {k: _adm_reference(ORIENT[int(k[1:])](STORED), 8) for k in members}
    for source in (folder, shard):
        got = {s["key"]: s["image"] for s in open_image_source(str(source), image_size=8, read_options=ReadOptions())}
        assert sorted(got) == sorted(want)
        for k, t in got.items():
            ref = torch_from_uint8(want[k])
            assert (t - ref).abs().max().item() < 1e-6, (source, k)


def torch_from_uint8(a: np.ndarray):
    import torch

    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def test_manifest_records_exif(tmp_path, monkeypatch):
    from xqtool.data.transforms import eval_preprocessing

    assert eval_preprocessing(ReadOptions()).startswith("EXIF orientation applied")
    assert eval_preprocessing(ReadOptions(exif_transpose=False)).startswith("EXIF orientation ignored")
    monkeypatch.setenv("XQTOOL_EXIF_TRANSPOSE", "off")
    assert eval_preprocessing().startswith("EXIF orientation ignored")


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (2, 900), (37, 1500)])
def test_thin_images_crop_before_resize_equal_up_to_rounding(shape):
    h, w = shape
    arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    data = _save(Image.fromarray(arr), "PNG")
    with pytest.raises(BadInput, match=r"aspect ratio .* exceeds the limit 20:1"):
        decode_image(data, ReadOptions())
    img = to_rgb(decode_image(data, ReadOptions(max_aspect_ratio=0)))
    got = center_crop_arr(img, 16).astype(int)
    ref = _adm_reference(arr, 16).astype(int)
    assert got.shape == ref.shape == (16, 16, 3)
    assert np.abs(got - ref).max() <= 2


def test_thin_strip_is_named_under_the_bad_file_policy(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(STORED).save(folder / "ok.png")
    Image.new("RGB", (32000, 1), (1, 2, 3)).save(folder / "banner.png")
    ds = open_image_source(str(folder), image_size=8, read_options=ReadOptions())
    keys = [s["key"] for s in ds]
    assert keys == ["ok"]
    assert "banner.png" in next(iter(ds.bad_files)) and "aspect ratio 3.2e+04:1" in next(iter(ds.bad_files.values()))
    with pytest.raises(DataError, match=r"banner.png: aspect ratio"):
        list(open_image_source(str(folder), image_size=8, bad_files="fail", read_options=ReadOptions()))


_RSS_SCRIPT = r"""
import io, resource, sys
import numpy as np
from PIL import Image
from xqtool.data.reading import ReadOptions, decode_image
from xqtool.data.transforms import center_crop_arr, random_crop_arr, to_rgb
import random
buf = io.BytesIO(); Image.fromarray(np.arange(32000 * 3, dtype=np.uint8).reshape(SHAPE + (3,))).save(buf, "PNG")
data = buf.getvalue()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
img = to_rgb(decode_image(data, ReadOptions(max_aspect_ratio=0)))
a = center_crop_arr(img, 256)
b = random_crop_arr(img, 256, random.Random(0))
assert a.shape == b.shape == (256, 256, 3)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


@pytest.mark.parametrize("shape", [(1, 32000), (32000, 1)])
def test_thin_strip_peak_memory_bounded(shape):
    """A 1x32000 strip at S=256 (limit off) adds < 100 MB of peak RSS (it used to need ~20 GB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT.replace("SHAPE", repr(shape))], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 100.0


# ------------------------------------------------------------------ image trees
def test_symlink_loop_and_duplicate_real_paths_read_once(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(STORED).save(root / "sub" / "a.png")
    Image.fromarray(GRAY).save(root / "b.png")
    os.symlink(root, root / "sub" / "loop")           # directory loop
    os.symlink(root / "sub", root / "again")          # a second link to the same folder
    os.symlink(root / "b.png", root / "sub" / "b_link.png")  # a file link to a listed file
    spec = resolve_source(str(root))
    paths = sorted(os.path.realpath(it.path) for it in spec.items)
    assert paths == sorted({os.path.realpath(root / "sub" / "a.png"), os.path.realpath(root / "b.png")})
    assert len(spec.items) == 2
    assert len(list(open_image_source(str(root), image_size=4, read_options=ReadOptions()))) == 2


def test_unreadable_subfolder_is_named(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    (root / "locked").mkdir(parents=True)
    Image.fromarray(STORED).save(root / "ok.png")
    Image.fromarray(STORED).save(root / "locked" / "hidden.png")
    locked = str(root / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    os.chmod(locked, 0)
    try:
        if os.geteuid() == 0:  # root reads anything: make the folder unreadable the way os.walk sees it
            monkeypatch.setattr(os, "scandir", scandir)
        ds = open_image_source(str(root), image_size=4, read_options=ReadOptions())
        assert [s["key"] for s in ds] == ["ok"]
        assert ds.bad_files == {locked: "cannot read folder: Permission denied"}
        with pytest.raises(DataError, match=r"locked: cannot read folder"):
            list(open_image_source(str(root), image_size=4, bad_files="fail", read_options=ReadOptions()))
    finally:
        os.chmod(locked, 0o755)


def test_eval_fid_folder_reader_applies_exif_and_16bit(tmp_path):
    from xqtool.tasks.eval_fid import _ImageFiles

    (tmp_path / "o6.png").write_bytes(CASES["exif6-png"][0])
    (tmp_path / "g.png").write_bytes(CASES["I;16 png mixed"][0])
    ds = _ImageFiles([tmp_path / "o6.png", tmp_path / "g.png"], None, None)
    t, _ = ds[0]
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy().astype(np.uint8), ORIENT[6](STORED))
    t, _ = ds[1]
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy().astype(np.uint8), _gray3(_r257(G16)))
