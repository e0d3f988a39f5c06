"""CLIP byte-level BPE tokenizer (ImageBind, LanguageBind, UniBind text towers).

Our own implementation of the published scheme: text is cleaned (``ftfy`` when installed,
HTML unescape, whitespace collapse, lower-case), split by CLIP's pre-tokenisation pattern,
each piece's UTF-8 bytes are mapped to printable unicode characters, and BPE merges are applied
in rank order, the last symbol of a word carrying ``</w>``. Ids: 256 byte symbols, 256 byte
symbols + ``</w>``, one id per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
(49407) for the released 49408-entry vocabulary.

The vocabulary ``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's (MIT licence, see
``assets/LICENSE.clip_bpe_vocab.txt``), taken unchanged from the ``clip-anytorch`` 2.6.0 wheel
on PyPI.

Both ``regex`` and ``ftfy`` (the ``text`` extra) are optional. The pattern needs the Unicode
classes ``\\p{L}``/``\\p{N}``; without ``regex`` they are expanded into explicit ranges for the
stdlib ``re``. Without ``ftfy``, mojibake is not repaired, which changes nothing for clean text
(e.g. class-name prompts).
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
# Merges used by the released CLIP vocabulary: 49152 - 256 - 2 (ids 512 .. 49405).
_NUM_MERGES = 49152 - 256 - 2


def _char_class(prefix: str) -> str:
    """A stdlib-``re`` character class body listing every code point whose Unicode general
    category starts with ``prefix`` (``"L"`` letters, ``"N"`` numbers), as ranges."""
    import sys
    import unicodedata

    out: list[str] = []
    start = None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(cp - 1))
            out.append(a if start == cp - 1 else f"{a}-{b}")
            start = None
    return "".join(out)


@functools.lru_cache(maxsize=1)
def _compiled_pattern():
    """CLIP's pre-tokenisation pattern. With ``regex`` installed it is used as published; without
    it, ``\\p{L}``/``\\p{N}`` are spelled out as explicit ranges from ``unicodedata`` (same
    classes, stdlib ``re``; ~0.3 s once)."""
    try:
        import regex

        return regex.compile(_PATTERN, regex.IGNORECASE)
    except ImportError:
        letters, numbers = _char_class("L"), _char_class("N")
        pattern = _PATTERN.replace(r"\p{L}", letters).replace(r"\p{N}", numbers)
        return re.compile(pattern, re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character map: printable Latin-1 bytes map to themselves, the other
    68 bytes to code points 256, 257, ... (so BPE never sees whitespace/control chars).

    The dict's *order* defines the first 256 ids: the printable bytes in byte order, then the
    remapped ones.
    """
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in keep}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def _clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """CLIP BPE: ``encode(text) -> ids`` and ``__call__(texts) -> (N, context_length)`` int64.

    ``truncate="eot"`` (ImageBind, OpenAI CLIP): an over-long text keeps ``context_length - 1``
    tokens (sot included) and ends with eot. ``truncate="hard"`` (Point-Bind/UniBind's copy):
    cut at ``context_length``, eot possibly lost. Padding is 0.
    """

    def __init__(self, vocab_path: str | Path = VOCAB_PATH, context_length: int = 77) -> None:
        self.context_length = int(context_length)
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : _NUM_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self._pattern = _compiled_pattern()
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> str:
        """Merge one pre-token (already byte-mapped) into space-separated BPE symbols."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in itertools.pairwise(word)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self._cache[piece] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without sot/eot."""
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0,))
        raw = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: Literal["eot", "hard"] = "eot",
    ) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length if context_length is None else int(context_length)
        if truncate not in ("eot", "hard"):
            raise ValueError(f"truncate must be 'eot' or 'hard', got {truncate!r}")
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > n:
                ids = [*ids[: n - 1], self.eot_id] if truncate == "eot" else ids[:n]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> ClipTokenizer:
    """A shared tokenizer (the vocabulary takes ~0.5 s to parse)."""
    return ClipTokenizer(context_length=context_length)


def tokenize(
    texts: str | Sequence[str],
    context_length: int = 77,
    truncate: Literal["eot", "hard"] = "eot",
) -> torch.Tensor:
    """``(N, context_length)`` int64 CLIP token ids, sot ... eot, zero-padded."""
    return get_tokenizer(context_length)(texts, truncate=truncate)


__all__ = [
    "EOT",
    "SOT",
    "VOCAB_PATH",
    "ClipTokenizer",
    "bytes_to_unicode",
    "get_tokenizer",
    "tokenize",
]
