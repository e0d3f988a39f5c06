"""``digits``: the embedded seven-modality dataset (:mod:`advcal.data.digits`), already a
:class:`~advcal.data.protocol.SampleSource` of model-layout tensors.

Splits ``train``/``test``/``all``; options ``seed`` and ``test_fraction`` (as
:func:`advcal.data.digits.digits`). Transforms are not applied (the tensors are the digits
layouts minibind takes); ``info.extra["transforms"]`` records that.
"""

from __future__ import annotations

from dataclasses import dataclass

from advcal.data.protocol import SampleSource
from advcal.data.sources._common import OpenArgs, parse_options
from advcal.data.sources.tensors import finish


@dataclass(frozen=True)
class DigitsOptions:
    seed: int = 0
    test_fraction: float = 0.25


def open_source(args: OpenArgs, **options) -> SampleSource:
    from advcal.data.digits import digits

    o = parse_options(DigitsOptions, options, "digits")
    ds = digits(args.split, modalities=args.modalities, seed=o.seed, test_fraction=o.test_fraction)
    return finish(ds, args, {"seed": o.seed, "test_fraction": o.test_fraction})
