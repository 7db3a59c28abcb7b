"""Fast attribute reads of a config in forward passes.

transformers' `PretrainedConfig.__getattribute__` (attribute map, per-layer heterogeneity checks) costs a few
microseconds per read; a ResidualVQ forward reads its configs ~350 times, which on the GPU is more host time
than the kernels take. `fast_view` reads the config's instance dict directly and defers anything else
(methods, mapped names) to the config itself; properties run with the view as `self`, so their own reads are
fast too.
"""

from __future__ import annotations

import torch


class ConfigView:
    __slots__ = ("_fields", "_config")

    def __init__(self, config):
        object.__setattr__(self, "_fields", object.__getattribute__(config, "__dict__"))
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):  # only called for names that are not slots
        try:
            return self._fields[name]
        except KeyError:
            pass
        attr = getattr(type(self._config), name, None)
        if isinstance(attr, property):  # derived fields (`resolved_*`): their reads go through this view too
            return attr.fget(self)
        return getattr(self._config, name)

    def __setattr__(self, name, value):
        raise AttributeError("a ConfigView is read-only: set the attribute on the config")


def fast_view(config):
    """A read-only view of `config` for hot paths, or the config itself when it maps attribute names or
    torch.compile is tracing (dynamo reads configs itself, and traces no host time)."""
    if torch.compiler.is_compiling() or getattr(type(config), "attribute_map", None):
        return config
    return ConfigView(config)
