"""vqp-style positional arguments for hf_vq quantizers.

vqp 1.32 classes take some hyper-parameters positionally (`FSP([8, 5, 5, 5], 16)`, `BinaryMapper(8)`). A model
class lists those names in vqp's order in `vqp_positional`; its `__init__(*args, **kwargs)` passes them through
`bind_vqp_args`, which turns them into keyword arguments. A config instance as the first positional argument (what
transformers' `from_pretrained` passes) is kept as the config.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


def bind_vqp_args(cls_name: str, positional: tuple[str, ...], args: tuple, kwargs: dict[str, Any]):
    """`(config | None, kwargs)` from a constructor's `*args, **kwargs`, mapping positional args to
    `positional` names in order."""
    config = kwargs.pop("config", None)
    if args and isinstance(args[0], PretrainedConfig):
        if config is not None:
            raise TypeError(f"{cls_name} got two configs (positional and config=)")
        config, args = args[0], args[1:]
    if config is not None and args:
        raise TypeError(f"{cls_name}: pass either a config or vqp's positional arguments, not both")
    if len(args) > len(positional):
        raise TypeError(f"{cls_name} takes at most {len(positional)} positional argument(s) "
                        f"{list(positional)}, got {len(args)}")
    kwargs = dict(kwargs)
    for name, value in zip(positional, args):
        if name in kwargs:
            raise TypeError(f"{cls_name} got multiple values for argument {name!r}")
        kwargs[name] = value
    return config, kwargs
