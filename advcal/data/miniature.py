"""Miniature copies of the benchmarks' official on-disk layouts, written from scratch.

Tests, benchmarks and the README's runnable examples open these with the real sources
(``advcal.data.open``), so every layout rule is exercised without the real data. Each
``make_*`` writes a tree under ``root`` and returns it; file contents are deterministic
functions of ``seed`` (small smooth images, tones, clouds, event bursts) so they decode and
carry some class signal, nothing more. Needs the ``data`` extra (Pillow, soundfile, PyAV,
h5py) for the formats it writes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from advcal.data.decode import require
from advcal.data.metadata import ESC50_TARGETS, imagenet_wnids


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def image_array(seed: int, h: int = 40, w: int = 56, channels: int = 3) -> np.ndarray:
    """A smooth random uint8 image (a few sinusoids + noise), ``(h, w, channels)``."""
    g = _rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, channels))
    for c in range(channels):
        f = g.uniform(1, 6, 2)
        img[..., c] = 0.5 + 0.4 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy) + g.uniform(0, 6))
    img += g.normal(0, 0.03, img.shape)
    out = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def write_image(path: Path, seed: int, h: int = 40, w: int = 56, mode: str = "RGB") -> Path:
    Image = require("PIL.Image", "write miniature images")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_array(seed, h, w, 3 if mode == "RGB" else 1)
    Image.fromarray(arr, mode).save(path, quality=95) if path.suffix.lower() in (
        ".jpg", ".jpeg"
    ) else Image.fromarray(arr, mode).save(path)  # fmt: skip
    return path


def write_depth_png(path: Path, seed: int, h: int = 48, w: int = 64) -> Path:
    """A 16-bit PNG in millimetres (0.5 to 5 m, a slanted plane + bumps, a hole of zeros)."""
    Image = require("PIL.Image", "write depth PNGs")
    path.parent.mkdir(parents=True, exist_ok=True)
    g = _rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    d = 500 + 4500 * (xx / w) * g.uniform(0.3, 1) + 200 * np.sin(yy / g.uniform(2, 6))
    d[: h // 8, : w // 8] = 0  # no reading
    Image.fromarray(np.clip(d, 0, 65535).astype(np.uint16)).save(path)
    return path


def write_wav(path: Path, seed: int, seconds: float = 1.0, rate: int = 44100, channels: int = 1):
    """A quiet two-tone wav (PCM 16), ``seconds`` long at ``rate``."""
    sf = require("soundfile", "write miniature audio")
    path.parent.mkdir(parents=True, exist_ok=True)
    g = _rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f = g.uniform(200, 2000, 2)
    x = 0.3 * np.sin(2 * np.pi * f[0] * t) + 0.2 * np.sin(2 * np.pi * f[1] * t)
    x = np.stack([x * (1 - 0.1 * c) for c in range(channels)], 1)
    sf.write(str(path), x.astype(np.float32), rate, subtype="PCM_16")
    return path


def write_video(
    path: Path, seed: int, frames: int = 12, fps: int = 6, h: int = 48, w: int = 64
) -> Path:
    """An H.264 mp4 (yuv420p) of ``frames`` frames at ``fps``: a pattern moving right."""
    av = require("av", "write miniature videos")
    path.parent.mkdir(parents=True, exist_ok=True)
    base = image_array(seed, h, w)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "18", "preset": "ultrafast"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def cloud(seed: int, n: int = 300, normals: bool = True) -> np.ndarray:
    """A noisy ellipsoid surface ``(n, 6)`` (xyz + unit normals) or ``(n, 3)``."""
    g = _rng(seed)
    v = g.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    xyz = v * g.uniform(0.3, 1.0, 3) + g.uniform(-0.2, 0.2, 3)
    return np.concatenate([xyz, v], 1).astype(np.float32) if normals else xyz.astype(np.float32)


def events(seed: int, n: int = 400, h: int = 30, w: int = 40) -> dict[str, np.ndarray]:
    """An event burst: ``x``, ``y`` in the sensor, ``t`` increasing microseconds, ``p`` 0/1."""
    g = _rng(seed)
    cx, cy = g.uniform(0.3, 0.7) * w, g.uniform(0.3, 0.7) * h
    x = np.clip(g.normal(cx, w / 6, n), 0, w - 1).astype(np.int64)
    y = np.clip(g.normal(cy, h / 6, n), 0, h - 1).astype(np.int64)
    t = np.sort(g.integers(0, 100_000, n))
    p = (g.random(n) < 0.5).astype(np.int64)
    return {"x": x, "y": y, "t": t, "p": p}


def write_bin_events(path: Path, ev: dict[str, np.ndarray]) -> Path:
    """N-Caltech101's 5-byte events: x, y, p << 7 | t >> 16, t >> 8, t (bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = ev["t"].astype(np.int64)
    raw = np.stack(
        [ev["x"], ev["y"], (ev["p"] << 7) | ((t >> 16) & 127), (t >> 8) & 255, t & 255], 1
    ).astype(np.uint8)
    raw.tofile(path)
    return path


def write_npz_events(path: Path, ev: dict[str, np.ndarray]) -> Path:
    """N-ImageNet's ``event_data`` structured array (x, y, t, p), compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dt = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])
    arr = np.zeros(len(ev["x"]), dtype=dt)
    for k in ("x", "y", "t", "p"):
        arr[k] = ev[k]
    np.savez_compressed(path, event_data=arr)
    return path


# -------------------------------------------------------------------------- benchmarks


# a handful of sorted-index-far-apart wnids; the first images get ILSVRC numbers 1..N
DEFAULT_WNIDS = ("n01440764", "n01751748", "n02105855", "n04591713", "n15075141")


def make_imagenet(
    root: Path,
    layout: str = "folders",
    wnids: Sequence[str] = DEFAULT_WNIDS[:3],
    per_class: int = 2,
    size: tuple[int, int] = (40, 56),
) -> dict[str, str]:
    """ImageNet val in ``layout`` ``folders`` (``val/<wnid>/``), ``devkit`` (flat +
    ``ILSVRC2012_devkit_t12/data/`` ground truth and ``meta.mat``) or ``kaggle`` (``ILSVRC/Data/
    CLS-LOC/val/`` + ``LOC_val_solution.csv``). Images are numbered 1.. in class-major order.
    Returns ``{file name: wnid}``. The devkit's ILSVRC2012_IDs are a fixed permutation of the
    sorted order (as the real meta.mat's are), with non-leaf synsets mixed in."""
    root = Path(root)
    truth = {}
    n = 0
    for w in wnids:
        for _ in range(per_class):
            n += 1
            truth[f"ILSVRC2012_val_{n:08d}.JPEG"] = w
    if layout == "folders":
        for k, (name, w) in enumerate(truth.items()):
            write_image(root / "val" / w / name, k, *size)
    elif layout == "devkit":
        for k, name in enumerate(truth):
            write_image(root / "val" / name, k, *size)
        _write_devkit(root / "ILSVRC2012_devkit_t12" / "data", list(truth.values()))
    elif layout == "kaggle":
        img = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["ImageId", "PredictionString"])
            for k, (name, w) in enumerate(truth.items()):
                write_image(img / name, k, *size)
                wr.writerow([Path(name).stem, f"{w} 1 2 30 40 {w} 3 4 20 30"])
        with open(root / "LOC_synset_mapping.txt", "w") as f:
            f.writelines(f"{w} class {w}\n" for w in imagenet_wnids())
    else:
        raise ValueError(f"unknown imagenet layout {layout!r}")
    return truth


def ilsvrc_ids() -> dict[str, int]:
    """The miniature devkit's ILSVRC2012_ID of each wnid: sorted position reversed in blocks
    of 7 (a fixed permutation that is not the sorted order)."""
    w = list(imagenet_wnids())
    perm = [i for b in range(0, 1000, 7) for i in reversed(range(b, min(b + 7, 1000)))]
    return {w[j]: k + 1 for k, j in enumerate(perm)}


def _write_devkit(data: Path, image_wnids: list[str]) -> None:
    from scipy.io import savemat

    data.mkdir(parents=True, exist_ok=True)
    ids = ilsvrc_ids()
    rows = sorted(ids.items(), key=lambda kv: kv[1])
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
          ("num_children", "O")]  # fmt: skip
    synsets = np.zeros((len(rows) + 2,), dtype=dt)
    for k, (w, i) in enumerate(rows):
        synsets[k] = (i, w, f"words {w}", "", 0)
    synsets[-2] = (1001, "n00001740", "entity", "", 3)  # non-leaf synsets follow the leaves
    synsets[-1] = (1002, "n00002137", "abstraction", "", 5)
    savemat(str(data / "meta.mat"), {"synsets": synsets.reshape(-1, 1)})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[w]}\n" for w in image_wnids)
    )


def make_esc50(
    root: Path,
    targets: Sequence[int] = (0, 10, 47),
    folds: Sequence[int] = (1, 2, 3, 4, 5),
    seconds: float = 1.0,
    rate: int = 44100,
) -> list[dict]:
    """``audio/{FOLD}-{CLIP}-{TAKE}-{TARGET}.wav`` + ``meta/esc50.csv``, one clip per target
    per fold. Returns the csv rows."""
    root = Path(root)
    rows = []
    for fold in folds:
        for t in targets:
            clip = 100000 + 100 * t + fold
            name = f"{fold}-{clip}-A-{t}.wav"
            write_wav(root / "audio" / name, clip, seconds, rate)
            esc10 = t in (0, 1, 10, 11, 12, 20, 21, 38, 40, 41)
            rows.append(dict(filename=name, fold=fold, target=t, category=ESC50_TARGETS[t],
                             esc10=str(esc10), src_file=clip, take="A"))  # fmt: skip
    (root / "meta").mkdir(parents=True, exist_ok=True)
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return rows


MODELNET_SHAPES = ("airplane", "bathtub", "flower_pot", "night_stand")


def make_modelnet40_txt(root: Path, per_split: int = 2, points: int = 300) -> Path:
    """``modelnet40_normal_resampled``: shape names, train/test id lists, ``x,y,z,nx,ny,nz``
    rows (a 4-class excerpt; the names file holds only these classes)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "modelnet40_shape_names.txt").write_text("".join(f"{s}\n" for s in MODELNET_SHAPES))
    n = 0
    for split in ("train", "test"):
        ids = []
        for s in MODELNET_SHAPES:
            for _ in range(per_split):
                n += 1
                sid = f"{s}_{n:04d}"
                ids.append(sid)
                (root / s).mkdir(exist_ok=True)
                np.savetxt(root / s / f"{sid}.txt", cloud(n, points), fmt="%.6f", delimiter=",")
        (root / f"modelnet40_{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def make_modelnet40_h5(root: Path, files: int = 2, rows: int = 3, points: int = 64) -> Path:
    """``modelnet40_ply_hdf5_2048``: ``ply_data_{split}{k}.h5`` (``data`` (N, P, 3),
    ``label`` (N, 1)), ``{split}_files.txt`` (listed in reverse name order, so list order and
    sorted order differ) and ``shape_names.txt``."""
    h5py = require("h5py", "write miniature h5 files")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shape_names.txt").write_text("".join(f"{s}\n" for s in MODELNET_SHAPES))
    seed = 0
    for split in ("train", "test"):
        names = []
        for k in range(files):
            name = f"ply_data_{split}{k}.h5"
            data = np.stack([cloud(seed + r, points, normals=False) for r in range(rows)])
            label = ((np.arange(rows) + k) % len(MODELNET_SHAPES)).reshape(-1, 1)
            seed += rows
            with h5py.File(root / name, "w") as f:
                f["data"], f["label"] = data, label.astype(np.uint8)
            names.append(f"data/modelnet40_ply_hdf5_2048/{name}")
        (root / f"{split}_files.txt").write_text("".join(f"{n}\n" for n in reversed(names)))
    return root


def make_msrvtt(
    root: Path, test_ids: Sequence[int] = (7010, 7020, 9770), train_ids: Sequence[int] = (1, 2)
) -> Path:
    """``MSRVTT_Videos/videoN.mp4``, ``msrvtt_data/MSRVTT_JSFUSION_test.csv``,
    ``MSRVTT_train.9k.csv`` and ``MSRVTT_data.json`` (categories, 2 captions per video)."""
    root = Path(root)
    data = root / "msrvtt_data"
    data.mkdir(parents=True, exist_ok=True)
    for v in (*test_ids, *train_ids):
        write_video(root / "MSRVTT_Videos" / f"video{v}.mp4", v)
    with open(data / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["key", "vid_key", "video_id", "sentence"])
        for k, v in enumerate(test_ids):
            wr.writerow([f"ret{k}", f"msr{v}", f"video{v}", f"a test caption of video {v}"])
    with open(data / "MSRVTT_train.9k.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["video_id"])
        wr.writerows([[f"video{v}"] for v in train_ids])
    vids = (*test_ids, *train_ids)
    meta = {
        "videos": [
            {
                "video_id": f"video{v}",
                "category": v % 20,
                "split": "test" if v in test_ids else "train",
            }
            for v in vids
        ],
        "sentences": [
            {"video_id": f"video{v}", "caption": f"caption {j} of video {v}", "sen_id": 2 * k + j}
            for k, v in enumerate(vids)
            for j in range(2)
        ],
    }
    (data / "MSRVTT_data.json").write_text(json.dumps(meta))
    return root


NYU_SCENES = ("kitchen", "living_room", "home_office", "basement", "bathroom")


def make_nyud(root: Path, layout: str = "tui-nicr", per_split: int = 3) -> Path:
    """NYUv2 as TUI-NICR writes it (``{train,test}/{depth,depth_raw,rgb,scene_class}/NNNN``)
    or LanguageBind's ImageFolder (``val/<class>/*.png``)."""
    root = Path(root)
    if layout == "tui-nicr":
        n = 0
        for split in ("train", "test"):
            for _ in range(per_split * 2):
                n += 1
                stem = f"{n:04d}"
                write_depth_png(root / split / "depth" / f"{stem}.png", n)
                write_depth_png(root / split / "depth_raw" / f"{stem}.png", n + 1000)
                write_image(root / split / "rgb" / f"{stem}.png", n, 48, 64)
                (root / split / "scene_class").mkdir(parents=True, exist_ok=True)
                scene = NYU_SCENES[n % len(NYU_SCENES)]
                (root / split / "scene_class" / f"{stem}.txt").write_text(scene)
    elif layout == "imagefolder":
        for ci, c in enumerate(("bathroom", "dining_room", "others")):
            for k in range(per_split):
                write_depth_png(root / "val" / c / f"{c}_{k}.png", 100 * ci + k)
    else:
        raise ValueError(f"unknown nyud layout {layout!r}")
    return root


def make_llvip(root: Path, per_class: int = 2) -> Path:
    """``{train,val}/{background,person}/NNNNNN.jpg`` grey infrared crops."""
    root = Path(root)
    n = 10000
    for split in ("train", "val"):
        for c in ("background", "person"):
            for _ in range(per_class):
                n += 1
                write_image(root / split / c / f"{n:06d}.jpg", n, 36, 44, mode="L")
    return root


def make_ncaltech101(
    root: Path,
    classes: Sequence[str] = ("accordion", "sea_horse", "BACKGROUND_Google"),
    per_class: int = 3,
) -> Path:
    """``N_Caltech101/<class>/image_XXXX.bin`` + EventBind's tab-separated
    ``Caltech101_{train,val}.txt`` lists (the last file of each class is val)."""
    root = Path(root)
    lines: dict[str, list[str]] = {"train": [], "val": []}
    for ci, c in enumerate(classes):
        for k in range(per_class):
            name = f"image_{k + 1:04d}.bin"
            write_bin_events(root / "N_Caltech101" / c / name, events(100 * ci + k))
            split = "val" if k == per_class - 1 else "train"
            lines[split].append(f"N_Caltech101/{c}/{name}\tCaltech101/{c}/{name[:-4]}.jpg")
    for s, ls in lines.items():
        (root / f"Caltech101_{s}.txt").write_text("".join(f"{x}\n" for x in ls))
    return root


def make_nimagenet(root: Path, wnids: Sequence[str] = DEFAULT_WNIDS[:2], per_class: int = 2):
    """``extracted_{train,val}/<wnid>/*.npz`` (``event_data``) + ``val_list.txt``."""
    root = Path(root)
    listed = []
    for split in ("train", "val"):
        for wi, w in enumerate(wnids):
            for k in range(per_class):
                p = root / f"extracted_{split}" / w / f"{w}_{k}.npz"
                write_npz_events(p, events(10 * wi + k, h=480, w=640))
                if split == "val":
                    listed.append(str(p.resolve()))
    (root / "val_list.txt").write_text("".join(f"{x}\n" for x in reversed(listed)))
    return root


def make_paired(root: Path, fmt: str = "csv", n: int = 8, split_column: bool = True) -> Path:
    """A manifest (``manifest.csv`` / ``.jsonl``) of ``n`` instances with an image, a wav and a
    point cloud each, labels ``cat``/``dog``, ids 100.., every fourth row ``test``."""
    root = Path(root)
    rows = []
    for k in range(n):
        i = 100 + k
        write_image(root / "img" / f"{i}.png", i, 24, 24)
        write_wav(root / "wav" / f"{i}.wav", i, 0.25, 16000)
        (root / "pts").mkdir(parents=True, exist_ok=True)
        np.save(root / "pts" / f"{i}.npy", cloud(i, 50, normals=False))
        row = {"id": i, "label": ("cat", "dog")[k % 2], "image": f"img/{i}.png",
               "audio": f"wav/{i}.wav", "point": f"pts/{i}.npy"}  # fmt: skip
        if split_column:
            row["split"] = "test" if k % 4 == 3 else "train"
        rows.append(row)
    if fmt == "csv":
        path = root / "manifest.csv"
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    else:
        path = root / "manifest.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


__all__ = [
    "cloud",
    "events",
    "image_array",
    "make_esc50",
    "make_imagenet",
    "make_llvip",
    "make_modelnet40_h5",
    "make_modelnet40_txt",
    "make_msrvtt",
    "make_ncaltech101",
    "make_nimagenet",
    "make_nyud",
    "make_paired",
    "write_bin_events",
    "write_depth_png",
    "write_image",
    "write_npz_events",
    "write_video",
    "write_wav",
]
