"""Every place hf_vq overrides a framework's internals, in one module, with the versions it was written against.

`FastModelOutput`: transformers' `ModelOutput` re-reads `dataclasses.fields()` on every attribute write and
re-checks its fields in `__post_init__`, which costs tens of microseconds of host time per output object (more
than a small quantizer's GPU step; benchmarks/RESULTS.md has the numbers). hf_vq's output fields are never a dict
or an iterator to unpack, so the mapping is the non-None fields in declaration order, which the dataclass
`__init__` writes through `__setattr__`: the same behaviour with a set lookup per write. Under torch.compile,
`ModelOutput`'s own methods (which dynamo knows how to trace) run instead.

`tests/test_contract.py` pins the transformers versions below and checks the behaviour against a plain
`ModelOutput`: a transformers release outside the range fails that test until the overrides are checked again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict

import torch
from transformers.utils import ModelOutput

TRANSFORMERS_VERSIONS = ((5, 17), (5, 25))  # the oldest and newest minor releases these overrides were checked with


class FastModelOutput(ModelOutput):
    """`ModelOutput` with a cheaper `__post_init__` / `__setattr__` (see the module docstring). Subclasses are
    `@dataclass`es as usual."""

    def __post_init__(self):
        if torch.compiler.is_compiling():
            super().__post_init__()

    def __setattr__(self, name, value):
        if torch.compiler.is_compiling():
            return super().__setattr__(name, value)
        if value is not None and name in _field_names(type(self)):
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))
