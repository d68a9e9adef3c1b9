"""Data layer: sources, preprocessing, bad-file policy, node/worker splitting, shards, token files."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _data_fixtures import photo_crops, png_bytes, shard_sample, write_class_tree, write_file_list, write_shard
from xqtool.data import (TokenManifest, check_manifest, check_token_rows, load_tokens, make_loader, open_image_source,
                         token_dataset, token_dtype, write_tokens)
from xqtool.data.transforms import center_crop_arr, random_crop_arr, to_rgb
from xqtool.errors import DataError, TokenError
from xqtool.tasks.make_shards import make_shards

S = 32


def _by_key(ds):
    return {s["key"]: s for s in ds}


@pytest.fixture()
def tree(tmp_path):
    keys = write_class_tree(tmp_path / "train")
    return tmp_path / "train", keys


# ------------------------------------------------------------------------------------ sources


def test_class_tree_labels_keys_and_range(tree):
    root, keys = tree
    ds = open_image_source(root, image_size=S)
    got = _by_key(ds)
    assert set(got) == set(keys)
    assert ds.classes == ["cat", "dog"]
    for k, s in got.items():
        assert s["label"] == keys[k]
        assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
        assert -1.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
    # eval order is the sorted source order
    assert [s["key"] for s in open_image_source(root, image_size=S)] == sorted(keys)


def test_folder_list_shards_and_single_image_give_identical_images(tree, tmp_path):
    root, keys = tree
    lst = tmp_path / "list.txt"
    write_file_list(lst, root, keys)
    shards = make_shards(root, tmp_path / "shards", maxcount=4, image_format="png")
    assert [c for _, c in shards.shards] == [4, 2]
    a = _by_key(open_image_source(root, image_size=S))
    b = _by_key(open_image_source(lst, image_size=S))
    c = _by_key(open_image_source(str(tmp_path / "shards" / "shard-{000000..000001}.tar"), image_size=S))
    d = _by_key(open_image_source(tmp_path / "shards", image_size=S))  # a folder of shards
    assert set(a) == set(b) == set(c) == set(d) == set(keys)
    for k in keys:
        assert torch.equal(a[k]["image"], b[k]["image"])
        assert torch.equal(a[k]["image"], c[k]["image"])
        assert a[k]["label"] == b[k]["label"] == c[k]["label"] == d[k]["label"] == keys[k]
    single = list(open_image_source(root / "dog" / "img1.png", image_size=S))
    assert len(single) == 1 and torch.equal(single[0]["image"], a["dog/img1"]["image"])
    flat = _by_key(open_image_source([root / "cat" / "img0.png", root / "dog" / "img0.png"], image_size=S))
    assert set(flat) == {"cat/img0", "dog/img0"} and all(s["label"] == -1 for s in flat.values())


def test_make_shards_json_and_jpg(tree, tmp_path):
    root, keys = tree
    res = make_shards(root, tmp_path / "sh", maxcount=10, image_format="jpg", nodes=2, workers=2)
    assert res.count == len(keys) and len(res.shards) == 1
    assert res.warning is not None and "only 1 shards" in res.warning
    index = json.loads((tmp_path / "sh" / "shards.json").read_text())
    assert index["count"] == len(keys) and index["classes"] == ["cat", "dog"]
    import webdataset as wds

    samples = list(wds.WebDataset(str(tmp_path / "sh" / "shard-000000.tar"), shardshuffle=False))
    meta = json.loads(samples[0]["json"])
    assert {"original_width", "original_height", "path", "key", "label"} <= set(meta)
    assert (meta["original_width"], meta["original_height"]) == (64, 48)
    assert Image.open(io.BytesIO(samples[0]["jpg"])).format == "JPEG"


def test_empty_and_missing_sources_are_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_image_source(tmp_path / "empty", image_size=S)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="no images"):
        open_image_source(tmp_path / "junk", image_size=S)
    with pytest.raises(DataError, match="not found"):
        open_image_source(tmp_path / "nope", image_size=S)
    with pytest.raises(DataError, match="shards do not exist"):
        open_image_source(str(tmp_path / "s-{000..003}.tar"), image_size=S)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no images"):
        open_image_source(tmp_path / "empty.txt", image_size=S)


# ------------------------------------------------------------------------------------ preprocessing


def test_rgb_conversion_of_gray_palette_rgba_cmyk_16bit():
    rgb = photo_crops(1)[0]
    gray = Image.fromarray(rgb).convert("L")
    assert np.array_equal(np.asarray(to_rgb(gray))[..., 0], np.asarray(gray))
    pal = Image.fromarray(rgb).convert("P")
    assert to_rgb(pal).mode == "RGB"
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])  # fully transparent -> white
    assert (np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))) == 255).all()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert np.abs(np.asarray(to_rgb(cmyk)).astype(int) - rgb).max() <= 2
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I")
    assert np.abs(np.asarray(to_rgb(sixteen))[..., 0].astype(int) - np.asarray(gray)).max() <= 1
    for im in (gray, pal, cmyk, sixteen, Image.fromarray(rgba, "RGBA")):
        assert to_rgb(im).mode == "RGB"


def test_all_modes_load_through_a_folder(tmp_path):
    rgb = photo_crops(1)[0]
    Image.fromarray(rgb).convert("L").save(tmp_path / "g.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257).save(tmp_path / "s.png")
    ds = open_image_source(tmp_path, image_size=S)
    got = _by_key(ds)
    assert set(got) == {"g", "p", "a", "c", "s"} and not ds.bad_files
    assert all(s["image"].shape == (3, S, S) for s in got.values())


def test_adm_center_crop_matches_definition():
    arr = photo_crops(1, size=(70, 100))[0]
    img = Image.fromarray(arr)
    out = center_crop_arr(img, 32)
    # 70x100 -> BOX halving once (70 >= 64) -> 35x50 -> bicubic shorter side 32 -> 32x46 -> center crop
    half = img.resize((50, 35), resample=Image.BOX)
    big = np.asarray(half.resize((round(50 * 32 / 35), 32), resample=Image.BICUBIC))
    left = (big.shape[1] - 32) // 2
    assert np.array_equal(out, big[:, left : left + 32])


def test_train_transform_random_crop_flip_and_epochs(tree):
    root, keys = tree
    arr = random_crop_arr(Image.fromarray(photo_crops(1)[0]), 32, random.Random(0))
    assert arr.shape == (32, 32, 3)
    ds = open_image_source(root, image_size=S, train=True, seed=3)
    e0 = [s["key"] for s in ds]
    e1 = [s["key"] for s in ds]
    assert sorted(e0) == sorted(e1) == sorted(keys)
    again = open_image_source(root, image_size=S, train=True, seed=3)
    same = _by_key(again)
    first = _by_key(open_image_source(root, image_size=S, train=True, seed=3))
    assert all(torch.equal(same[k]["image"], first[k]["image"]) for k in keys)  # deterministic per seed
    eval_imgs = _by_key(open_image_source(root, image_size=S))
    assert any(not torch.equal(first[k]["image"], eval_imgs[k]["image"]) for k in keys)  # augmented


def test_resampled_training_stream_is_endless(tree):
    root, keys = tree
    ds = open_image_source(root, image_size=S, train=True, resample=True)
    it = iter(ds)
    got = [next(it)["key"] for _ in range(3 * len(keys))]
    assert len(got) == 3 * len(keys) and set(got) == set(keys)


# ------------------------------------------------------------------------------------ splitting


def test_loader_workers_see_each_image_once(tree):
    root, keys = tree
    loader = make_loader(root, image_size=S, batch_size=2, num_workers=2)
    seen = [k for b in loader for k in b["key"]]
    assert sorted(seen) == sorted(keys)
    batch = next(iter(loader))
    assert batch["image"].shape[1:] == (3, S, S) and batch["label"].dtype == torch.long


@pytest.mark.parametrize("kind", ["files", "shards"])
def test_split_by_node(tree, tmp_path, monkeypatch, kind):
    root, keys = tree
    source = root
    if kind == "shards":
        make_shards(root, tmp_path / "sh", maxcount=1, image_format="png")
        source = tmp_path / "sh"
    parts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts.append([s["key"] for s in open_image_source(source, image_size=S)])
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(keys)


# ------------------------------------------------------------------------------------ bad inputs


def _bad_tree(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    write_class_tree(root, per_class=2)
    good = (root / "cat" / "img0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(root / "dog" / "bomb.png")
    return root


BAD_NAMES = {"truncated.png", "corrupt.jpg", "zero.png", "notes.txt", "bomb.png"}


def test_bad_files_skipped_and_reported(tmp_path, monkeypatch):
    root = _bad_tree(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30000)  # 200x200 = 40000 px is a "bomb"
    ds = open_image_source(root, image_size=S)
    keys = [s["key"] for s in ds]
    assert sorted(keys) == ["cat/img0", "cat/img1", "dog/img0", "dog/img1"]
    assert {Path(n).name for n in ds.bad_files} == BAD_NAMES
    reasons = {Path(n).name: r for n, r in ds.bad_files.items()}
    assert "0 bytes" in reasons["zero.png"] and "decompression bomb" in reasons["bomb.png"]
    assert "not an image" in reasons["notes.txt"] and "truncated" in reasons["truncated.png"]


def test_bad_files_reach_the_loader_from_workers(tmp_path):
    root = _bad_tree(tmp_path)
    (root / "dog" / "bomb.png").unlink()
    loader = make_loader(root, image_size=S, batch_size=3, num_workers=2)
    n = sum(len(b["key"]) for b in loader)
    assert n == 4
    assert {Path(k).name for k in loader.bad_files} == BAD_NAMES - {"bomb.png"}


def test_fail_policy_stops_with_the_file_name(tmp_path):
    root = _bad_tree(tmp_path)
    with pytest.raises(DataError, match=r"corrupt\.jpg"):
        list(open_image_source(root, image_size=S, bad_files="fail"))
    loader = make_loader(root, image_size=S, batch_size=2, num_workers=1, bad_files="fail")
    with pytest.raises(DataError) as err:
        list(loader)
    assert "\n" not in str(err.value) and "bad input" in str(err.value)
    with pytest.raises(DataError, match="skip"):
        open_image_source(root, image_size=S, bad_files="ignore")


def test_bad_shard_members_and_truncated_shard(tmp_path):
    crops = photo_crops(4)
    good = [shard_sample(f"s{i}", crops[i], i) for i in range(3)]
    noimg = {"__key__": "noimg", "cls": b"1", "json": b"{}"}
    corrupt = {"__key__": "corrupt", "jpg": b"garbage", "cls": b"2"}
    badcls = {"__key__": "badcls", "png": png_bytes(crops[3]), "cls": b"one"}
    write_shard(tmp_path / "a.tar", [good[0], noimg, corrupt, badcls, good[1]])
    write_shard(tmp_path / "b.tar", [good[2]])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:700])  # truncated mid-member
    write_shard(tmp_path / "c.tar", [shard_sample("s9", crops[0], 9)])
    ds = open_image_source(f"{tmp_path}/{{a,b,c}}.tar", image_size=S)
    keys = [s["key"] for s in ds]
    assert keys == ["s0", "s1", "s9"]
    names = set(ds.bad_files)
    assert any(n.endswith("a.tar#noimg") for n in names)
    assert any(n.endswith("a.tar#corrupt") for n in names)
    assert any(n.endswith("a.tar#badcls") for n in names)
    assert any(n.endswith("b.tar") for n in names)
    with pytest.raises(DataError, match="noimg"):
        list(open_image_source(str(tmp_path / "a.tar"), image_size=S, bad_files="fail"))


# ------------------------------------------------------------------------------------ token files


def _manifest(K=64, keys=("a", "b", "c")):
    return TokenManifest(config_hash="abc123", scales=[1, 2], num_branches=2, codebook_size=K, tokens_per_branch=5,
                         image_size=32, keys=list(keys), labels=[0, 1, 2], paths=list(keys))


def test_token_file_roundtrip_dtype_and_dataset(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 64, (3, 2, 5))
    write_tokens(tmp_path / "t.npy", tokens, _manifest())
    arr, m = load_tokens(tmp_path / "t.npy")
    assert arr.dtype == np.int16 and np.array_equal(arr, tokens) and m.count == 3
    raw = json.loads((tmp_path / "t.npy.json").read_text())
    assert raw["format_version"] == 1 and raw["xqtool_version"]
    ds = token_dataset(tmp_path / "t.npy")
    assert len(ds) == 3 and ds[2]["label"] == 2 and ds[2]["tokens"].dtype == torch.long
    assert torch.equal(ds[1]["tokens"], torch.from_numpy(tokens[1]))
    assert token_dtype(32768) == np.int16 and token_dtype(32769) == np.int32
    with pytest.raises(TokenError, match="manifest"):
        (tmp_path / "t.npy.json").unlink()
        load_tokens(tmp_path / "t.npy")


def test_token_row_checks_name_the_row():
    good = np.zeros((4, 2, 5), np.int64)
    check_token_rows(good, 2, 5, 64)
    bad = good.copy()
    bad[2, 1, 3] = 64
    with pytest.raises(TokenError, match=r"row 12 \(key 'k2'\).*64.*out of range \[0, 64\)"):
        check_token_rows(bad, 2, 5, 64, keys=["k0", "k1", "k2", "k3"], first_row=10)
    with pytest.raises(TokenError, match=r"\[N, 2, 5\]"):
        check_token_rows(np.zeros((4, 2, 6), np.int64), 2, 5, 64)


def test_check_manifest_names_the_field():
    class FakeTok:
        codebook_size, num_branches, scales, tokens_per_branch, image_size = 128, 2, (1, 2), 5, 32
        config = None

    with pytest.raises(TokenError, match="codebook_size is 64 .* but 128"):
        check_manifest(_manifest(), FakeTok())
