"""Model cards for hf_vq quantizers, rendered on every `save_pretrained` / `push_to_hub`.

The template is `hf_vq/model_cards/quantizer.md` (also reachable as `model_cards/quantizer.md` at the repository
root), filled with huggingface_hub's `ModelCard` / `ModelCardData`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = Path(__file__).parent / "model_cards" / "quantizer.md"
MARKER = "<!-- hf-vq model card"

_SIZE_FIELDS = ("codebook_size", "n_e", "n_embed", "n_codes")
_DIM_FIELDS = ("dim", "e_dim", "input_dim", "num_hiddens", "embedding_dim")
_DETAIL_FIELDS = ("levels", "num_quantizers", "groups", "heads", "codebook_dim", "num_codebooks", "use_cosine_sim",
                  "decay", "beta", "legacy", "shared_codebook")


def _first(model, names):
    for name in names:
        value = getattr(model, name, None) if name == "codebook_size" else None
        value = value if value is not None else getattr(model.config, name, None)
        if value is not None:
            return value
    return "—"


def card_statistics(model) -> dict[str, str]:
    """Usage statistics from a trained EMA codebook (`cluster_size` buffers), when the model has them."""
    sizes = [b for n, b in model.named_buffers() if n.endswith("cluster_size") and b.numel() > 0]
    if not sizes or all(bool(torch.all(s == s.flatten()[0])) for s in sizes):
        return {}  # untrained (still at its initial value): nothing to report
    stats = {}
    for i, counts in enumerate(sizes):
        probs = counts.float().flatten() / counts.float().sum().clamp(min=1e-12)
        perplexity = torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum())
        label = "" if len(sizes) == 1 else f" (codebook {i})"
        stats[f"codes in use{label}"] = f"{int((counts > 1e-3).sum())} / {counts.numel()}"
        stats[f"usage perplexity{label}"] = f"{perplexity.item():.1f}"
    return stats


def render_model_card(model, repo_id: str | None = None, source: dict | None = None) -> ModelCard:
    """The card of `model`; `repo_id` (or a local folder) is what the usage snippet loads.

    `source` (from the SAT converter) adds a Conversion section and metadata: `origin`, `target`, `prefix`,
    `converter`, `verification` (a sentence), `notes` (list), `sha256` ({file: digest}), `license`,
    `source_checkpoint`.
    """
    config = model.config
    kind = type(model).__name__
    tags = ["vector-quantization", "hf-vq", kind.lower(), config.model_type]
    data = ModelCardData(
        library_name="hf-vq",
        tags=tags + (["cogvideo", "sat-conversion"] if source else []),
        pipeline_tag=None,
        license=(source or {}).get("license"),
    )
    if source:
        data.source_checkpoint = source["source_checkpoint"]
        data.source_sha256 = source["sha256"]
        data.converter = source["converter"]
    details = {name: getattr(config, name) for name in _DETAIL_FIELDS if getattr(config, name, None) is not None}
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=repo_id or kind,
        model_class=kind,
        model_type=config.model_type,
        codebook_size=_first(model, _SIZE_FIELDS),
        dim=_first(model, _DIM_FIELDS),
        details=details,
        statistics=card_statistics(model),
        repo_id=repo_id or kind,
        example_shape=tuple(model.example_input_shape()),
        source=source,
    )


# transformers' generic card (a folder saved by transformers itself may hold it): ours replaces it
_TRANSFORMERS_DEFAULT = "This model card has been automatically generated."


def _replaceable(text: str) -> bool:
    return MARKER in text or _TRANSFORMERS_DEFAULT in text


def write_model_card(model, folder: str | os.PathLike, repo_id: str | None = None, source: dict | None = None,
                     tags: list[str] | None = None) -> None:
    """Write hf_vq's README.md into `folder`, unless a README that neither hf_vq nor transformers generated is
    already there (a user's own card is kept). `tags` and the tags of a replaced card are added."""
    path = Path(folder) / "README.md"
    extra_tags = list(tags or [])
    if path.exists():
        text = path.read_text(errors="ignore")
        if not _replaceable(text):
            return
        extra_tags += [t for t in (ModelCard(text, ignore_metadata_errors=True).data.tags or []) if t != "transformers"]
    card = render_model_card(model, repo_id or str(folder), source=source)
    card.data.tags += [t for t in extra_tags if t not in card.data.tags]
    card.save(path)


def _hub_card_is_users(repo_id: str, revision: str | None, token) -> bool:
    """True when the repo already has a README.md that neither hf_vq nor transformers generated."""
    from huggingface_hub import file_exists, hf_hub_download

    if not file_exists(repo_id, "README.md", revision=revision, token=token):
        return False
    text = Path(hf_hub_download(repo_id, "README.md", revision=revision, token=token, force_download=True)).read_text(
        errors="ignore")
    return not _replaceable(text)


def push_model_to_hub(model, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                      private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False,
                      tags: list[str] | None = None, save_kwargs: dict | None = None):
    """`model.push_to_hub`: `save_pretrained` into a temporary folder, our card naming `repo_id` (with `tags`),
    then `create_repo` + `upload_folder` (public huggingface_hub API). A user's own card on the Hub is kept.
    Returns the upload's `CommitInfo`."""
    import tempfile

    from huggingface_hub import create_branch, create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **(save_kwargs or {}))
        card = Path(folder) / "README.md"
        card.unlink(missing_ok=True)  # rendered for the local folder: render it again for the repo
        if not _hub_card_is_users(repo_id, revision, token):
            write_model_card(model, folder, repo_id, tags=tags)
        return upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or
                             f"Upload {type(model).__name__}", commit_description=commit_description, token=token,
                             revision=revision, create_pr=create_pr)
