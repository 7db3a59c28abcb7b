"""Convert the quantizer of a CogVideo SAT (SwissArmyTransformer) checkpoint into a verified hf_vq repo.

    hf-vq convert SAT_DIR_OR_FILE [--config sat.yaml ...] --out DIR [--push-to-hub ORG/NAME] [--dtype ...]
    python conversion/convert_cogvideo_sat.py SAT_DIR_OR_FILE ...        (the same)

Steps: find the checkpoint (``latest`` -> ``<tag>/mp_rank_XX_model_states.pt``, or one file), load it with
``torch.load(weights_only=True)``, merge model-parallel ranks, take the quantizer's tensors (prefix
auto-detected or ``--prefix``), build the hf_vq model from the YAML's regularizer node (or infer it from the
tensors), verify it against an independent re-implementation of the source forward (``sgm_reference``), then
write ``config.json`` + ``model.safetensors`` + a model card into a temporary folder, reload it with
``AutoModel`` and compare, and only then rename it into place (and upload it with ``--push-to-hub``).
Nothing is written when any step fails.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# absolute imports: this file also runs as a script (`python conversion/convert_cogvideo_sat.py`); the
# installed package maps conversion/ to hf_vq.conversion
import hf_vq  # registers the quantizers with AutoModel
from hf_vq.conversion.output_folder import check_out_folder, make_readable, replace_folder, temp_sibling
from hf_vq.conversion.regularizers import (
    Regularizer,
    config_from_target,
    infer_from_state_dict,
    load_regularizer_weights,
)
from hf_vq.conversion.sat_io import (
    QUANTIZER_MODULE_NAMES,
    extract_submodule,
    find_prefix,
    find_regularizer_config,
    load_state_dict,
    resolve_checkpoint,
    sha256_of,
)
from hf_vq.conversion.sgm_reference import reference_call, reference_forward
from hf_vq.modeling_utils import build_quantizer

__all__ = ["ConversionError", "ConversionResult", "VerificationError", "convert", "main"]

CONVERTER = f"hf-vq {hf_vq.__version__} convert_cogvideo_sat"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A nearest-code pair closer than this (relative float64 distance gap) is a tie at float32 precision.
TIE_TOLERANCE = 1e-5


class ConversionError(ValueError):
    """A conversion failed; nothing was written."""


class VerificationError(ConversionError):
    """The converted model disagrees with the reference forward; the message is the report."""


@dataclass
class ConversionResult:
    """What :func:`convert` did (also printed as the summary)."""

    out: Path
    model: torch.nn.Module
    target: str
    prefix: str
    params: dict
    notes: list[str]
    sha256: dict[str, str]
    verification: dict
    dtype: torch.dtype
    files: dict[str, int] = field(default_factory=dict)
    url: str | None = None
    assumed: list[str] = field(default_factory=list)  # values the tensors cannot tell, each with its effect


# --------------------------------------------------------------------------------------------------
# Building the model


def _quantizer_spec(tensors: Mapping[str, torch.Tensor], config, node: str | None):
    """(regularizer, target, params, notes, assumed): from the YAML when given, else inferred from the tensors."""
    if config is not None:
        target, params = find_regularizer_config(config, node_path=node)
        reg, kwargs = config_from_target(target, params, tensors)
        return reg, target, kwargs, [], []
    reg, kwargs, notes, assumed = infer_from_state_dict(tensors)
    return reg, f"{reg.sources[0]}.{reg.name}", kwargs, notes, assumed


class _QuantizerKeys:
    """Key filter applied while loading: the keys under ``prefix``, or every key ``find_prefix`` could take
    for a quantizer's (a component named regularization / quantize / quantizer). Remembers the top-level key
    groups it saw, for the error when nothing matches."""

    def __init__(self, prefix: str | None):
        self.prefix, self.groups = prefix, set()

    def __call__(self, key: str) -> bool:
        self.groups.add(key.split(".")[0])
        if self.prefix is not None:
            return key.startswith(self.prefix)
        return not set(QUANTIZER_MODULE_NAMES).isdisjoint(key.split(".")[:-1])

    def nothing_found(self) -> ConversionError:
        what = f"no key starts with prefix {self.prefix!r}" if self.prefix is not None else (
            f"no quantizer found: no key has a component named {list(QUANTIZER_MODULE_NAMES)}")
        return ConversionError(f"{what}; top-level key groups: {sorted(self.groups)[:30]}. Pass the quantizer's "
                               "key prefix with --prefix ('' for a bare quantizer state dict); a quantizer without "
                               "tensors (FSQ with levels only) converts from --config alone.")


def _build(reg: Regularizer, kwargs: dict, tensors: Mapping[str, torch.Tensor]):
    """The hf_vq model, with the source's call convention: called without `return_dict` it returns what the
    source module returns (`return_dict=False`, kept in config.json); `return_dict=True` gives the ModelOutput."""
    try:
        model = build_quantizer(reg.name, {"return_dict": False, **kwargs})
    except (ValueError, TypeError) as e:
        raise ConversionError(f"cannot build hf_vq.{reg.name} from the regularizer params {kwargs}: {e}") from e
    try:
        load_regularizer_weights(model, tensors)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    return model.float().eval()


# --------------------------------------------------------------------------------------------------
# Verification


def _verification_input(model, tensors, generator: torch.Generator, batch: int = 8) -> torch.Tensor:
    """`batch` examples of the model's example shape; for codebook quantizers fed directly (no input
    projection), half the positions are codebook rows plus noise, so the search is tested near the codes."""
    x = torch.randn([batch, *model.example_input_shape()[1:]], generator=generator)
    codebook = next((tensors[k] for k in ("embedding.weight", "embedding.weight_v") if k in tensors), None)
    if codebook is not None and x.ndim == 4 and x.shape[1] == codebook.shape[1] and "proj_in.weight" not in tensors:
        codebook = codebook.float()
        scale = codebook.std().clamp_min(1e-6)
        x = x * scale
        tokens = x.movedim(1, -1).reshape(-1, codebook.shape[1])
        half = tokens.shape[0] // 2
        rows = torch.randint(codebook.shape[0], (half,), generator=generator)
        tokens[:half] = codebook[rows] + 0.1 * scale * torch.randn(half, codebook.shape[1], generator=generator)
        x = tokens.reshape(x.movedim(1, -1).shape).movedim(-1, 1).contiguous()
    return x


def _compare(out, ref, batch: int, max_index: int) -> tuple[dict, list[str]]:
    """Indices equal (but at float32 ties, and where the source class draws a random index: any index in range),
    outputs allclose. Returns (stats, problems)."""
    got = out.indices.reshape(-1).long()
    if got.numel() != ref.indices.numel():
        return {}, [f"batch {batch}: {got.numel()} indices, the reference has {ref.indices.numel()}"]
    problems = []
    drawn = ref.indices < 0  # sgm's remap with unknown_index="random"
    if not bool(((got[drawn] >= 0) & (got[drawn] < max_index)).all()):
        problems.append(f"batch {batch}: a randomly remapped index is outside [0, {max_index})")
    differ = (got != ref.indices) & ~drawn
    ties = differ & (ref.gap <= TIE_TOLERANCE) if ref.gap is not None else torch.zeros_like(differ)
    wrong = differ & ~ties
    if wrong.any():
        where = wrong.nonzero().flatten()[:5].tolist()
        pairs = ", ".join(f"#{i}: model {got[i].item()} vs reference {ref.indices[i].item()}" for i in where)
        problems.append(f"batch {batch}: {int(wrong.sum())} of {got.numel()} indices differ ({pairs})")
    quantized = out.quantized.float()
    max_diff = math.nan
    if quantized.shape != ref.output.shape:
        problems.append(f"batch {batch}: output shape {tuple(quantized.shape)} vs reference {tuple(ref.output.shape)}")
    elif not ties.any():  # at a true tie either code is right: the output check needs the same codes
        max_diff = (quantized - ref.output).abs().max().item()
        tol = 1e-5 * max(1.0, ref.output.abs().max().item())
        if not max_diff <= tol:
            problems.append(f"batch {batch}: outputs differ by up to {max_diff:.3g} (tolerance {tol:.3g})")
    return {"indices": got.numel(), "ties": int(ties.sum()), "max_abs_diff": max_diff}, problems


def _compare_call(model, reg: Regularizer, params: Mapping, tensors, x: torch.Tensor, seed: int,
                  exact: bool) -> list[str]:
    """Called as sgm code calls it (`q(x)`), the model returns what the source module returns: the same tuple
    and dict structure, keys, shapes and values (values unchecked where a float32 tie may pick either code)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        got = model(x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        want = reference_call(reg.name, params, tensors, x)
    return [f"called as {reg.name}(x): {p}" for p in compare_structure(got, want, "output", exact)]


def compare_structure(got, want, path: str, exact: bool = True) -> list[str]:
    """Differences between a return value and the reference's: tuples (length), dicts (keys), None, tensor
    shapes and (when `exact`) values; a -1 in a reference integer tensor is a random draw (any value)."""
    if isinstance(want, tuple):
        if not isinstance(got, tuple) or len(got) != len(want):
            shape = f"tuple of {len(got)}" if isinstance(got, tuple) else f"{type(got).__name__}, not a tuple"
            return [f"{path} is a {shape}; the source returns a tuple of {len(want)}"]
        return [p for i, (g, w) in enumerate(zip(got, want)) for p in compare_structure(g, w, f"{path}[{i}]", exact)]
    if isinstance(want, dict):
        if type(got) is not dict or list(got) != list(want):
            keys = list(got) if isinstance(got, dict) else type(got).__name__
            return [f"{path} has keys {keys}, the source's has {list(want)}"]
        return [p for k in want for p in compare_structure(got[k], want[k], f"{path}[{k!r}]", exact)]
    if want is None or got is None:
        return [] if got is want else [f"{path} is {_kind(got)}, the source returns {_kind(want)}"]
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        return [f"{path} is {_kind(got)}, the source returns {_kind(want)}"]
    if got.is_floating_point() != want.is_floating_point():
        return [f"{path} has dtype {got.dtype}, the source's has {want.dtype}"]
    if not exact:
        return []
    if not want.is_floating_point():
        known = want >= 0
        return [] if torch.equal(got.long()[known], want.long()[known]) else [f"{path}: values differ"]
    tol = 1e-5 * max(1.0, want.abs().max().item()) if want.numel() else 0.0
    return [] if torch.allclose(got.float(), want.float(), rtol=1e-4, atol=tol) else [f"{path}: values differ"]


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def verify(model, reg: Regularizer, params: Mapping, tensors: Mapping[str, torch.Tensor],
           batches: int = 4, seed: int = 0) -> dict:
    """Compare ``model`` with ``sgm_reference`` on ``batches`` random inputs (same RNG state for both, so
    Gumbel draws the same noise). Returns ``{"batches", "indices", "ties", "max_abs_diff"}``.

    Raises:
        VerificationError: any index differs (other than at a float32 tie) or an output is not allclose.
    """
    totals = {"batches": batches, "indices": 0, "ties": 0, "max_abs_diff": 0.0}
    problems: list[str] = []
    for b in range(batches):
        x = _verification_input(model, tensors, torch.Generator().manual_seed(seed + b))
        try:
            with torch.random.fork_rng(), torch.no_grad():
                torch.manual_seed(seed + b)
                out = model(x, return_dict=True)
            with torch.random.fork_rng():
                torch.manual_seed(seed + b)
                ref = reference_forward(reg.name, params, tensors, x)
        except (NotImplementedError, RuntimeError, ValueError, KeyError) as e:
            raise VerificationError(f"cannot verify hf_vq.{reg.name} on an input of shape {tuple(x.shape)}: "
                                    f"{type(e).__name__}: {e}; nothing was written") from e
        stats, found = _compare(out, ref, b, max_index=getattr(model, "re_embed", 2**62))
        problems += found
        if not found:
            problems += _compare_call(model, reg, params, tensors, x, seed + b, exact=not stats.get("ties"))
        totals["indices"] += stats.get("indices", 0)
        totals["ties"] += stats.get("ties", 0)
        if not math.isnan(stats.get("max_abs_diff", math.nan)):
            totals["max_abs_diff"] = max(totals["max_abs_diff"], stats["max_abs_diff"])
    if problems:
        raise VerificationError(
            f"verification failed: hf_vq.{reg.name} disagrees with the reference forward computed from the "
            "checkpoint tensors; nothing was written.\n  " + "\n  ".join(problems)
        )
    return totals


# --------------------------------------------------------------------------------------------------
# Writing


def _target_dtype(dtype: str, tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    if dtype == "auto":  # the checkpoint's own floating dtype (the most common one)
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _check_reload(folder: Path, model) -> None:
    """The folder must load with AutoModel into the same class with bit-identical tensors."""
    from transformers import AutoModel

    again = AutoModel.from_pretrained(folder)
    if type(again) is not type(model):
        raise ConversionError(f"reloading gave {type(again).__name__}, expected {type(model).__name__}")
    mine, theirs = model.state_dict(), again.state_dict()
    if set(mine) != set(theirs) or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise ConversionError("the written folder does not reload to the same tensors")


def _write_atomically(model, out: Path, source: dict, repo_id: str | None, overwrite: bool) -> dict[str, int]:
    """save_pretrained + card into a hidden temp folder next to ``out``, reload check, then move it into place
    (see :func:`~hf_vq.conversion.output_folder.replace_folder`). Returns ``{file name: size}``."""
    out = out.absolute()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, ".partial")
    try:
        _fill(model, tmp, source, repo_id or str(out))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        replace_folder(tmp, out)
        return files
    except OSError as e:
        raise ConversionError(f"writing {out} failed: {e}; nothing was written") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill(model, folder: Path, source: dict, repo_id: str) -> None:
    from hf_vq.hub import write_model_card

    model.save_pretrained(folder)
    write_model_card(model, folder, repo_id, source=source)
    _check_reload(folder, model)
    make_readable(folder)


def _check_out(out: Path, overwrite: bool) -> None:
    """Restore or clean what a killed run left next to ``out``; an existing ``out`` needs ``overwrite``."""
    try:
        check_out_folder(out, overwrite)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConversionError(str(e)) from None


def push_folder(folder: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a converted folder with huggingface_hub (honours ``HF_ENDPOINT`` and ``HF_TOKEN``)."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, exist_ok=True, private=private, token=token)
    upload_folder(repo_id=repo.repo_id, folder_path=str(folder), token=token,
                  commit_message=f"Convert SAT checkpoint with {CONVERTER}")
    return str(repo)


# --------------------------------------------------------------------------------------------------
# The conversion


def convert(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    config=None,
    prefix: str | None = None,
    node: str | None = None,
    dtype: str = "auto",
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    license: str = "other",
    progress: bool = True,
    split_rules: Mapping[str, tuple[int, int]] | None = None,
) -> ConversionResult:
    """Convert the quantizer in a SAT checkpoint into an hf_vq folder (see the module docstring).

    Args:
        checkpoint: a SAT save folder (with ``latest``), an iteration folder, or one checkpoint file.
        out: the folder to create (must not exist unless ``overwrite``).
        config: the sgm/SAT YAML (path, dict, or a list of them merged as SAT's ``--base``); None infers the
            quantizer from the tensors.
        prefix: the quantizer's key prefix (e.g. ``first_stage_model.regularization.``); auto-detected if None.
        node: which regularizer node of the config, when it has several.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``float16`` or ``bfloat16``.
        push_to_hub: a repo id to upload the folder to after it is written.
        split_rules: ``{key regex: (dim, stride)}`` for model-parallel tensors SAT's own rules do not cover.

    A quantizer without tensors (FSQ with ``levels`` only) converts from ``config`` alone. Without ``config``,
    every value the tensors cannot tell is named in ``ConversionResult.assumed`` (and the model card) with its
    effect. The converted model keeps the source's call convention (``return_dict=False``).

    Raises:
        ConversionError: anything that stops the conversion (bad checkpoint, config, keys, shapes, failed
            verification); nothing is written in that case.
    """
    out = Path(out)
    try:
        _check_out(out.absolute(), overwrite)
        files = resolve_checkpoint(checkpoint)
        prefix = prefix + "." if prefix and not prefix.endswith(".") else prefix
        select = _QuantizerKeys(prefix)
        state = load_state_dict(checkpoint, progress=progress, allow_non_tensor=True, select=select,
                                split_rules=split_rules)
        if state:
            found_prefix = find_prefix(state) if prefix is None else prefix
            tensors = extract_submodule(state, found_prefix)
        elif config is not None:  # maybe a quantizer without tensors: the config alone builds it
            found_prefix, tensors = "", {}
        else:
            raise select.nothing_found()
        reg, target, params, notes, assumed = _quantizer_spec(tensors, config, node)
        target_dtype = _target_dtype(dtype, tensors)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(str(e)) from e
    model = _build(reg, params, tensors)
    if not tensors and model.state_dict():
        raise select.nothing_found()
    verification = verify(model, reg, params, tensors)
    model = model.to(target_dtype)
    digests = sha256_of(files, progress=progress)
    source = {
        "origin": f"the SAT checkpoint ({len(files)} model-parallel rank{'s' if len(files) > 1 else ''})"
                  if files[0].name.endswith("_model_states.pt") else "the checkpoint file",
        "source_checkpoint": str(Path(checkpoint).name),
        "target": target,
        "prefix": found_prefix,
        "converter": CONVERTER,
        "verification": f"{verification['batches']} random batches ({verification['indices']} code indices)",
        "notes": notes,
        "assumed": assumed,
        "sha256": digests,
        "license": license,
    }
    written = _write_atomically(model, out, source, push_to_hub, overwrite)
    result = ConversionResult(out=out, model=model, target=target, prefix=found_prefix, params=params,
                              notes=notes, sha256=digests, verification=verification, dtype=target_dtype,
                              files=written, assumed=assumed)
    if push_to_hub:
        try:
            result.url = push_folder(out, push_to_hub, private=private)
        except Exception as e:  # huggingface_hub raises HTTP, connection and validation errors
            raise ConversionError(f"{out} was written, but pushing it to {push_to_hub} failed: {e}") from e
    return result


def summary(result: ConversionResult) -> str:
    """Human-readable report printed at the end of a conversion."""
    m = result.model
    v = result.verification
    lines = [
        f"Converted {result.target} -> hf_vq.{type(m).__name__} ({sum(t.numel() for t in m.state_dict().values())} values, {result.dtype})",
        f"  tensors under:  {_prefix_text(result)}",
        f"  config:         {result.params}",
        *[f"  inferred:       {n}" for n in result.notes],
        *[f"  assumed:        {a}" for a in result.assumed],
        f"  verified:       {v['batches']} batches, {v['indices']} indices identical"
        + (f" ({v['ties']} float32 ties)" if v["ties"] else "") + f", max |output diff| {v['max_abs_diff']:.2g}",
        *[f"  sha256:         {name} {digest}" for name, digest in result.sha256.items()],
        f"  wrote:          {result.out}/ ({', '.join(f'{n} {s} B' for n, s in result.files.items())})",
    ]
    if result.url:
        lines.append(f"  pushed:         {result.url}")
    return "\n".join(lines)


def _prefix_text(result: ConversionResult) -> str:
    if not result.model.state_dict():
        return "(none: the quantizer has no tensors; built from its config alone)"
    return result.prefix or "(no prefix)"


def _split_rule(text: str) -> tuple[str, tuple[int, int]]:
    """``REGEX=DIM[,STRIDE]`` -> ``(regex, (dim, stride))``."""
    regex, sep, spec = text.rpartition("=")
    parts = spec.split(",")
    if not sep or not regex or len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected REGEX=DIM or REGEX=DIM,STRIDE, got {text!r}")
    return regex, (int(parts[0]), int(parts[1]) if len(parts) == 2 else 1)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="convert_cogvideo_sat", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="SAT save folder (with `latest`), iteration folder, or checkpoint file")
    parser.add_argument("--config", nargs="+", help="sgm/SAT YAML(s) holding the regularizer config (merged in "
                        "order, as SAT's --base); without it the quantizer is inferred from the tensors")
    parser.add_argument("--out", required=True, help="output folder (created; must not exist)")
    parser.add_argument("--prefix", help="key prefix of the quantizer (default: auto-detected)")
    parser.add_argument("--node", help="dotted path of the regularizer node when the config has several")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the folder (uses HF_ENDPOINT / HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--license", default="other", help="license field of the model card (default: other)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--split-rule", action="append", type=_split_rule, metavar="REGEX=DIM[,STRIDE]",
                        help="how SAT split a model-parallel tensor its own rules do not cover (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        with _quiet(args.quiet):
            result = convert(args.checkpoint, args.out, config=args.config, prefix=args.prefix, node=args.node,
                             dtype=args.dtype, push_to_hub=args.push_to_hub, private=args.private,
                             overwrite=args.overwrite, license=args.license, progress=not args.quiet,
                             split_rules=dict(args.split_rule or []))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


@contextlib.contextmanager
def _quiet(quiet: bool):
    """Silence transformers' and huggingface_hub's own progress bars (save, reload, upload) too."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_was_on, tf_was_on = not are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    if quiet:
        disable_progress_bars()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and hub_was_on:
            enable_progress_bars()
        if quiet and tf_was_on:
            transformers_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
