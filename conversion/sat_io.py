"""Reading SwissArmyTransformer (SAT) checkpoints: files, state dicts, the regularizer's tensors and config.

Pure helpers for the converter: no ``hf_vq`` model imports, nothing is executed from the checkpoint.

SAT layout (SwissArmyTransformer ``sat/training/model_io.py``)::

    <save>/latest                              # the tag: an iteration number, or "release"
    <save>/<tag>/mp_rank_00_model_states.pt    # one file per model-parallel rank
    <save>/<tag>/mp_rank_01_model_states.pt
    <save>/model_config.json

Each file is ``torch.save``'d by DeepSpeed's ``_save_checkpoint`` (``{"module": state_dict, "optimizer",
...}`` plus SAT's client state) or by SAT's inference-mode save (``{"module": state_dict}``); SAT's
``load_checkpoint`` reads only ``sd["module"]``.
DeepSpeed names ZeRO-3 model files ``zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt``; SAT's own
``get_checkpoint_name(zero=True)`` puts them in ``<tag>_zero_dp_rank_<dp>/``. Standalone VAE / taming
checkpoints (CogVideoX ``vae/3d-vae.pt``, Lightning ``.ckpt``) are ``{"state_dict": ...}`` files.

Model-parallel merge (SAT ``sat/mpu/layers.py``): ``VocabParallelEmbedding`` splits its weight along
dim 0; ``ColumnParallelLinear`` splits weight and bias along dim 0, *strided* when ``stride > 1`` (fused
QKV: ``query_key_value`` stride 3, cross-attention ``key_value`` stride 2: each rank holds
``[q_r; k_r; v_r]`` and the full tensor is ``[q_0; q_1; ...; k_0; k_1; ...]``); ``RowParallelLinear``
splits its weight along dim 1 and replicates its bias. Every other tensor (layer norms, and all of a
CogVideo VAE / regularizer) is replicated. See :func:`merge_model_parallel` for the rule applied here.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SAT_SPLIT_RULES",
    "extract_submodule",
    "find_prefix",
    "find_regularizer_config",
    "load_state_dict",
    "merge_model_parallel",
    "resolve_checkpoint",
    "safe_globals",
    "sha256_of",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_RANK_FILE = re.compile(r"^(?:zero_pp_rank_(?P<dp>\d+)_)?mp_rank_(?P<mp>\d+)_model_states\.pt$")
_Z3_FILE = re.compile(r"^z3_rank_\d+_model_states\.pt$")


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> list[Path]:
    """Return the files that make up one checkpoint, model-parallel rank files sorted by rank.

    Accepts a SAT save directory (holding ``latest``), an iteration folder (holding ``mp_rank_XX_model_states.pt``
    files), or a single ``.pt``/``.pth``/``.ckpt``/``.bin``/``.safetensors`` file.

    Raises:
        FileNotFoundError: the path, the folder named by ``latest``, or any rank file is missing.
        ValueError: ``latest`` is empty, the folder holds no rank files, or ranks have a gap.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES or path.suffix == ".safetensors":
            return [path]
        raise ValueError(
            f"{path}: not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)}, .safetensors)"
        )
    if _rank_files(path):
        return _sorted_ranks(path)
    tracker = path / "latest"
    if not tracker.is_file():
        raise FileNotFoundError(
            f"{path} is neither a SAT save directory (no 'latest' file) nor an iteration folder "
            f"(no mp_rank_XX_model_states.pt files); contents: {sorted(p.name for p in path.iterdir())[:20]}"
        )
    tag = tracker.read_text().strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise ValueError(f"{tracker}: expected an iteration number or 'release', found {tag!r}")
    folder = path / tag
    if not folder.is_dir() and (path / f"{tag}_zero_dp_rank_0").is_dir():
        folder = path / f"{tag}_zero_dp_rank_0"  # SAT get_checkpoint_name(zero=True)
    if not folder.is_dir():
        raise FileNotFoundError(f"{tracker} names iteration {tag!r} but the folder {folder} does not exist")
    return _sorted_ranks(folder)


def _rank_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and _RANK_FILE.match(p.name)]


def _sorted_ranks(folder: Path) -> list[Path]:
    files = _rank_files(folder)
    if not files:
        if any(_Z3_FILE.match(p.name) for p in folder.iterdir()):
            raise ValueError(
                f"{folder} holds SAT ZeRO-3 shards (z3_rank_XX_model_states.pt), whose tensors are flat "
                "data-parallel partitions; gather them with SAT/DeepSpeed into a full checkpoint first"
            )
        raise ValueError(f"{folder}: no mp_rank_XX_model_states.pt files")
    by_mp: dict[int, Path] = {}
    for f in files:
        m = _RANK_FILE.match(f.name)
        mp, dp = int(m["mp"]), int(m["dp"] or 0)
        # Plain mp_rank files win; among ZeRO files (one per data-parallel rank) take dp rank 0.
        if m["dp"] is None or (dp == 0 and mp not in by_mp):
            by_mp[mp] = f
    if not by_mp:
        raise FileNotFoundError(f"{folder}: no data-parallel rank 0 file (zero_pp_rank_0_mp_rank_XX_model_states.pt)")
    ranks = sorted(by_mp)
    missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
    if missing:
        raise FileNotFoundError(
            f"{folder}: model-parallel rank file(s) missing for rank(s) {missing} "
            f"(found ranks {ranks}); every rank's mp_rank_XX_model_states.pt is needed to merge"
        )
    return [by_mp[r] for r in ranks]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _numpy_globals() -> list[Any]:
    """The numpy globals a pickled ``np.random.get_state()`` (SAT's ``np_rng_state``) needs."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        return []
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    out: list[Any] = [np.ndarray, np.dtype]
    # Pickles written by numpy 1.x name numpy.core.*, by numpy 2.x numpy._core.*: allow both spellings.
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [type(np.dtype(t)) for t in ("uint8", "uint32", "int32", "int64", "float32", "float64", "bool")]
    return out


def safe_globals() -> list[Any]:
    """The globals allowed beyond torch's own weights-only set: the harmless ones SAT checkpoints hold.

    ``argparse.Namespace`` (SAT/Megatron ``args``) and numpy's array reconstruction (the pickled
    ``np_rng_state``). DeepSpeed's own classes are not importable here and are refused.
    """
    return [argparse.Namespace, *_numpy_globals()]


def _torch_load(file: Path) -> Any:
    try:
        with torch.serialization.safe_globals(safe_globals()):
            # mmap: tensors that are not selected are never read (a SAT file holds the whole transformer);
            # torch's legacy (non-zip) format cannot be mapped and is read whole
            mmap = zipfile.is_zipfile(file)
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) and "Unsupported global" not in str(e):
            raise ValueError(f"{file}: corrupt or truncated checkpoint ({e})") from e
        if "Unsupported operand" in str(e):  # not a pickle opcode at all: garbage, not a refused global
            raise ValueError(f"{file}: corrupt or truncated checkpoint (not a valid pickle stream)") from None
        names = _refused_globals(file, e)
        if any(_is_missing_attribute(n) for n in names):  # a cut-off name: the pickle stream is damaged
            raise ValueError(f"{file}: corrupt or truncated checkpoint (unknown global {names})") from None
        raise ValueError(
            f"{file}: refused to load: the checkpoint pickles global(s) {', '.join(names)} outside the "
            "allowlist. Only tensors, plain containers and the allowlisted globals (argparse.Namespace, "
            "numpy arrays and scalars) are loaded, and nothing in the file is executed. If you trust the "
            "file, re-save its state dict with plain tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{file}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e


def _global_name(g: Any) -> str:
    if isinstance(g, tuple):
        return g[1]
    return f"{g.__module__}.{g.__qualname__}"


def _refused_globals(file: Path, err: Exception) -> list[str]:
    allowed = {_global_name(g) for g in safe_globals()}
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(file) if n not in allowed]
    except Exception:  # legacy (non-zip) format: fall back to the name in torch's message
        names = []
    return sorted(set(names or re.findall(r"GLOBAL ([\w.]+)", str(err)) or ["<unknown>"]))


def _is_missing_attribute(name: str) -> bool:
    """True when ``name``'s module is already imported but lacks the attribute (nothing is imported)."""
    import sys

    module, _, attr = name.rpartition(".")
    return module in sys.modules and not hasattr(sys.modules[module], attr)


def _pick_state_dict(obj: Any, file: Path) -> dict[str, Any]:
    """The model state dict inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file}: expected a dict, found {type(obj).__name__}")
    for key in ("module", "model", "state_dict"):
        if key in obj:
            sd = obj[key]
            if sd is None and key == "module":
                raise ValueError(
                    f"{file}: 'module' is None, as DeepSpeed saves it under ZeRO-3 without gathered "
                    "16-bit weights; recover the weights with DeepSpeed's zero_to_fp32.py first"
                )
            if isinstance(sd, Mapping):
                return dict(sd)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError(
        f"{file}: no state dict found: expected a 'module', 'model' or 'state_dict' entry (SAT/DeepSpeed "
        f"use 'module') or a dict of tensors; top-level keys: {sorted(map(str, obj))[:20]}"
    )


def _load_file(file: Path) -> dict[str, Any]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except Exception as e:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    return _pick_state_dict(_torch_load(file), file)


def load_state_dict(
    path: str | Path,
    progress: bool = True,
    allow_non_tensor: bool = False,
    split_rules: Mapping[str, tuple[int, int]] | None = None,
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's model state dict on the CPU, merging model-parallel ranks.

    Args:
        path: anything :func:`resolve_checkpoint` accepts.
        progress: show a tqdm bar over the files.
        allow_non_tensor: drop non-tensor entries (e.g. ``_extra_state``) with a warning instead of
            raising.
        split_rules: extra ``{key regex: (dim, stride)}`` rules for :func:`merge_model_parallel`.
        select: keep only the keys for which it returns True, before merging (the converter keeps the
            quantizer's keys, so a multi-GB transformer is neither read from its memory map nor merged).

    Every file goes through ``torch.load(weights_only=True)`` with only :func:`safe_globals` allowed.

    Raises:
        ValueError: a file is corrupt/truncated, pickles a global outside the allowlist, holds no state
            dict, holds non-tensor entries (unless ``allow_non_tensor``), or the ranks cannot be merged.
    """
    from tqdm.auto import tqdm

    files = resolve_checkpoint(path)
    shards = []
    for f in tqdm(files, desc="Loading checkpoint", unit="file", disable=not progress):
        sd = _load_file(f)
        if select is not None:
            sd = {k: v for k, v in sd.items() if select(k)}
        if f.name.startswith("zero_pp_rank_") and any(
            isinstance(v, torch.Tensor) and v.numel() == 0 for v in sd.values()
        ):
            raise ValueError(
                f"{f}: ZeRO-3 model states hold empty parameter placeholders; recover the weights with "
                "DeepSpeed's zero_to_fp32.py first"
            )
        bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
        if bad:
            if not allow_non_tensor:
                raise ValueError(
                    f"{f}: state dict entries that are not tensors: {bad[:10]}"
                    f"{' ...' if len(bad) > 10 else ''} (pass allow_non_tensor=True to drop them)"
                )
            warnings.warn(f"{f}: dropping non-tensor state dict entries {bad[:10]}", stacklevel=2)
            sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        shards.append(sd)
    return merge_model_parallel(shards, split_rules=split_rules)


# --------------------------------------------------------------------------------------------------
# Model-parallel merge
# --------------------------------------------------------------------------------------------------

# {key regex: (dim, stride)} for SAT's parallel layers, by the attribute names SAT's BaseTransformer uses
# (sat/model/transformer.py). Row-parallel biases are replicated, so they need no rule.
SAT_SPLIT_RULES: dict[str, tuple[int, int]] = {
    r"(^|\.)word_embeddings\.weight$": (0, 1),  # VocabParallelEmbedding
    r"(^|\.)query_key_value\.(weight|bias)$": (0, 3),  # ColumnParallelLinear(stride=3)
    r"(^|\.)key_value\.(weight|bias)$": (0, 2),  # cross-attention ColumnParallelLinear(stride=2)
    r"(^|\.)query\.(weight|bias)$": (0, 1),
    r"(^|\.)dense_h_to_4h(_gate)?(_\d+)?\.(weight|bias)$": (0, 1),
    r"(^|\.)lm_head\.(weight|bias)$": (0, 1),
    r"(^|\.)dense\.weight$": (1, 1),  # attention output RowParallelLinear
    r"(^|\.)dense_4h_to_h(_\d+)?\.weight$": (1, 1),  # RowParallelLinear
}


def _strided_cat(parts: Sequence[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of SAT's strided ColumnParallelLinear split (``ColumnParallelLinear.merge``)."""
    if stride == 1:
        return torch.cat(list(parts), dim)
    chunks = [p.chunk(stride, dim) for p in parts]
    return torch.cat([c[s] for s in range(stride) for c in chunks], dim)


def merge_model_parallel(
    shards: Sequence[Mapping[str, torch.Tensor]],
    split_rules: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the state dicts of SAT model-parallel ranks (rank order) into one.

    Rule, per key:

    1. identical on every rank (``torch.equal``): replicated, kept once;
    2. shapes differ across ranks in exactly one dim: concatenated along it;
    3. same shape, different values: a split SAT layer; the dim (and stride for fused QKV) comes from
       ``split_rules`` first, then :data:`SAT_SPLIT_RULES` (first regex that matches with ``re.search``);
       no rule matches -> ``ValueError``, since dim 0 and dim 1 splits cannot be told apart by shape.

    Raises:
        ValueError: ranks hold different keys, shapes differ in more than one dim, or no rule applies.
    """
    if len(shards) == 1:
        return dict(shards[0])
    keys = list(shards[0])
    for r, sd in enumerate(shards[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ValueError(f"model-parallel ranks 0 and {r} hold different keys: {diff[:10]}")
    rules = [*(split_rules or {}).items(), *SAT_SPLIT_RULES.items()]  # the caller's rules first
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [sd[key] for sd in shards]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) == 1:
            if all(torch.equal(parts[0], p) for p in parts[1:]):
                out[key] = parts[0]
                continue
            rule = next((v for pat, v in rules if re.search(pat, key)), None)
            if rule is None:
                raise ValueError(
                    f"{key!r} differs across model-parallel ranks but matches no split rule; say how SAT split it "
                    "with --split-rule 'REGEX=DIM[,STRIDE]' (split_rules={regex: (dim, stride)} in Python)"
                )
            dim, stride = rule
            if parts[0].dim() <= dim:
                raise ValueError(f"{key!r}: split dim {dim} out of range for shape {tuple(parts[0].shape)}")
            out[key] = _strided_cat(parts, dim, stride)
            continue
        ndims = {len(s) for s in shapes}
        differing = {d for d in range(max(ndims)) if len({s[d] for s in shapes}) > 1} if len(ndims) == 1 else None
        if not differing or len(differing) != 1:
            shapes_list = [tuple(p.shape) for p in parts]
            raise ValueError(f"{key!r}: shapes across model-parallel ranks cannot be merged: {shapes_list}")
        out[key] = torch.cat(parts, differing.pop())
    return out


# --------------------------------------------------------------------------------------------------
# The regularizer's tensors
# --------------------------------------------------------------------------------------------------

# Module attribute names a quantizer lives under: sgm AutoencodingEngine.regularization, taming / MoVQ
# VQModel.quantize, and the common "quantizer".
QUANTIZER_MODULE_NAMES = ("regularization", "quantize", "quantizer")


def find_prefix(state_dict: Mapping[str, Any], module_names: Iterable[str] = QUANTIZER_MODULE_NAMES) -> str:
    """Find the key prefix (ending in ``.``) of the quantizer inside a full state dict.

    A key's prefix runs up to and including its first dotted component named in ``module_names``:
    ``model.first_stage_model.regularization.embedding.weight`` -> ``model.first_stage_model.regularization.``.

    Raises:
        ValueError: no key matches (the message lists the top-level key groups), or several prefixes
            do (the message lists them; pass one explicitly).
    """
    names = set(module_names)
    found: dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in names:
                prefix = ".".join(parts[: i + 1]) + "."
                found[prefix] = found.get(prefix, 0) + 1
                break
    if not found:
        groups = sorted({k.split(".")[0] for k in state_dict})
        raise ValueError(
            f"no quantizer found: no key has a component named {sorted(names)}; top-level key groups: "
            f"{groups[:30]}. Pass the prefix explicitly."
        )
    if len(found) > 1:
        listing = ", ".join(f"{p!r} ({n} keys)" for p, n in sorted(found.items()))
        raise ValueError(f"several candidate quantizer prefixes: {listing}; pass the one to convert with --prefix "
                         "(prefix= in Python)")
    return next(iter(found))


def extract_submodule(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str | None = None,
    module_names: Iterable[str] = QUANTIZER_MODULE_NAMES,
) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (auto-detected by :func:`find_prefix` when None), prefix stripped.

    An explicit prefix may be given with or without the trailing dot; ``""`` returns everything.

    Raises:
        ValueError: auto-detection fails, or no key starts with the explicit prefix.
    """
    if prefix is None:
        prefix = find_prefix(state_dict, module_names)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        groups = sorted({k.split(".")[0] for k in state_dict})
        raise ValueError(f"no key starts with prefix {prefix!r}; top-level key groups: {groups[:30]}")
    return sub


# --------------------------------------------------------------------------------------------------
# The regularizer's config
# --------------------------------------------------------------------------------------------------

# Node names an sgm/SAT config gives a quantizer: sgm's AutoencodingEngine takes `regularizer_config`
# (CogVideo sat/configs/*.yaml: model.params.first_stage_config.params.regularizer_config, with `target:`
# and optional `params:`); the other two are accepted for hand-written configs.
REGULARIZER_KEYS = ("regularizer_config", "quantizer_config", "quantize_config")

# taming / MoVQ-style VQModel configs have no quantizer node: VQModel builds
# `self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap,
# sane_index_shape=sane_index_shape)` (GumbelVQ: GumbelQuantize(ddconfig.z_channels, embed_dim,
# n_embed=n_embed, kl_weight=kl_weight, temp_init=1.0, remap=remap)) from its own params.
_TAMING_VQ = "taming.modules.vqvae.quantize.VectorQuantizer2"
_TAMING_GUMBEL = "taming.modules.vqvae.quantize.GumbelQuantize"


def _load_config(cfg: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg
    if isinstance(cfg, (str, Path)):
        import yaml

        with open(cfg) as fh:
            try:
                return yaml.safe_load(fh)
            except yaml.YAMLError as e:
                raise ValueError(f"{cfg}: not valid YAML: {_yaml_problem(e)}") from None
    if isinstance(cfg, Sequence):  # several --base files, merged like OmegaConf.merge (later wins)
        merged: dict = {}
        for c in cfg:
            merged = _deep_merge(merged, _load_config(c) or {})
        return merged
    raise TypeError(f"expected a YAML path, a dict or a list of them, got {type(cfg).__name__}")


def _yaml_problem(e: Exception) -> str:
    """PyYAML's error as one line with a 1-based line and column."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _deep_merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
    return out


def _walk(node: Any, path: str = ""):
    if isinstance(node, Mapping):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _taming_quantizer(params: Mapping) -> tuple[str, dict]:
    return _TAMING_VQ, {
        "n_e": params["n_embed"],
        "e_dim": params["embed_dim"],
        "beta": 0.25,
        "remap": params.get("remap"),
        "sane_index_shape": params.get("sane_index_shape", False),
    }


def _taming_gumbel(params: Mapping) -> tuple[str, dict]:
    return _TAMING_GUMBEL, {
        "num_hiddens": params["ddconfig"]["z_channels"],
        "embedding_dim": params["embed_dim"],
        "n_embed": params["n_embed"],
        "kl_weight": params.get("kl_weight", 1e-8),
        "temp_init": 1.0,
        "remap": params.get("remap"),
    }


def find_regularizer_config(config: Any, node_path: str | None = None) -> tuple[str, dict]:
    """Find the quantizer in an sgm/SAT (or taming) YAML config: ``(target class path, params)``.

    Args:
        config: a YAML path, an already loaded dict, or a list of them (merged, later files win, as SAT's
            ``--base a.yaml b.yaml`` does).
        node_path: dotted path of the node to use when the config holds several (as listed in the error).

    Looks for ``regularizer_config`` / ``quantizer_config`` / ``quantize_config`` nodes with a
    ``target`` at any depth. When there are none, a taming/MoVQ ``VQModel``-style node (``params`` with
    ``n_embed`` and ``embed_dim``) gives the quantizer VQModel builds itself (``VectorQuantizer2``, or
    ``GumbelQuantize`` for a ``GumbelVQ`` target) with the arguments VQModel passes.

    Raises:
        ValueError: no quantizer node, several (listing their paths), or a node without ``target``.
    """
    root = _load_config(config)
    nodes: dict[str, tuple[str, dict]] = {}
    for path, node in _walk(root):
        for key in REGULARIZER_KEYS:
            sub = node.get(key)
            if isinstance(sub, Mapping):
                if "target" not in sub:
                    raise ValueError(f"{path + '.' if path else ''}{key} has no 'target'")
                nodes[f"{path}.{key}" if path else key] = (str(sub["target"]), dict(sub.get("params") or {}))
    if not nodes:
        for path, node in _walk(root):
            params = node.get("params")
            if "target" in node and isinstance(params, Mapping) and {"n_embed", "embed_dim"} <= set(params):
                gumbel = str(node["target"]).endswith("GumbelVQ")
                nodes[path] = _taming_gumbel(params) if gumbel else _taming_quantizer(params)
    if node_path is not None:
        if node_path not in nodes:
            raise ValueError(f"no quantizer config at {node_path!r}; found: {sorted(nodes) or 'none'}")
        return nodes[node_path]
    if not nodes:
        raise ValueError(
            f"no quantizer config found: no node named {', '.join(REGULARIZER_KEYS)} with a 'target', and no "
            "taming-style VQModel params (n_embed, embed_dim)"
        )
    if len(nodes) > 1:
        raise ValueError(f"several quantizer configs found: {sorted(nodes)}; choose one with --node "
                         "(node_path= in Python)")
    return next(iter(nodes.values()))


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


def sha256_of(
    paths: str | Path | Iterable[str | Path], chunk_size: int = 1 << 20, progress: bool = False
) -> dict[str, str]:
    """SHA-256 hex digest of each file, keyed by file name (for the model card); ``progress`` shows a byte bar.

    Raises:
        ValueError: two files share a name (their digests would collide in the mapping).
    """
    from tqdm.auto import tqdm

    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"two files share a name in {names}; hash them separately")
    out = {}
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, desc="Hashing checkpoint", unit="B", unit_scale=True, disable=not progress) as bar:
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while block := fh.read(chunk_size):
                    h.update(block)
                    bar.update(len(block))
            out[p.name] = h.hexdigest()
    return out
