"""Class names and prompt templates of the standard benchmarks (DATA.md §2.8), shipped in
``advcal/data/assets/`` so nothing is fetched at run time.

- ImageNet: the 1000 wnids in **sorted** order (= class index, the ``ImageFolder`` and
  RobustBench convention) with their WordNet lemmas (UniBind's label strings), and open_clip's
  ``IMAGENET_CLASSNAMES`` (same order); OpenAI's 80 prompt templates and the 7 "simple" ones.
- ESC-50: the 50 categories in ``meta/esc50.csv`` ``target`` order (DATA.md §2.2).
- MSR-VTT: the 20 video categories in category-id order (DATA.md §2.4, community list).
- NYU-D: LanguageBind's 10 scene classes; LLVIP: ``background``/``people`` (LanguageBind) or
  ``background``/``person`` (UniBind); ModelNet40: Point-Bind's 64 templates.
- LanguageBind's depth templates: the 80 OpenAI templates with "photo" -> "depth photo"
  (``d_cls/zero_shot_metadata.py``); its audio template ``"a sound of {}."``.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

ESC50_TARGETS = (
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow",
    "rain", "sea_waves", "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind",
    "pouring_water", "toilet_flush", "thunderstorm",
    "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing_teeth", "snoring", "drinking_sipping",
    "door_wood_knock", "mouse_click", "keyboard_typing", "door_wood_creaks", "can_opening",
    "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick", "glass_breaking",
    "helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells", "airplane",
    "fireworks", "hand_saw",
)  # fmt: skip
MSRVTT_CATEGORIES = (
    "music", "people", "gaming", "sports/actions", "news/events/politics", "education",
    "tv shows", "movie/comedy", "animation", "vehicles/autos", "howto", "travel",
    "science/technology", "animals/pets", "kids/family", "documentary", "food/drink", "cooking",
    "beauty/fashion", "advertisement",
)  # fmt: skip
NYUV2_CLASSES = (
    "bathroom", "bedroom", "bookstore", "classroom", "dining room", "home office", "kitchen",
    "living room", "office", "others",
)  # fmt: skip
LLVIP_CLASSES = {"languagebind": ("background", "people"), "unibind": ("background", "person")}


def _asset(name: str) -> str:
    return resources.files("advcal.data").joinpath("assets", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _wnid_table() -> tuple[tuple[str, str], ...]:
    rows = tuple(tuple(s.split("\t", 1)) for s in _asset("imagenet_wnids.txt").splitlines())
    return rows  # type: ignore[return-value]


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K wnids, sorted: index = class index (n01440764 = 0)."""
    return tuple(w for w, _ in _wnid_table())


def imagenet_lemmas() -> tuple[str, ...]:
    """WordNet lemmas per class (``"tench, Tinca tinca"``), UniBind's label strings."""
    return tuple(lemma for _, lemma in _wnid_table())


@functools.lru_cache(maxsize=1)
def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's ``IMAGENET_CLASSNAMES`` (= the CLIP notebook's), in sorted-wnid order."""
    return tuple(_asset("imagenet_classnames.txt").splitlines())


@functools.lru_cache(maxsize=1)
def _templates() -> dict:
    return json.loads(_asset("templates.json"))


def templates(name: str) -> tuple[str, ...]:
    """A shipped template set: ``openai_imagenet`` (80), ``simple_imagenet`` (7),
    ``pointbind_modelnet40_64`` (64), ``languagebind_audio`` (1), ``languagebind_depth`` (80,
    derived from ``openai_imagenet`` by LanguageBind's "photo" -> "depth photo")."""
    if name == "languagebind_depth":
        return tuple(t.replace("photo", "depth photo") for t in templates("openai_imagenet"))
    t = _templates()
    if name not in t or name.startswith("_"):
        have = [*sorted(k for k in t if not k.startswith("_")), "languagebind_depth"]
        raise ValueError(f"unknown template set {name!r}; have {have}")
    return tuple(t[name])


__all__ = [
    "ESC50_TARGETS",
    "LLVIP_CLASSES",
    "MSRVTT_CATEGORIES",
    "NYUV2_CLASSES",
    "imagenet_classnames",
    "imagenet_lemmas",
    "imagenet_wnids",
    "templates",
]
