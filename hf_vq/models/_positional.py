"""vqp-style positional constructor arguments for hf_vq models.

vector-quantize-pytorch constructors take their leading hyper-parameters positionally (`SimVQ(dim, codebook_size)`);
a `QuantizerModel` takes a config or keyword arguments. `bind_positional` maps positional values to the names
of the reference's signature, in its order, so both spellings build the same model.
"""

from __future__ import annotations

from typing import Any, Sequence


def bind_positional(owner: str, names: Sequence[str], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with `args` bound to `names` in order; a `TypeError` for too many values or a name given twice."""
    if len(args) > len(names):
        raise TypeError(f"{owner} takes at most {len(names)} positional arguments ({', '.join(names)}), "
                        f"got {len(args)}")
    bound = dict(kwargs)
    for name, value in zip(names, args):
        if name in bound:
            raise TypeError(f"{owner} got multiple values for argument {name!r}")
        bound[name] = value
    return bound


def split_config_arg(config_class: type, args: tuple) -> tuple[Any, tuple]:
    """`(config, rest)` when the first positional argument is a config (the Hugging Face spelling), else
    `(None, args)`."""
    if args and isinstance(args[0], config_class):
        return args[0], args[1:]
    return None, args
