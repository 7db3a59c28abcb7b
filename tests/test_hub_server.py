"""Push/pull with huggingface_hub's real client (and transformers) against the local Hub test double."""

import json
import os
from pathlib import Path

import pytest
import torch

from huggingface_hub import (
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from hub_server import hub_endpoint  # noqa: F401  (also in conftest; explicit so this file stands alone)
from safetensors.torch import save_file

REPO = "hf-vq-tester/tiny"


def _folder(root: Path, scale: float) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "tiny", "scale": scale}))
    save_file({"codebook": torch.arange(12.0).reshape(3, 4) * scale}, str(root / "model.safetensors"))
    (root / "README.md").write_text(f"---\nlicense: mit\n---\n# tiny ({scale})\n")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "extra.txt").write_text(f"extra {scale}")
    return root


def test_endpoint_is_local(hub_endpoint):
    assert hub_endpoint.url.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == hub_endpoint.url == HfApi().endpoint
    assert "huggingface.co" not in constants.HUGGINGFACE_CO_URL_TEMPLATE
    with pytest.raises(OSError, match="blocked"):
        import socket

        socket.getaddrinfo("huggingface.co", 443)


def test_upload_then_download_identical(hub_endpoint, tmp_path):
    url = create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub_endpoint.url)
    create_repo(REPO, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        create_repo(REPO)
    assert err.value.response.status_code == 409

    src = _folder(tmp_path / "src", 1.0)
    info = upload_folder(repo_id=REPO, folder_path=src, commit_message="weights")
    api = HfApi()
    assert api.model_info(REPO).sha == info.oid
    expected = [".gitattributes", "README.md", "config.json", "model.safetensors", "sub/extra.txt"]
    assert sorted(api.list_repo_files(REPO)) == expected

    files = ["config.json", "model.safetensors", "README.md", "sub/extra.txt"]
    for f in files:
        assert Path(hf_hub_download(REPO, f)).read_bytes() == (src / f).read_bytes()
    first_cache = constants.HF_HUB_CACHE
    n = len(hub_endpoint.state.requests)
    cache = hub_endpoint.fresh_cache()
    assert cache != first_cache and constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"] == cache
    assert os.listdir(cache) == []
    snap = Path(snapshot_download(REPO))
    assert snap.is_relative_to(cache) and len(hub_endpoint.state.requests) > n  # fetched again, not reused
    assert snap.name == info.oid
    for f in files:
        assert (snap / f).read_bytes() == (src / f).read_bytes()
    assert not any(m == "POST" and "/resolve/" in p for m, p in hub_endpoint.state.requests)

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.bin")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("hf-vq-tester/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("hf-vq-tester/nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")


def test_revisions(hub_endpoint, tmp_path):
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "v1", 1.0)).oid
    api.create_tag(REPO, tag="v1")
    api.create_branch(REPO, branch="stable")
    second = api.upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "v2", 2.0)).oid
    assert first != second and api.model_info(REPO).sha == second
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "config.json").write_text('{"on": "branch"}')
    on_branch = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "v3", revision="stable").oid
    api.delete_file("sub/extra.txt", REPO)

    def config(rev=None):
        return Path(hf_hub_download(REPO, "config.json", revision=rev)).read_text()

    assert json.loads(config())["scale"] == 2.0
    assert json.loads(config(first))["scale"] == 1.0
    assert json.loads(config("v1"))["scale"] == 1.0
    assert json.loads(config("stable")) == {"on": "branch"}
    assert api.model_info(REPO, revision="stable").sha == on_branch
    assert Path(snapshot_download(REPO, revision="v1"), "sub/extra.txt").read_text() == "extra 1.0"
    assert not Path(snapshot_download(REPO), "sub/extra.txt").exists()
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "stable"} and [t.name for t in refs.tags] == ["v1"]


def test_tokens(hub_endpoint, tmp_path):
    with pytest.raises(HfHubHTTPError) as err:
        create_repo(REPO, token="hf_wrong")
    assert err.value.response.status_code == 401
    create_repo(REPO)
    create_repo("hf-vq-tester/secret", private=True)
    with pytest.raises(HfHubHTTPError) as err:
        upload_folder(repo_id=REPO, folder_path=_folder(tmp_path / "src", 1.0), token="hf_wrong")
    assert err.value.response.status_code == 401
    # Public repos read without a token, private ones look missing without it.
    assert HfApi(token=False).model_info(REPO).sha
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("hf-vq-tester/secret")
    assert HfApi().model_info("hf-vq-tester/secret").private
    # A wrong token is refused on reads too (401), even for a public repo: no silent anonymous fallback.
    for read in (lambda: hf_hub_download(REPO, ".gitattributes", token="hf_wrong"),
                 lambda: snapshot_download(REPO, token="hf_wrong")):
        with pytest.raises(HfHubHTTPError) as err:
            read()
        assert err.value.response.status_code == 401


def test_offline_after_download(hub_endpoint, monkeypatch, tmp_path):
    create_repo(REPO)
    src = _folder(tmp_path / "src", 3.0)
    upload_folder(repo_id=REPO, folder_path=src)
    online = snapshot_download(REPO)
    n = len(hub_endpoint.state.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot_download(REPO) == online
    assert Path(hf_hub_download(REPO, "model.safetensors")).read_bytes() == (src / "model.safetensors").read_bytes()
    assert len(hub_endpoint.state.requests) == n  # nothing reached the server


def test_transformers_round_trip(hub_endpoint):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=10
    )
    model = transformers.BertModel(config)
    first = model.push_to_hub("tiny-bert").oid  # bare name: the Hub puts it under the token's user
    repo_id = "hf-vq-tester/tiny-bert"
    pushed = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.push_to_hub(repo_id, revision="dev")  # push to a new branch

    HfApi().create_tag(repo_id, tag="v1", revision=first)
    cache = hub_endpoint.fresh_cache()
    loaded = transformers.AutoModel.from_pretrained(repo_id)
    assert (Path(cache) / "models--hf-vq-tester--tiny-bert" / "snapshots").is_dir()
    old = transformers.AutoModel.from_pretrained(repo_id, revision=first)
    dev = transformers.AutoModel.from_pretrained(repo_id, revision="dev")
    tagged = transformers.AutoModel.from_pretrained(repo_id, revision="v1")
    ref = model.state_dict()
    for k, v in dev.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert loaded.state_dict().keys() == pushed.keys() == dev.state_dict().keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, pushed[k]) and torch.equal(v, old.state_dict()[k]), k
        assert torch.equal(v, tagged.state_dict()[k]), k
        if v.is_floating_point() and v.numel() > 1:
            assert not torch.equal(v, ref[k]), k


def test_upload_pipeline_with_hf_xet_installed(hub_endpoint, monkeypatch, tmp_path):
    """With hf_xet installed, `upload_folder` takes the pipelined path; the double answers "regular" so no xet I/O."""
    pytest.importorskip("hf_xet")
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    assert is_xet_available()
    create_repo(REPO)
    src = _folder(tmp_path / "src", 4.0)
    upload_folder(repo_id=REPO, folder_path=src)
    snap = Path(snapshot_download(REPO))
    assert (snap / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
