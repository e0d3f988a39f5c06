"""Data sources on miniature copies of each benchmark's official layout
(:mod:`advcal.data.miniature`): labels and class order by the official conventions
(DATA.md §2), splits, ``first``/``subset``, fingerprints, corrupt files with and without
``skip_bad``, DataLoader workers, the lazy safetensors file, and ``import advcal.data``
without any decoder installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import advcal.data as D
from advcal.data import miniature as M
from advcal.data.decode import DecodeError, decode_events
from advcal.data.metadata import ESC50_TARGETS, imagenet_classnames, imagenet_wnids
from advcal.data.sources import DataSourceError, parse_spec
from advcal.data.transforms import minibind_transforms

pytest.importorskip("PIL")
pytest.importorskip("soundfile")
pytest.importorskip("av")
pytest.importorskip("h5py")

MINI = minibind_transforms()
SORTED = {w: i for i, w in enumerate(imagenet_wnids())}


# ------------------------------------------------------------------------------ ImageNet


@pytest.fixture(scope="module")
def imagenets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    truth = {lay: M.make_imagenet(root / lay, lay) for lay in ("folders", "devkit", "kaggle")}
    return root, truth


@pytest.mark.parametrize("layout", ["folders", "devkit", "kaggle"])
def test_imagenet_labels_are_sorted_wnid_indices_in_every_layout(imagenets, layout):
    root, truth = imagenets
    ds = D.open(f"imagenet:{root / layout}", "val")
    want = [SORTED[w] for w in truth[layout].values()]
    assert ds.labels.tolist() == want == [0, 0, 65, 65, 230, 230]
    assert ds.ids.tolist() == [1, 2, 3, 4, 5, 6]  # the 8-digit image numbers
    assert len(ds.info.class_names) == 1000 and ds.info.class_names == imagenet_classnames()
    assert ds.info.class_names[65] == "sea snake" and ds.info.class_names[0] == "tench"
    assert len(ds.info.templates) == 80 and ds.info.templates[0] == "a bad photo of a {}."
    x = ds[2]["inputs"]["image"]
    assert x.shape == (3, 40, 56) and x.min() >= 0 and x.max() <= 1


def test_imagenet_devkit_ids_are_translated_not_used_as_labels(imagenets):
    """The ground-truth file holds ILSVRC2012_IDs (meta.mat order); using them as labels is
    DATA.md's §2.1 trap: the miniature devkit's ids differ from the sorted indices."""
    root, truth = imagenets
    gt = root / "devkit/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    ids = [int(s) for s in gt.read_text().split()]
    assert [i - 1 for i in ids] != [SORTED[w] for w in truth["devkit"].values()]
    ds = D.open(f"imagenet:{root / 'devkit'}", "val", names="lemma", templates="simple")
    assert ds.labels.tolist() == [SORTED[w] for w in truth["devkit"].values()]
    assert ds.info.class_names[0] == "tench, Tinca tinca" and len(ds.info.templates) == 7


def test_imagenet_robustbench_subset_in_list_order_and_first(imagenets, tmp_path):
    root, truth = imagenets
    lst = tmp_path / "ids.txt"
    keys = [f"{w}/{name}" for name, w in truth["folders"].items()]
    order = [keys[4], keys[0], keys[3]]
    lst.write_text("\n".join(order))  # no trailing newline, as RobustBench's file
    for layout in ("folders", "devkit"):
        ds = D.open(f"imagenet:{root / layout}", "val", subset=lst)
        assert ds.ids.tolist() == [5, 1, 4], layout
        assert ds.labels.tolist() == [230, 0, 65]
        assert ds.info.extra["subset"] == str(lst)
    two = D.open(f"imagenet:{root / 'folders'}", "val", subset=lst, first=2)
    assert two.ids.tolist() == [5, 1] and two.info.extra["first"] == 2
    assert D.open(f"imagenet:{root / 'kaggle'}", "val", first=3).ids.tolist() == [1, 2, 3]
    lst.write_text("n01440764/ILSVRC2012_val_00099999.JPEG\n")
    with pytest.raises(DataSourceError, match="not in"):
        D.open(f"imagenet:{root / 'folders'}", "val", subset=lst)
    with pytest.raises(DataSourceError, match="first=7"):
        D.open(f"imagenet:{root / 'folders'}", "val", first=7)


def test_imagenet_bad_layouts_name_what_is_missing(tmp_path):
    M.make_imagenet(tmp_path / "d", "devkit")
    (tmp_path / "d/ILSVRC2012_devkit_t12/data/meta.mat").unlink()
    with pytest.raises(DataSourceError, match="devkit"):
        D.open(f"imagenet:{tmp_path / 'd'}", "val")
    (tmp_path / "x/val/n99999999").mkdir(parents=True)
    with pytest.raises(DataSourceError, match="not ImageNet-1K wnids"):
        D.open(f"imagenet:{tmp_path / 'x'}", "val")
    with pytest.raises(DataSourceError, match="does not exist"):
        D.open(f"imagenet:{tmp_path / 'nowhere'}", "val")


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint_stable_and_changes_with_content_and_selection(tmp_path):
    M.make_imagenet(tmp_path, "folders")
    spec = f"imagenet:{tmp_path}"
    a, b = D.open(spec, "val"), D.open(spec, "val")
    assert a.info.fingerprint == b.info.fingerprint and len(a.info.fingerprint) == 64
    assert D.open(spec, "val", first=3).info.fingerprint != a.info.fingerprint
    f = tmp_path / "val/n01751748/ILSVRC2012_val_00000003.JPEG"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = D.open(spec, "val").info.fingerprint
    assert touched != a.info.fingerprint
    f.unlink()
    assert D.open(spec, "val").info.fingerprint not in (touched, a.info.fingerprint)


# ------------------------------------------------------------------------------ ESC-50


@pytest.fixture(scope="module")
def esc50(tmp_path_factory):
    root = tmp_path_factory.mktemp("esc50")
    M.make_esc50(root, targets=(0, 10, 23, 47), seconds=0.5)
    return root


def test_esc50_folds_and_csv_target_labels(esc50):
    test = D.open(f"esc50:{esc50}?fold=5", "test")
    train = D.open(f"esc50:{esc50}", "train", fold=5)
    assert len(test) == 4 and len(train) == 16
    assert not set(test.ids.tolist()) & set(train.ids.tolist())
    assert sorted(test.labels.tolist()) == [0, 10, 23, 47]  # the csv target
    assert test.info.class_names[23] == "breathing" and len(test.info.class_names) == 50
    assert test.info.class_names == tuple(c.replace("_", " ") for c in ESC50_TARGETS)
    assert test.info.templates == ("a sound of {}.",)
    assert test.info.extra["fold"] == [5]
    two = D.open(f"esc50:{esc50}?fold=4,5", "test")
    assert len(two) == 8 and len(D.open(f"esc50:{esc50}", "test")) == 20
    x = D.open(f"esc50:{esc50}?fold=5", "test")[0]["inputs"]["audio"]
    assert x.shape == (22050,) and x.abs().max() <= 1  # generic: the file's own 44.1 kHz
    with pytest.raises(DataSourceError, match="needs fold"):
        D.open(f"esc50:{esc50}", "train")


def test_esc50_alphabetical_order_is_languagebinds(esc50):
    ds = D.open(f"esc50:{esc50}?fold=1&label_order=alphabetical", "test")
    names = ds.info.class_names
    assert list(names) == sorted(names) and names[0] == "airplane" and names[1] == "breathing"
    cats = ["dog", "rain", "breathing", "airplane"]
    assert sorted(names[i] for i in ds.labels.tolist()) == sorted(cats)
    assert ds.labels.tolist() != D.open(f"esc50:{esc50}?fold=1", "test").labels.tolist()


def test_esc50_csv_with_a_wrong_category_is_refused(tmp_path):
    M.make_esc50(tmp_path, targets=(0,), folds=(1,), seconds=0.1)
    csv_path = tmp_path / "meta/esc50.csv"
    csv_path.write_text(csv_path.read_text().replace(",0,dog,", ",0,cat,"))
    with pytest.raises(DataSourceError, match="target 0"):
        D.open(f"esc50:{tmp_path}", "test")


# ------------------------------------------------------------------------------ ModelNet40


def test_modelnet40_txt(tmp_path):
    M.make_modelnet40_txt(tmp_path)
    ds = D.open(f"modelnet40:{tmp_path}", "test", transforms=MINI)
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.info.class_names == ("airplane", "bathtub", "flower pot", "night stand")
    assert len(ds.info.templates) == 64 and ds.info.templates[0] == "a point cloud model of {}."
    p = ds[0]["inputs"]["point"]
    assert p.shape == (128, 3) and abs(float(p.norm(dim=1).max()) - 1) < 1e-5
    assert len(D.open(f"modelnet40:{tmp_path}", "train")) == 8


def test_modelnet40_h5_in_listed_file_order(tmp_path):
    M.make_modelnet40_h5(tmp_path)
    ds = D.open(f"modelnet40:{tmp_path}", "train")
    # train_files.txt lists ply_data_train1.h5 first (labels (r + 1) % 4), then train0
    assert ds.labels.tolist() == [1, 2, 3, 0, 1, 2]
    import h5py

    with h5py.File(tmp_path / "ply_data_train1.h5") as f:
        assert torch.equal(ds[1]["inputs"]["point"], torch.from_numpy(f["data"][1]))
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=D.collate)
    assert sum(len(b) for b in loader) == 6


# ------------------------------------------------------------------------------ MSR-VTT


def test_msrvtt_retrieval_1k_split_and_captions(tmp_path):
    M.make_msrvtt(tmp_path)
    ds = D.open(f"msrvtt:{tmp_path}", "test", transforms=MINI)
    assert ds.info.task == "retrieval" and ds.ids.tolist() == [7010, 7020, 9770]
    assert (ds.labels == -1).all() and ds.info.class_names == ()
    assert ds.info.captions[9770] == ("a test caption of video 9770",)
    assert ds[0]["inputs"]["video"].shape == (4, 3, 32, 32)
    # workers forked after the parent decoded a video (PyAV's cached scaler once hung them)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=D.collate, timeout=120)
    assert [b.ids.tolist() for b in loader] == [[7010, 7020], [9770]]
    train = D.open(f"msrvtt:{tmp_path}", "train")
    assert train.ids.tolist() == [1, 2] and len(train.info.captions[2]) == 2


def test_msrvtt_category_task(tmp_path):
    M.make_msrvtt(tmp_path)
    ds = D.open(f"msrvtt:{tmp_path}?task=category", "test")
    assert ds.info.task == "classification" and ds.labels.tolist() == [10, 0, 10]
    assert ds.info.class_names[10] == "howto" and len(ds.info.class_names) == 20


# ------------------------------------------------------------------------------ NYU-D, LLVIP


def test_nyud_tui_nicr_scene_mapping_and_rgb(tmp_path):
    M.make_nyud(tmp_path)
    ds = D.open(f"nyud:{tmp_path}", "test")
    scenes = [(tmp_path / "test/scene_class" / f"{i:04d}.txt").read_text() for i in ds.ids.tolist()]
    ten = ds.info.class_names
    want = {"kitchen": "kitchen", "living_room": "living room", "home_office": "home office",
            "basement": "others", "bathroom": "bathroom"}  # fmt: skip
    assert [ten[y] for y in ds.labels.tolist()] == [want[s] for s in scenes]
    assert ds.info.modalities == ("depth",) and ds.info.templates[0] == "a bad depth photo of a {}."
    d = ds[0]["inputs"]["depth"]  # generic: metres, 16-bit mm / 1000
    assert d.shape == (1, 48, 64) and d.max() <= 5.1 and (d == 0).any()
    both = D.open(f"nyud:{tmp_path}", "test", modalities=["depth", "image"], transforms=MINI)
    assert set(both[0]["inputs"]) == {"depth", "image"}
    raw = D.open(f"nyud:{tmp_path}?classes=scene&depth=raw", "train")
    assert raw.info.class_names == tuple(sorted(set(raw.info.class_names)))


def test_nyud_languagebind_imagefolder(tmp_path):
    M.make_nyud(tmp_path, "imagefolder")
    ds = D.open(f"nyud:{tmp_path}", "test")
    assert ds.labels.tolist() == [0, 0, 0, 4, 4, 4, 9, 9, 9]  # bathroom, dining room, others


def test_llvip_folders_and_names(tmp_path):
    M.make_llvip(tmp_path)
    ds = D.open(f"llvip:{tmp_path}", "val", transforms=MINI)
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.info.class_names == ("background", "people")
    assert ds[0]["inputs"]["thermal"].shape == (1, 32, 32)
    assert D.open(f"llvip:{tmp_path}?names=unibind", "test").info.class_names[1] == "person"


# ------------------------------------------------------------------------------ events


def test_ncaltech101_bin_events_split_lists_and_class_index(tmp_path):
    M.make_ncaltech101(tmp_path)
    val = D.open(f"ncaltech101:{tmp_path}", "val", transforms=MINI)
    # sorted folders: BACKGROUND_Google, accordion, sea_horse
    assert val.info.class_names == ("BACKGROUND_Google", "accordion", "sea_horse")
    assert val.labels.tolist() == [1, 2, 0] and len(D.open(f"ncaltech101:{tmp_path}", "train")) == 6
    ev = M.events(100 * 1 + 2)
    got = decode_events(tmp_path / "N_Caltech101/sea_horse/image_0003.bin")
    assert np.array_equal(got.x, ev["x"]) and np.array_equal(got.p, ev["p"])
    assert np.allclose(got.t, ev["t"] / 1e6)
    assert val[0]["inputs"]["event"].shape == (2, 32, 32)
    idx = tmp_path / "eventbind.json"
    idx.write_text('{"sea_horse": 0, "accordion": 1, "BACKGROUND_Google": 2}')
    mapped = D.open(f"ncaltech101:{tmp_path}", "val", class_index=str(idx))
    assert mapped.labels.tolist() == [1, 0, 2] and mapped.info.class_names[0] == "sea_horse"


def test_nimagenet_npz_list_order_and_sorted_wnids(tmp_path):
    M.make_nimagenet(tmp_path)
    ds = D.open(f"nimagenet:{tmp_path}", "val")
    assert ds.labels.tolist() == [65, 65, 0, 0]  # val_list.txt order (reversed)
    assert ds.info.class_names[65] == "sea snake"
    assert len(D.open(f"nimagenet:{tmp_path}", "train")) == 4
    assert ds[0]["inputs"]["event"].shape == (2, 480, 640)  # generic counts on the sensor


# ------------------------------------------------------------------------------ paired, folder


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_paired_manifest(tmp_path, fmt):
    man = M.make_paired(tmp_path, fmt)
    test = D.open(f"paired:{man}", "test", transforms=MINI)
    assert test.ids.tolist() == [103, 107] and test.labels.tolist() == [1, 1]
    assert test.info.class_names == ("cat", "dog")
    assert set(test[0]["inputs"]) == {"image", "audio", "point"}
    only = D.open(f"paired:{man}", "train", modalities=["audio"], transforms=MINI)
    assert len(only) == 6 and set(only[0]["inputs"]) == {"audio"}
    named = D.open(f"paired:{man}?classes=dog,cat", "test")
    assert named.labels.tolist() == [0, 0]


def test_paired_without_split_column_holds_out(tmp_path):
    man = M.make_paired(tmp_path, "csv", n=12, split_column=False)
    tr, te = D.open(f"paired:{man}", "train"), D.open(f"paired:{man}", "test")
    assert len(tr) + len(te) == 12 and not set(tr.ids.tolist()) & set(te.ids.tolist())
    (tmp_path / "img/100.png").unlink()
    with pytest.raises(DataSourceError, match=r"do not exist.*100\.png"):
        D.open(f"paired:{man}", "all", modalities=["image"])
    ds = D.open(f"paired:{man}", "all", modalities=["image"], skip_bad=True)
    assert ds[0]["inputs"] is None and "100.png" in ds.skipped[0] and ds[1]["inputs"] is not None


def test_folder_holdout_split_folders_and_modality(tmp_path):
    for c in ("cat", "dog_big"):
        for k in range(4):
            M.write_image(tmp_path / "flat" / c / f"{k}.png", k, 20, 30)
            M.write_image(tmp_path / "split/test" / c / f"{k}.jpg", k, 20, 30)
    tr, te = (
        D.open(f"folder:{tmp_path / 'flat'}", "train"),
        D.open(f"folder:{tmp_path / 'flat'}", "test"),
    )
    assert len(tr) == 6 and len(te) == 2 and te.labels.tolist() == [0, 1]
    assert tr.info.class_names == ("cat", "dog big") and tr.info.modalities == ("image",)
    sp = D.open(f"folder:{tmp_path / 'split'}", "test", transforms=MINI)
    assert len(sp) == 8 and sp[0]["inputs"]["image"].shape == (3, 32, 32)
    th = D.open(f"folder:{tmp_path / 'flat'}?modality=thermal", "all")
    assert th.info.modalities == ("thermal",) and th[0]["inputs"]["thermal"].shape == (1, 20, 30)
    M.write_wav(tmp_path / "flat/cat/x.wav", 0, 0.1)
    with pytest.raises(DataSourceError, match="modality="):
        D.open(f"folder:{tmp_path / 'flat'}", "all")


# ------------------------------------------------------------------------------ errors, skip_bad


def test_corrupt_file_names_the_file_and_skip_bad_counts_it(tmp_path):
    M.make_imagenet(tmp_path, "folders", per_class=3)
    bad = tmp_path / "val/n01751748/ILSVRC2012_val_00000005.JPEG"
    bad.write_bytes(b"not a jpeg")
    ds = D.open(f"imagenet:{tmp_path}", "val", transforms=MINI)
    with pytest.raises(DecodeError, match=r"ILSVRC2012_val_00000005\.JPEG.*skip_bad"):
        ds[4]
    ds = D.open(f"imagenet:{tmp_path}", "val", transforms=MINI, skip_bad=True)
    assert ds[4]["inputs"] is None and list(ds.skipped) == [4]
    assert "ILSVRC2012_val_00000005.JPEG" in ds.skipped[4]
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=D.collate)
    batches = list(loader)
    assert sum(len(b.skipped) for b in batches) == 1  # counted across worker processes
    assert [i for b in batches for i in b.skipped] == [4]
    assert sum(len(b) for b in batches) == 8
    seen = sorted(i for b in batches for i in b.index.tolist())
    assert seen == [0, 1, 2, 3, 5, 6, 7, 8]


def test_collate_of_an_all_skipped_batch_is_empty_but_counted():
    items = [{"inputs": None, "label": 0, "id": 3, "index": 3, "skipped": "x"}]
    b = D.collate(items)
    assert len(b) == 0 and b.skipped == (3,) and b.inputs == {}


def test_spec_parsing_and_option_errors(tmp_path):
    assert parse_spec("esc50:/d/ESC-50?fold=5&label_order=csv") == (
        "esc50",
        "/d/ESC-50",
        {"fold": "5", "label_order": "csv"},
    )
    assert parse_spec("digits?seed=3") == ("digits", "", {"seed": "3"})
    assert parse_spec("runs/my:data.safetensors")[0] == "file"
    assert parse_spec("/x/data.safetensors") == ("file", "/x/data.safetensors", {})
    M.make_esc50(tmp_path, targets=(0,), folds=(1,), seconds=0.1)
    with pytest.raises(DataSourceError, match=r"takes no option.*label_order"):
        D.open(f"esc50:{tmp_path}?folds=1", "test")
    with pytest.raises(DataSourceError, match=r"folds are 1\.\.5"):
        D.open(f"esc50:{tmp_path}?fold=6", "test")
    with pytest.raises(DataSourceError, match="both in the spec"):
        D.open(f"esc50:{tmp_path}?fold=1", "test", fold=1)


# ------------------------------------------------------------------------------ DataLoader


def test_dataloader_with_workers_over_a_source(tmp_path):
    M.make_imagenet(tmp_path, "devkit", per_class=3)
    ds = D.open(f"imagenet:{tmp_path}", "val", transforms=MINI)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=D.collate, pin_memory=False)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 1]
    got = torch.cat([b.labels for b in batches])
    assert torch.equal(got, ds.labels) and batches[0].inputs["image"].shape == (4, 3, 32, 32)
    assert torch.equal(batches[1].inputs["image"][0], ds[4]["inputs"]["image"])


# ------------------------------------------------------------------------------ tensor sources


def _small(n=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return D.MultiModalDataset(
        {"image": torch.rand(n, 3, 4, 4, generator=g), "audio": torch.rand(n, 8, generator=g)},
        torch.arange(n) % k,
        ("a", "b", "c"),
        torch.arange(50, 50 + n),
        name="mine",
    )


def test_safetensors_file_is_read_per_sample_with_the_same_splits(tmp_path):
    full = _small(16)
    D.save(full, tmp_path / "d.safetensors")
    for split in ("train", "test", "all"):
        lazy = D.open(str(tmp_path / "d.safetensors"), split)
        old = D.load(tmp_path / "d.safetensors", split)
        assert torch.equal(lazy.ids, old.ids) and torch.equal(lazy.labels, old.labels)
        assert torch.equal(lazy[1]["inputs"]["audio"], old.inputs["audio"][1])
        assert lazy.info.class_names == ("a", "b", "c")
    lazy = D.open(f"file:{tmp_path / 'd.safetensors'}", "test", modalities=["image"])
    batches = list(DataLoader(lazy, batch_size=2, num_workers=2, collate_fn=D.collate))
    old = D.load(tmp_path / "d.safetensors", "test")
    assert torch.equal(torch.cat([b.inputs["image"] for b in batches]), old.inputs["image"])
    assert D.open(str(tmp_path / "d.safetensors"), "all", first=3).ids.tolist() == [50, 51, 52]


def test_a_test_only_file_opens_as_test(tmp_path):
    test = _small(6)
    both = D.MultiModalDataset(test.inputs, test.labels, test.class_names, test.ids)
    D.save(both, tmp_path / "t.safetensors", split=torch.ones(6, dtype=torch.bool))
    ds = D.open(str(tmp_path / "t.safetensors"), "test")
    assert len(ds) == 6 and ds.info.split == "test"
    with pytest.raises(DataSourceError, match="no 'train' samples"):
        D.open(str(tmp_path / "t.safetensors"), "train")


def test_digits_source_first_and_modalities():
    ds = D.open("digits", "test", first=4, modalities=["audio"])
    assert len(ds) == 4 and ds.info.modalities == ("audio",) and ds.info.source == "digits"
    assert "not applied" in ds.info.extra["transforms"]
    ref = D.load_dataset("digits", "test")
    assert torch.equal(ds[3]["inputs"]["audio"], ref.inputs["audio"][3])
    assert ds.inputs["audio"].shape == (4, 2048) and ds.class_names[0] == "zero"  # delegated
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=D.collate)
    assert torch.equal(torch.cat([b.ids for b in loader]), ref.ids[:4])


# ------------------------------------------------------------------------------ no decoders


def test_advcal_data_imports_without_decoders_and_names_the_extra(tmp_path):
    """Block Pillow, soundfile, soxr, PyAV and h5py in a child process: ``import advcal.data``
    and the tensor sources work; a scheme that needs a decoder raises naming the extra
    before reading any file."""
    M.make_esc50(tmp_path, targets=(0,), folds=(1,), seconds=0.1)
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('PIL', 'soundfile', 'soxr', 'av', 'h5py'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import advcal.data as D
        assert len(D.open('digits', 'test', first=2)) == 2
        try:
            D.open('esc50:{tmp_path}', 'test')
        except ImportError as err:
            print('ERR', err)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERR" in out.stdout and "pip install 'advcal[data]'" in out.stdout
    assert "soundfile" in out.stdout


def test_an_existing_path_is_required(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        D.open(str(tmp_path / "none.safetensors"), "test")
    assert Path(tmp_path).exists()
