"""What every file-backed source shares: the open arguments, typed options, class-folder
scanning, subset/first selection, fingerprints, and the one :class:`FileSource` that decodes
and transforms an item when it is read (never at open)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advcal.data.decode import DecodeError, MissingDecoder, decoder_for, require_for
from advcal.data.protocol import DatasetInfo, SampleSource, fingerprint
from advcal.data.transforms import generic_transforms


class DataSourceError(ValueError):
    """A data source cannot be opened as asked (layout, split, option); says what to fix."""


@dataclass(frozen=True)
class OpenArgs:
    """The arguments every source takes (see :func:`advcal.data.open`)."""

    spec: str
    scheme: str
    path: Path
    split: str
    transforms: Mapping[str, Callable] | None = None
    modalities: tuple[str, ...] | None = None
    first: int | None = None
    subset: Path | None = None
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if not self.split:
            raise DataSourceError(f"{self.spec}: split must be a non-empty name")
        if self.first is not None and (isinstance(self.first, bool) or self.first < 1):
            raise DataSourceError(f"first must be a positive int, got {self.first!r}")
        if self.subset is not None and not Path(self.subset).is_file():
            raise DataSourceError(f"subset file {self.subset} does not exist")


# ---------------------------------------------------------------------------------- options


def parse_options(cls: type, options: Mapping[str, Any], scheme: str) -> Any:
    """Build the frozen options dataclass ``cls`` from keyword or ``?key=value`` strings:
    each value is converted to its field's type (int, float, bool, str, tuple of str or
    int); an unknown key names the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise DataSourceError(
            f"'{scheme}' takes no option {unknown}; its options: {sorted(fields) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in options.items():
        try:
            kwargs[k] = _coerce(v, hints[k])
        except (TypeError, ValueError) as err:
            raise DataSourceError(f"'{scheme}' option {k}={v!r}: {err}") from None
    return cls(**kwargs)


def _coerce(value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("", "none", "null"):
            return None
        return _coerce(value, args[0])
    if origin is tuple:
        return tuple(_coerce(v.strip(), args[0]) for v in value.split(",") if v.strip())
    if hint is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected a boolean (true/false)")
    if hint in (int, float):
        return hint(value)
    return value


# ---------------------------------------------------------------------------------- scanning


def list_files(root: Path, exts: Iterable[str]) -> list[Path]:
    """Files under ``root`` (recursively) whose extension is in ``exts``, sorted by path."""
    want = {e.lower() for e in exts}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [Path(dirpath, f) for f in sorted(filenames) if Path(f).suffix.lower() in want]
    return out


def class_folders(root: Path, exts: Iterable[str]) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder convention: one sub-folder per class, class index = position in the
    **sorted** folder names; files of the wanted extensions anywhere below each class
    folder, sorted. Empty class folders keep their index (a class with no file in this
    split is still a class)."""
    if not root.is_dir():
        raise DataSourceError(f"{root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataSourceError(f"{root} has no class sub-folders (expected {root}/<class>/<files>)")
    items = [(p, c) for c, name in enumerate(classes) for p in list_files(root / name, exts)]
    if not items:
        raise DataSourceError(f"no {sorted(set(exts))} files in the class folders of {root}")
    return classes, items


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    try:
        return [s.strip() for s in path.read_text().splitlines() if s.strip()]
    except OSError as err:
        raise DataSourceError(f"cannot read {path}: {err}") from err


def need(path: Path, what: str) -> Path:
    """``path`` if it exists, else one error saying what the layout expects there."""
    if not path.exists():
        raise DataSourceError(f"{path} does not exist: {what}")
    return path


def pick_split_dir(root: Path, split: str, aliases: Mapping[str, Sequence[str]]) -> Path:
    """``root/<name>`` for the first existing name that ``split`` may be called on disk."""
    names = aliases.get(split, (split,))
    for n in names:
        if (root / n).is_dir():
            return root / n
    have = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    raise DataSourceError(
        f"{root} has no folder for split {split!r} (looked for {list(names)}; found {have})"
    )


# ---------------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One sample before decoding: what each modality reads (a path, or a reference a
    custom decoder understands), its label and instance id, and the key a subset file
    names it by."""

    refs: Mapping[str, Any]
    label: int
    id: int
    key: str


def select(items: list[Item], args: OpenArgs) -> tuple[list[Item], dict[str, Any]]:
    """Apply ``subset`` (a list file: one item key per line, taken **in list order**, the
    RobustBench convention) and then ``first`` (the first N of what is left)."""
    extra: dict[str, Any] = {}
    if args.subset is not None:
        wanted = read_lines(Path(args.subset))
        by_key = {it.key: it for it in items}
        by_name = {Path(it.key).name: it for it in items}
        out, missing = [], []
        for w in wanted:
            it = by_key.get(w) or by_key.get(w.replace("\\", "/")) or by_name.get(Path(w).name)
            (out.append(it) if it is not None else missing.append(w))
        if missing:
            raise DataSourceError(
                f"subset file {args.subset}: {len(missing)} of {len(wanted)} entries are not in "
                f"{args.spec} split {args.split!r}, e.g. {missing[:3]}"
            )
        items = out
        extra["subset"] = str(args.subset)
    if args.first is not None:
        if args.first > len(items):
            raise DataSourceError(
                f"first={args.first} but {args.spec} split {args.split!r} has {len(items)} items"
            )
        items = items[: args.first]
        extra["first"] = args.first
    if not items:
        raise DataSourceError(f"{args.spec} split {args.split!r} has no items")
    return items, extra


def file_stats(paths: Iterable[Path], root: Path) -> list[tuple[str, int, int]]:
    """``(path relative to root, size, mtime_ns)`` per file: what a fingerprint hashes, so a
    changed, added or removed file changes it and an unchanged tree does not."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            out.append((str(p), -1, -1))  # missing: build() reports it (or skip_bad skips it)
            continue
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.as_posix()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return out


# ------------------------------------------------------------------------------ the source


class FileSource(SampleSource):
    """Items decoded and transformed when read: ``_load(i)`` runs each modality's decoder on
    its reference and the modality's transform on the result. A file that fails raises one
    error naming it; with ``skip_bad`` the item is skipped and recorded instead (see
    :mod:`advcal.data.protocol` for how the count reaches a consumer)."""

    def __init__(
        self,
        info: DatasetInfo,
        items: Sequence[Item],
        transforms: Mapping[str, Callable],
        decoders: Mapping[str, Callable],
        skip_bad: bool = False,
    ) -> None:
        self.info = info
        self.labels = torch.tensor([it.label for it in items], dtype=torch.int64)
        self.ids = torch.tensor([it.id for it in items], dtype=torch.int64)
        self.refs = [dict(it.refs) for it in items]
        self.keys = [it.key for it in items]
        self.transforms = dict(transforms)
        self.decoders = dict(decoders)
        self.skip_bad = bool(skip_bad)

    def _load(self, i: int) -> dict[str, torch.Tensor] | None:
        out = {}
        for m in self.info.modalities:
            ref = self.refs[i][m]
            try:
                x = self.transforms[m](self.decoders[m](ref))
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"the {m} transform returned {type(x).__name__}")
            except MissingDecoder:
                raise
            except Exception as err:
                where = ref if isinstance(ref, (str, Path)) else f"{self.keys[i]} ({ref})"
                msg = str(err) if isinstance(err, DecodeError) else f"{where}: {err}"
                if not self.skip_bad:
                    raise DecodeError(
                        f"{msg} [item {i} of {self.info.source} split {self.info.split!r}; fix "
                        "or remove the file, or open with skip_bad=True (--skip-bad) to skip "
                        "and count it]"
                    ) from err
                self._record_skip(i, msg)
                return None
            out[m] = x
        return out


def build(
    args: OpenArgs,
    items: list[Item],
    *,
    name: str,
    modalities: Sequence[str],
    class_names: Sequence[str],
    templates: Sequence[str] = (),
    fingerprint_parts: Sequence[Any] = (),
    extra: Mapping[str, Any] | None = None,
    task: str = "classification",
    captions: Mapping[int, tuple[str, ...]] | None = None,
    decoders: Mapping[str, Callable] | None = None,
    root: Path | None = None,
) -> FileSource:
    """Select, check the decoders, fingerprint and wrap ``items`` as a :class:`FileSource`.

    ``modalities``: what the layout offers (``args.modalities`` picks among them);
    ``fingerprint_parts``: label/list files etc. beside the per-item file stats."""
    mods = tuple(args.modalities or modalities)
    bad = [m for m in mods if m not in modalities]
    if bad:
        raise DataSourceError(f"{args.spec} has no modality {bad}; it has {list(modalities)}")
    require_for(mods, args.scheme)
    items, sel = select(items, args)
    given = dict(args.transforms or {})
    generic = generic_transforms()
    transforms = {m: given.get(m) or generic[m] for m in mods}
    decs = {m: (decoders or {}).get(m) or decoder_for(m) for m in mods}
    paths = [Path(r) for it in items for m in mods if isinstance(r := it.refs[m], (str, Path))]
    root = root or args.path
    stats = file_stats(paths, root)
    missing = [rel for rel, size, _ in stats if size < 0]
    if missing and not args.skip_bad:
        raise DataSourceError(
            f"{args.spec} split {args.split!r}: {len(missing)} listed files do not exist, e.g. "
            f"{missing[:3]}; restore them, or open with skip_bad=True (--skip-bad) to skip and "
            "count them"
        )
    fp = fingerprint(args.scheme, args.split, sorted(mods), stats, list(fingerprint_parts), sel)
    info = DatasetInfo(
        name=f"{name}-{args.split}",
        source=args.spec,
        split=args.split,
        modalities=mods,
        class_names=tuple(class_names),
        templates=tuple(templates),
        fingerprint=fp,
        task=task,
        captions=dict(captions or {}),
        extra={
            **(extra or {}),
            **sel,
            "transforms": {m: repr(t) for m, t in transforms.items()},
            "skip_bad": args.skip_bad,
        },
    )
    return FileSource(info, items, transforms, decs, args.skip_bad)


__all__ = [
    "DataSourceError",
    "FileSource",
    "Item",
    "NoOptions",
    "OpenArgs",
    "build",
    "class_folders",
    "file_stats",
    "list_files",
    "need",
    "parse_options",
    "pick_split_dir",
    "read_lines",
    "select",
]


# a dataclass with no fields, for sources that take no options
@dataclass(frozen=True)
class NoOptions:
    pass
