"""`--out` holds the old or the new model at every instant of `--overwrite`; a killed run leaves nothing the next
run does not restore or remove; an existing `--out` without `--overwrite` fails before the checkpoint is read.

A kill is simulated in-process: the step raises `Killed` (a BaseException, as KeyboardInterrupt) and the
converter's own clean-up (`shutil.rmtree` in its `finally`) is disabled, as a SIGKILL would skip it."""

import types

import pytest
from test_convert import write_case
from transformers import AutoModel

import hf_vq
from hf_vq.conversion import convert_cogvideo_sat, output_folder
from hf_vq.conversion.convert_cogvideo_sat import main


class Killed(BaseException):
    pass


def _complete(folder):
    return sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def _hidden(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))


@pytest.fixture
def two_models(tmp_path):
    """An existing --out (VectorQuantizer, n_e=32) and a checkpoint of another class to replace it with."""
    old_root, old_config = write_case(tmp_path, "VectorQuantizer")
    new_root, new_config = write_case(tmp_path, "EMAVectorQuantizer")
    out = tmp_path / "out"
    assert main([str(old_root), "--config", str(old_config), "--out", str(out), "--quiet"]) == 0
    return out, [str(new_root), "--config", str(new_config), "--out", str(out), "--quiet", "--overwrite"]


def _no_cleanup(monkeypatch):
    monkeypatch.setattr(convert_cogvideo_sat, "shutil", types.SimpleNamespace(rmtree=lambda *a, **k: None))


def test_existing_out_fails_before_the_checkpoint_is_read(tmp_path, capsys, monkeypatch):
    root, config = write_case(tmp_path, "VectorQuantizer")
    (tmp_path / "out").mkdir()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(convert_cogvideo_sat, "load_state_dict", must_not_run)
    monkeypatch.setattr(convert_cogvideo_sat, "resolve_checkpoint", must_not_run)
    assert main([str(root), "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert "already exists (pass --overwrite to replace it)" in capsys.readouterr().err


def test_atomic_swap_keeps_a_complete_model_at_out(two_models, tmp_path, monkeypatch):
    out, args = two_models
    real = output_folder.exchange_paths
    seen = []

    def swap_then_kill(a, b):
        seen.append(_complete(out))  # the old model, complete, right before
        assert real(a, b)
        seen.append(_complete(out))  # the new one, complete, right after
        raise Killed

    monkeypatch.setattr(output_folder, "exchange_paths", swap_then_kill)
    _no_cleanup(monkeypatch)
    with pytest.raises(Killed):
        main(args)
    assert seen == [True, True]
    assert type(AutoModel.from_pretrained(out)) is hf_vq.EMAVectorQuantizer
    assert len(_hidden(tmp_path)) == 1  # the old model, left in the .partial folder by the kill
    monkeypatch.undo()
    assert main(args) == 0  # the next run removes it
    assert _hidden(tmp_path) == [] and type(AutoModel.from_pretrained(out)) is hf_vq.EMAVectorQuantizer


def test_a_kill_between_the_two_renames_is_restored_by_the_next_run(two_models, tmp_path, monkeypatch, capsys):
    out, args = two_models
    monkeypatch.setattr(output_folder, "exchange_paths", lambda a, b: False)  # an OS without renameat2
    real_replace = output_folder.os.replace
    calls = []

    def replace_then_kill(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)
        if len(calls) == 1:  # --out moved aside, the new model not yet renamed in
            raise Killed

    monkeypatch.setattr(output_folder.os, "replace", replace_then_kill)
    _no_cleanup(monkeypatch)
    with pytest.raises(Killed):
        main(args)
    monkeypatch.undo()
    assert not out.exists() and any(n.endswith(".old") for n in _hidden(tmp_path))
    # the next run, even one that is refused, first puts the old model back and removes the rest
    assert main(args[:-1]) == 1
    assert "already exists" in capsys.readouterr().err
    assert _complete(out) and type(AutoModel.from_pretrained(out)) is hf_vq.VectorQuantizer
    assert _hidden(tmp_path) == []


def test_a_kill_while_writing_leaves_the_old_model_and_a_partial_folder_that_is_removed(two_models, tmp_path,
                                                                                       monkeypatch):
    out, args = two_models

    def kill(*a, **k):
        raise Killed

    monkeypatch.setattr(convert_cogvideo_sat, "_check_reload", kill)
    _no_cleanup(monkeypatch)
    with pytest.raises(Killed):
        main(args)
    assert type(AutoModel.from_pretrained(out)) is hf_vq.VectorQuantizer
    assert [n for n in _hidden(tmp_path) if n.endswith(".partial")]
    monkeypatch.undo()
    output_folder.recover_leftovers(out)
    assert _hidden(tmp_path) == [] and _complete(out)


def test_a_live_run_s_folders_are_left_alone(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".out.{child.pid}.abc.partial"
        busy.mkdir()
        dead = tmp_path / ".out.999999999.abc.partial"
        dead.mkdir()
        output_folder.recover_leftovers(tmp_path / "out")
        assert busy.exists() and not dead.exists()
    finally:
        child.kill()
        child.wait()
    assert os.path.isdir(tmp_path / "out")
