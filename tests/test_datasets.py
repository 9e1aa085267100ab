"""Tests for occreid.data dataset loaders, records, statistics, errors and ImageDataset."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from occreid.data import (
    DATASETS,
    ImageDataset,
    ImageRecord,
    ReIDDataset,
    build_dataset,
    build_test_transform,
    list_datasets,
    register_dataset,
)
from occreid.utils import OccReIDError


def write_img(path: Path, value: int = 0) -> Path:
    """A real 8x4 image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((8, 4, 3), value % 256, dtype=np.uint8)
    arr[0, 0] = (value * 7 % 256, 3, 5)
    Image.fromarray(arr).save(path)
    return path


def make_split(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        write_img(folder / n, i)


MARKET = {
    "bounding_box_train": ["0007_c3s1_000101_01.jpg", "0002_c1s1_000451_03.jpg",
                           "0002_c2s1_000551_01.jpg", "0010_c6s2_000101_02.jpg",
                           "-1_c1s1_000001_00.jpg"],
    "query": ["0002_c1s1_001051_00.jpg", "0007_c2s1_000101_00.jpg", "-1_c3s1_000001_00.jpg"],
    "bounding_box_test": ["0000_c1s1_000151_01.jpg", "-1_c1s1_000401_03.jpg",
                          "0002_c3s1_000201_01.jpg", "0007_c4s1_000301_02.png",
                          "0002_c5s1_000301_02.jpeg"],
}


def make_market(dataset_dir: Path, layout=MARKET) -> Path:
    for sub, names in layout.items():
        make_split(dataset_dir / sub, names)
    (dataset_dir / "bounding_box_train" / "Thumbs.db").write_bytes(b"junk")
    (dataset_dir / "query" / "readme.txt").write_text("not an image")
    return dataset_dir


def parse_names(folder: Path):
    """(name, pid, cam0) parsed in the test itself: '<pid>_c<cam>' prefix, junk dropped."""
    out = []
    for n in sorted(os.listdir(folder)):
        if n.endswith((".db", ".txt")):
            continue
        pid, cam = n.split("_")[0], n.split("_")[1][1]
        if pid != "-1":
            out.append((n, int(pid), int(cam) - 1))
    return out


# --------------------------------------------------------------------------------------------
# Market-style datasets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sub", ["market1501", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "."]
)
def test_market_layouts_and_parsing(tmp_path, sub):
    ds_dir = make_market(tmp_path / sub)
    ds = build_dataset("market1501", tmp_path)
    assert ds.root == ds_dir.resolve()
    assert ds.name == "market1501"

    train_ref = parse_names(ds_dir / "bounding_box_train")
    labels = {p: i for i, p in enumerate(sorted({p for _, p, _ in train_ref}))}
    assert labels == {2: 0, 7: 1, 10: 2}
    assert ds.train == [
        ImageRecord(str(ds_dir.resolve() / "bounding_box_train" / n), labels[p], c)
        for n, p, c in train_ref
    ]
    for split, sub_dir in (("query", "query"), ("gallery", "bounding_box_test")):
        ref = parse_names(ds_dir / sub_dir)
        assert getattr(ds, split) == [
            ImageRecord(str(ds_dir.resolve() / sub_dir / n), p, c) for n, p, c in ref
        ]
    # junk dropped everywhere, distractor pid 0 kept in the gallery
    assert all(r.pid != -1 for r in ds.train + ds.query + ds.gallery)
    assert 0 in {r.pid for r in ds.gallery}
    assert all(os.path.isabs(r.path) and r.occlusion is None for r in ds.gallery)
    assert ds.pid_map == {2: 0, 7: 1, 10: 2}
    assert ds.has_occlusion_meta is False


def test_market_statistics_summary_describe(tmp_path):
    ds = build_dataset("market", make_market(tmp_path / "market1501"))
    stats = (ds.num_train_pids, ds.num_train_imgs, ds.num_train_cams,
             ds.num_query_pids, ds.num_query_imgs, ds.num_query_cams,
             ds.num_gallery_pids, ds.num_gallery_imgs, ds.num_gallery_cams)
    assert stats == (3, 4, 4, 2, 2, 2, 3, 4, 4)
    assert ds.num_classes == 3 and ds.num_cams == 6
    d = ds.describe()
    assert d["name"] == "market1501" and d["root"] == str(ds.root)
    assert (d["num_train_pids"], d["num_query_imgs"], d["num_gallery_cams"]) == (3, 2, 4)
    assert d["has_occlusion_meta"] is False
    lines = ds.summary().splitlines()
    assert lines[0].startswith("market1501")
    table = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in lines[1:]}
    assert table["train"] == ["3", "4", "4"]
    assert table["query"] == ["2", "2", "2"]
    assert table["gallery"] == ["3", "4", "4"]
    assert len({len(ln) for ln in lines[1:]}) == 1  # aligned
    assert "train=4" in repr(ds)


def test_duke_and_occluded_duke(tmp_path):
    layout = {
        "bounding_box_train": ["0005_c2_f0046182.jpg", "0001_c8_f0000001.jpg",
                               "0001_c7_f0000002.jpg"],
        "query": ["0003_c1_f0000010.jpg"],
        "bounding_box_test": ["0003_c5_f0000011.jpg", "0009_c2_f0000012.jpg"],
    }
    make_market(tmp_path / "dukemtmcreid", layout)
    make_market(tmp_path / "Occluded_Duke", layout)
    make_market(tmp_path / "other" / "dukemtmc-reid" / "DukeMTMC-reID", layout)
    for name, root in (("dukemtmc", tmp_path), ("duke", tmp_path), ("dukemtmcreid", tmp_path),
                       ("occluded_duke", tmp_path), ("occ_duke", tmp_path),
                       ("duke", tmp_path / "other")):
        ds = build_dataset(name, root)
        assert [(r.pid, r.camid) for r in ds.train] == [(0, 6), (0, 7), (1, 1)]
        assert [(r.pid, r.camid) for r in ds.gallery] == [(3, 4), (9, 1)]
    assert build_dataset("occ_duke", tmp_path).root.name == "Occluded_Duke"
    assert build_dataset("occ_duke", tmp_path).num_cams == 8
    # c7/c8 are fine for Duke but outside Market's 6 cameras
    with pytest.raises(OccReIDError, match=r"0001_c7_f0000002.jpg is outside the range c1\.\.c6"):
        build_dataset("market1501", tmp_path / "dukemtmcreid")


def test_camera_out_of_range_for_duke(tmp_path):
    layout = dict(MARKET, query=["0002_c9_f0000001.jpg"])
    make_market(tmp_path / "Occluded_Duke", layout)
    with pytest.raises(OccReIDError, match="0002_c9_f0000001.jpg"):
        build_dataset("occluded_duke", tmp_path)


META_HEADER = "split,filename,pid,camid,occlusion,side,fraction\n"


def test_synthocc_with_occlusion_meta(tmp_path, caplog):
    layout = {
        "bounding_box_train": ["0001_c1_f0000001.jpg", "0001_c2_f0000002.jpg",
                               "0004_c3_f0000003.jpg"],
        "query": ["0010_c1_f0000004.jpg", "0011_c2_f0000005.jpg", "0012_c3_f0000009.jpg"],
        "bounding_box_test": ["0010_c2_f0000006.jpg", "0011_c3_f0000007.jpg"],
    }
    root = make_market(tmp_path / "SynthOcc", layout)
    rows = [
        ("train", "0001_c1_f0000001.jpg", "holistic"), ("train", "0001_c2_f0000002.jpg", "npo"),
        ("train", "0004_c3_f0000003.jpg", "holistic"), ("query", "0010_c1_f0000004.jpg", "npo"),
        ("query", "0011_c2_f0000005.jpg", "ntp"),  # 0012 has no row
        ("gallery", "0010_c2_f0000006.jpg", "holistic"),
        ("gallery", "0011_c3_f0000007.jpg", "ntp"),
        ("query", "0001_c1_f0000001.jpg", "ntp"),  # same file name, other split: not used
    ]
    (root / "occlusion_meta.csv").write_text(
        META_HEADER + "".join(f"{s},{n},1,1,{o},top,0.3\n" for s, n, o in rows)
    )
    with caplog.at_level(logging.WARNING, logger="occreid.data"):
        ds = build_dataset("synthocc", tmp_path)
    assert ds.root.name == "SynthOcc" and ds.has_occlusion_meta
    assert [r.occlusion for r in ds.train] == ["holistic", "npo", "holistic"]
    assert [r.occlusion for r in ds.query] == ["npo", "ntp", None]
    assert [r.occlusion for r in ds.gallery] == ["holistic", "ntp"]
    assert any("1 of 3 query images" in rec.getMessage() for rec in caplog.records)
    d = ds.describe()
    assert d["has_occlusion_meta"] is True
    assert d["query_occlusion"] == {"holistic": 0, "npo": 1, "ntp": 1, "unknown": 1}
    assert "holistic" in ds.summary().splitlines()[1]


def test_occlusion_meta_bad_values(tmp_path):
    root = make_market(tmp_path / "SynthOcc")
    meta = root / "occlusion_meta.csv"
    meta.write_text(META_HEADER + "query,0002_c1s1_001051_00.jpg,2,1,partial,,0\n")
    with pytest.raises(OccReIDError, match="line 2.*'partial'"):
        build_dataset("synthocc", root)
    meta.write_text(META_HEADER + "test,0002_c1s1_001051_00.jpg,2,1,npo,,0\n")
    with pytest.raises(OccReIDError, match="split 'test'"):
        build_dataset("synthocc", root)
    meta.write_text("split,file,occ\n")
    with pytest.raises(OccReIDError, match="missing column"):
        build_dataset("synthocc", root)


# --------------------------------------------------------------------------------------------
# Errors common to the file-name parsers
# --------------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(OccReIDError, match="does not exist"):
        build_dataset("market1501", tmp_path / "nope")


def test_root_without_dataset_lists_tried_paths(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(OccReIDError) as exc:
        build_dataset("market1501", tmp_path)
    msg = str(exc.value)
    for cand in ("market1501", "Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15"):
        assert str(tmp_path.resolve() / cand) in msg
    assert "bounding_box_train" in msg


def test_missing_split_folder(tmp_path):
    layout = {k: v for k, v in MARKET.items() if k != "bounding_box_test"}
    make_market(tmp_path / "market1501", layout)
    with pytest.raises(OccReIDError, match="'bounding_box_test' not found.*bounding_box_train,"):
        build_dataset("market1501", tmp_path)


def test_empty_split_folder(tmp_path):
    ds_dir = make_market(tmp_path / "market1501")
    for f in (ds_dir / "query").iterdir():
        f.unlink()
    (ds_dir / "query" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(OccReIDError, match=f"no image files .* in {ds_dir.resolve() / 'query'}"):
        build_dataset("market1501", tmp_path)


def test_unparsable_file_name(tmp_path):
    ds_dir = make_market(tmp_path / "market1501")
    write_img(ds_dir / "bounding_box_test" / "IMG_1234.jpg")
    with pytest.raises(OccReIDError, match="IMG_1234.jpg.*0002_c1s1_000451_03.jpg"):
        build_dataset("market1501", tmp_path)


def test_pid_out_of_range_for_market(tmp_path):
    ds_dir = make_market(tmp_path / "market1501")
    write_img(ds_dir / "bounding_box_test" / "1600_c1s1_000001_00.jpg")
    with pytest.raises(OccReIDError, match="person id 1600"):
        build_dataset("market1501", tmp_path)


def test_empty_query_after_junk_removal(tmp_path):
    make_market(tmp_path / "market1501", dict(MARKET, query=["-1_c1s1_000001_00.jpg"]))
    with pytest.raises(OccReIDError, match="query set is empty"):
        build_dataset("market1501", tmp_path)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(OccReIDError, match="Did you mean 'market1501'"):
        build_dataset("market1051", tmp_path)


def test_hidden_files_are_ignored(tmp_path):
    ds_dir = make_market(tmp_path / "market1501")
    (ds_dir / "query" / "._0002_c1s1_001051_00.jpg").write_bytes(b"\x00\x05")
    assert build_dataset("market1501", tmp_path).num_query_imgs == 2


# --------------------------------------------------------------------------------------------
# MSMT17
# --------------------------------------------------------------------------------------------


def make_msmt(ds_dir: Path, v2: bool = False) -> Path:
    train_dir, test_dir = ("mask_train_v2", "mask_test_v2") if v2 else ("train", "test")
    lists = {
        "list_train.txt": (train_dir, [("0005", "0005_000_01_0303morning_0015_0.jpg", 5),
                                       ("0005", "0005_001_03_0303morning_0016_0.jpg", 5),
                                       ("0000", "0000_000_15_0303noon_0001_1.jpg", 0)]),
        "list_val.txt": (train_dir, [("0002", "0002_000_07_0303morning_0020_0.jpg", 2),
                                     ("0000", "0000_003_02_0303noon_0002_0.jpg", 0)]),
        "list_query.txt": (test_dir, [("0100", "0100_000_04_0303afternoon_0001_0.jpg", 100)]),
        "list_gallery.txt": (test_dir, [("0100", "0100_002_09_0303afternoon_0002_0.jpg", 100),
                                        ("0101", "0101_000_10_0303afternoon_0003_0.jpg", 101)]),
    }
    for list_name, (img_dir, items) in lists.items():
        lines = []
        for i, (folder, name, pid) in enumerate(items):
            write_img(ds_dir / img_dir / folder / name, i)
            lines.append(f"{folder}/{name} {pid}\n")
        (ds_dir / list_name).parent.mkdir(parents=True, exist_ok=True)
        (ds_dir / list_name).write_text("".join(lines) + "\n")
    return ds_dir


@pytest.mark.parametrize("sub,v2", [("MSMT17", False), ("MSMT17_V1", False),
                                    ("msmt17/MSMT17_V2", True), ("MSMT17_V2", True)])
def test_msmt17_layouts(tmp_path, sub, v2):
    ds_dir = make_msmt(tmp_path / sub, v2=v2).resolve()
    ds = build_dataset("msmt17", tmp_path)
    assert ds.root == ds_dir and ds.version == ("V2" if v2 else "V1")
    tr = "mask_train_v2" if v2 else "train"
    # train + val, relabelled over the union: raw 0 -> 0, 2 -> 1, 5 -> 2
    assert ds.train == [
        ImageRecord(str(ds_dir / tr / "0005/0005_000_01_0303morning_0015_0.jpg"), 2, 0),
        ImageRecord(str(ds_dir / tr / "0005/0005_001_03_0303morning_0016_0.jpg"), 2, 2),
        ImageRecord(str(ds_dir / tr / "0000/0000_000_15_0303noon_0001_1.jpg"), 0, 14),
        ImageRecord(str(ds_dir / tr / "0002/0002_000_07_0303morning_0020_0.jpg"), 1, 6),
        ImageRecord(str(ds_dir / tr / "0000/0000_003_02_0303noon_0002_0.jpg"), 0, 1),
    ]
    assert [(r.pid, r.camid) for r in ds.query] == [(100, 3)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(100, 8), (101, 9)]
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)
    no_val = build_dataset("msmt", tmp_path, combine_val=False)
    assert [(r.pid, r.camid) for r in no_val.train] == [(1, 0), (1, 2), (0, 14)]
    assert no_val.num_train_pids == 2 and ds.num_train_pids == 3


def test_msmt17_missing_list_and_bad_line(tmp_path):
    ds_dir = make_msmt(tmp_path / "MSMT17")
    (ds_dir / "list_val.txt").unlink()
    with pytest.raises(OccReIDError, match="'list_val.txt' not found"):
        build_dataset("msmt17", tmp_path)
    assert build_dataset("msmt17", tmp_path, combine_val=False).num_train_imgs == 3
    (ds_dir / "list_query.txt").write_text("0100/0100.jpg\n")
    with pytest.raises(OccReIDError, match="list_query.txt, line 1"):
        build_dataset("msmt17", tmp_path, combine_val=False)


def test_msmt17_missing_image_folder(tmp_path):
    ds_dir = make_msmt(tmp_path / "MSMT17")
    os.rename(ds_dir / "test", ds_dir / "test_moved")
    with pytest.raises(OccReIDError, match="'test' not found"):
        build_dataset("msmt17", tmp_path)


# --------------------------------------------------------------------------------------------
# Occluded-REID and Partial-REID
# --------------------------------------------------------------------------------------------


def make_oreid_original(ds_dir: Path) -> Path:
    for pid in (1, 2, 200):
        for k in (1, 2):
            write_img(ds_dir / "occluded_body_images" / f"{pid:03d}" / f"{pid:03d}_{k:02d}.tif")
            write_img(ds_dir / "whole_body_images" / f"{pid:03d}" / f"{pid:03d}_{k:02d}.tif")
    write_img(ds_dir / "whole_body_images" / "007_01.tif")  # directly in the folder
    write_img(ds_dir / "occluded_body_images" / "003" / "img_a.tif")  # pid from the folder name
    return ds_dir


@pytest.mark.parametrize("sub", ["Occluded_REID", "OccludedREID"])
def test_occluded_reid_original(tmp_path, sub):
    ds_dir = make_oreid_original(tmp_path / sub).resolve()
    ds = build_dataset("occluded_reid", tmp_path)
    assert ds.root == ds_dir and ds.train == [] and ds.num_train_pids == 0
    assert [r.pid for r in ds.query] == [1, 1, 2, 2, 3, 200, 200]  # sorted by folder
    assert [r.pid for r in ds.gallery] == [7, 1, 1, 2, 2, 200, 200]
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
    assert ds.query[0].path == str(ds_dir / "occluded_body_images" / "001" / "001_01.tif")
    assert ds.num_cams == 2


def test_occluded_reid_renamed_layout(tmp_path):
    ds_dir = tmp_path / "Occluded_REID"
    make_split(ds_dir / "query", [f"{p:04d}_c1s1_{50 * k:06d}_00.tif" for p in (1, 2) for k in (1, 2)])
    make_split(ds_dir / "bounding_box_test", [f"{p:04d}_c3s3_{50 * k:06d}_00.tif" for p in (1, 2)
                                              for k in (1, 2)])
    ds = build_dataset("occ_reid", ds_dir)
    assert [(r.pid, r.camid) for r in ds.query] == [(1, 0), (1, 0), (2, 0), (2, 0)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(1, 1), (1, 1), (2, 1), (2, 1)]


def test_occluded_reid_errors(tmp_path):
    ds_dir = tmp_path / "Occluded_REID"
    write_img(ds_dir / "occluded_body_images" / "001" / "001_01.tif")
    with pytest.raises(OccReIDError, match="'whole_body_images' not found"):
        build_dataset("occluded_reid", tmp_path)
    write_img(ds_dir / "whole_body_images" / "abc.tif")
    with pytest.raises(OccReIDError, match="abc.tif"):
        build_dataset("occluded_reid", tmp_path)


@pytest.mark.parametrize("sub", ["Partial_REID", "Partial-REID", "PartialREID"])
def test_partial_reid(tmp_path, sub):
    ds_dir = tmp_path / sub
    make_split(ds_dir / "partial_body_images", [f"{p:03d}_{k:02d}.jpg" for p in (1, 60) for k in (1, 2, 3)])
    make_split(ds_dir / "whole_body_images", [f"{p:03d}_{k:02d}.jpg" for p in (1, 60) for k in (1, 2, 3)])
    ds = build_dataset("partial_reid", tmp_path)
    assert ds.train == []
    assert [(r.pid, r.camid) for r in ds.query] == [(1, 0)] * 3 + [(60, 0)] * 3
    assert [(r.pid, r.camid) for r in ds.gallery] == [(1, 1)] * 3 + [(60, 1)] * 3
    assert (ds.num_query_pids, ds.num_query_imgs, ds.num_gallery_imgs) == (2, 6, 6)


# --------------------------------------------------------------------------------------------
# Generic folder dataset
# --------------------------------------------------------------------------------------------


def test_folder_identity_subfolders_without_cameras(tmp_path):
    for split, ids in (("train", ["bob", "alice", "carol"]), ("query", ["zed", "amy"]),
                       ("gallery", ["amy", "zed", "yan"])):
        for pid in ids:
            for k in range(2):
                write_img(tmp_path / split / pid / f"img{k}.jpg")
    ds = build_dataset("folder", tmp_path)
    assert ds.pid_map == {"alice": 0, "bob": 1, "carol": 2}
    assert [r.pid for r in ds.train] == [0, 0, 1, 1, 2, 2]
    assert {r.camid for r in ds.train} == {0}
    # names numbered over the union of query and gallery, sorted: amy 0, yan 1, zed 2
    assert ds.test_pid_map == {"amy": 0, "yan": 1, "zed": 2}
    assert [r.pid for r in ds.query] == [0, 0, 2, 2]
    assert [r.pid for r in ds.gallery] == [0, 0, 1, 1, 2, 2]
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
    assert ds.query[0].path == str((tmp_path / "query" / "amy" / "img0.jpg").resolve())


def test_folder_flat_names_with_cameras_and_no_train(tmp_path):
    make_split(tmp_path / "query", ["0003_c2_f01.jpg", "0012_c1_f02.jpg", "-1_c1_f03.jpg"])
    make_split(tmp_path / "gallery", ["0003_c4_f04.jpg", "0007_c1_f05.jpg"])
    write_img(tmp_path / "gallery" / "0012" / "x_c3_01.jpg")  # sub-folder with a camera token
    ds = build_dataset("folder", tmp_path)
    assert ds.train == [] and ds.num_train_pids == 0
    assert [(r.pid, r.camid) for r in ds.query] == [(3, 1), (12, 0)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(3, 3), (7, 0), (12, 2)]


def test_folder_errors(tmp_path):
    make_split(tmp_path / "query", ["0003_c2_f01.jpg"])
    with pytest.raises(OccReIDError, match="'gallery' not found"):
        build_dataset("folder", tmp_path)
    make_split(tmp_path / "gallery", ["0003_f04.jpg"])  # no camera token: mixed with query
    with pytest.raises(OccReIDError, match="some images .* have a camera token"):
        build_dataset("folder", tmp_path)
    make_split(tmp_path / "gallery", ["noseparator.jpg"])
    (tmp_path / "gallery" / "0003_f04.jpg").unlink()
    with pytest.raises(OccReIDError, match="noseparator.jpg"):
        build_dataset("folder", tmp_path)
    with pytest.raises(OccReIDError, match="no dataset folder"):
        build_dataset("folder", tmp_path / "query")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_names_and_custom_dataset(tmp_path):
    assert set(list_datasets()) >= {"market1501", "dukemtmc", "occluded_duke", "occluded_reid",
                                    "partial_reid", "msmt17", "synthocc", "folder"}
    for alias in ("market", "dukemtmcreid", "duke", "occ_duke", "occ_reid", "msmt"):
        assert alias in DATASETS and alias not in list_datasets()

    @register_dataset("tiny_test_set", aliases=("tiny_alias",))
    class Tiny(ReIDDataset):
        markers = ("q",)
        layout = "<dataset>/q"

        def __init__(self, root, scale=1):
            self.scale = scale
            super().__init__(root)

        def _load(self):
            rec = ImageRecord(str(self.root / "q"), 3 * self.scale, 0)
            return [], [rec], [rec]

    (tmp_path / "q").mkdir()
    ds = build_dataset("tiny_alias", tmp_path, scale=2)
    assert isinstance(ds, Tiny) and ds.name == "tiny_test_set" and ds.query[0].pid == 6


# --------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------


def test_image_dataset_items_and_loader(tmp_path):
    ds = build_dataset("market1501", make_market(tmp_path / "market1501"))
    items = ImageDataset(ds.train + ds.query)
    first = items[0]
    assert isinstance(first["images"], Image.Image) and first["images"].size == (4, 8)
    assert (first["pids"], first["camids"], first["index"]) == (ds.train[0].pid, ds.train[0].camid, 0)
    assert items[-1]["index"] == len(items) - 1
    with pytest.raises(IndexError):
        items[len(items)]

    tf = build_test_transform((8, 4))
    data = ImageDataset(ds.gallery, tf)
    expected = (torch.from_numpy(np.asarray(Image.open(ds.gallery[2].path).convert("RGB"),
                                            dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
    torch.testing.assert_close(data[2]["images"], expected, rtol=0, atol=1e-6)

    clone = pickle.loads(pickle.dumps(data))
    assert clone.records == data.records
    batch = next(iter(DataLoader(data, batch_size=4, shuffle=False)))
    assert batch["images"].shape == (4, 3, 8, 4)
    assert batch["pids"].tolist() == [r.pid for r in ds.gallery]
    assert batch["camids"].tolist() == [r.camid for r in ds.gallery]
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_image_dataset_corrupt_and_truncated_files(tmp_path):
    bad = tmp_path / "0001_c1_bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    good = write_img(tmp_path / "0001_c1_good.jpg")
    truncated = tmp_path / "0001_c1_trunc.jpg"
    big = np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(big).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    data = ImageDataset([ImageRecord(str(p), 1, 0) for p in (bad, good, truncated)])
    with pytest.raises(OccReIDError, match=str(bad)):
        data[0]
    assert data[1]["pids"] == 1
    with pytest.raises(OccReIDError, match=str(truncated)):
        data[2]
    missing = ImageDataset([ImageRecord(str(tmp_path / "gone.jpg"), 1, 0)])
    with pytest.raises(OccReIDError, match="gone.jpg"):
        missing[0]
