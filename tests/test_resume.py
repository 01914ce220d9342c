"""Run checkpoints under kills at every file operation of a save; a --resume that runs no code."""

import json
import os
import pickletools
import random
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from crash import Kill, Killed

import dsv3lite
from dsv3lite import checkpoint
from dsv3lite.checkpoint import SINGLE_NAME
from dsv3lite.train import TrainConfig, resume, train, trainer
from dsv3lite.train.data import load_tokenizer
from dsv3lite.train.resume import MARKER, STATE_NAME, load_state, newest_complete

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
             num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
             max_position_embeddings=32)  # fmt: skip


def _cfg(out: Path, data: Path, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, seq_len=16, log_every=1, eval_every=100,
                       eval_batches=1, ckpt_every=1, progress=False, out=str(out),
                       data=str(data), model_overrides=SMALL)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = "the a model expert token layer attention cache router bias loss step".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """A run checkpointed at step 2, and the same run trained to step 4 without a stop."""
    root = tmp_path_factory.mktemp("runs")
    train(_cfg(root / "at2", corpus, 2))
    clean = train(_cfg(root / "clean", corpus, 4))
    return root / "at2", dsv3lite.load_pretrained(clean.final).state_dict()


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("start", ["last", "last.old"])
def test_a_kill_at_any_file_operation_of_a_save_leaves_a_checkpoint_to_resume(
    start, runs, corpus, tmp_path, monkeypatch
):
    """Kill the save of step 3 at its 1st, 2nd, ... file operation (before it, then after it),
    until one save completes. Each time --resume must find a whole checkpoint of step 2 or 3,
    and continue to exactly the uninterrupted run's weights, leaving no temporary folder.

    start="last.old": the run resumes from the folder a kill between the two renames of an
    earlier save left, and must not delete it before its successor is complete."""
    at2, clean = runs
    monkeypatch.setattr(trainer, "plot_run", lambda *args: [])  # most of a short run's time
    real_save = trainer.save_atomically
    for after in (False, True):
        for at in range(1, 200):
            out = tmp_path / f"{after}-{at}"
            shutil.copytree(at2, out)
            if start == "last.old":
                (out / "last").rename(out / "last.old")
            kill = Kill(at, after)

            def killing_save(path, step, write, kill=kill):
                with monkeypatch.context() as mp:
                    if path.name == "last":
                        kill.install(mp)
                    real_save(path, step, write)

            monkeypatch.setattr(trainer, "save_atomically", killing_save)
            try:
                train(_cfg(out, corpus, 3), resume=True)
            except Killed:
                pass
            monkeypatch.setattr(trainer, "save_atomically", real_save)
            where = f"killed {'after' if after else 'before'} file operation {at}"

            found = newest_complete(out / "last")
            assert found is not None, f"{where}: nothing to resume from in {_names(out)}"
            assert load_state(found)["step"] in (2, 3), where
            assert dsv3lite.load_pretrained(found) and load_tokenizer(found)
            result = train(_cfg(out, corpus, 4), resume=True)
            weights = dsv3lite.load_pretrained(result.final).state_dict()
            for key in clean:
                torch.testing.assert_close(weights[key], clean[key], msg=f"{where}: {key}")
            assert _names(out) == ["final", "last", "metrics.jsonl", "plots"], where
            rows = [json.loads(x)["step"] for x in result.metrics.read_text().splitlines()]
            assert rows == [1, 2, 3, 4], where
            shutil.rmtree(out)
            if not kill.fired:
                break  # the save completed: every operation has been killed once
        assert at > 20, "the save has fewer file operations than expected: is the patch live?"


def test_every_file_is_flushed_before_the_checkpoint_is_renamed_into_place(
    runs, corpus, tmp_path, monkeypatch
):
    """Data a kill (or a power cut) may still hold in the page cache must reach the disk before
    a rename makes the folder the checkpoint: the tokenizer and trainer state included."""
    events = []
    real_fsync, real_replace = checkpoint.fsync_path, os.replace

    def fsync(path):
        events.append(("fsync", Path(path).name))
        real_fsync(path)

    def replace(src, dst):
        events.append(("rename", Path(src).name))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "fsync_path", fsync)
    monkeypatch.setattr(resume, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    train(_cfg(out, corpus, 3), resume=True)
    flushed = {name for kind, name in events[: events.index(("rename", ".last.tmp"))]}
    files = {"config.json", SINGLE_NAME, "tokenizer.json", STATE_NAME, ".last.tmp"}
    assert files <= flushed, files - flushed


class _RunsCode:
    """A pickle that runs code when unpickled: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_crafted_trainer_state_is_refused_without_running_it(runs, corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    state = torch.load(out / "last" / STATE_NAME, weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "step": _RunsCode(marker)}, out / "last" / STATE_NAME)
    with pytest.raises(ValueError, match=rf"{STATE_NAME} holds more than tensors.*not unpickled"):
        train(_cfg(out, corpus, 3), resume=True)
    assert not marker.exists(), "unpickling the trainer state ran its code"
    # what the check stands between, read without running it: a call of exec in the pickle
    with zipfile.ZipFile(out / "last" / STATE_NAME) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        ops = list(pickletools.genops(archive.read(name)))
    assert ("GLOBAL", "__builtin__ exec") in {(op.name, arg) for op, arg, _ in ops}
    assert "REDUCE" in {op.name for op, _, _ in ops}


def test_a_corrupt_trainer_state_or_marker_is_named(runs, corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    file = out / "last" / STATE_NAME
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"{STATE_NAME} is not a complete torch.save file"):
        train(_cfg(out, corpus, 3), resume=True)
    torch.save({"step": 2}, file)
    with pytest.raises(ValueError, match=rf"{STATE_NAME} is not a trainer state: it must hold"):
        train(_cfg(out, corpus, 3), resume=True)
    (out / "last" / MARKER).write_text('{"step": 2')  # torn: the folder is not complete
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_cfg(out, corpus, 3), resume=True)


def test_a_last_folder_without_its_marker_is_neither_resumed_nor_overwritten(
    runs, corpus, tmp_path
):
    """As an older dsv3lite left it, or someone else's folder: keep it, say why."""
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    (out / "last" / MARKER).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint .* holding {MARKER}"):
        train(_cfg(out, corpus, 3), resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(_cfg(out, corpus, 3))
    assert (out / "last" / STATE_NAME).exists()


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(runs, corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 5.')  # a kill in mid-write
    with pytest.warns(UserWarning, match="dropped its last line, cut short"):
        result = train(_cfg(out, corpus, 3), resume=True)
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    assert result.step == 3

    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON row"):
        train(_cfg(out, corpus, 4), resume=True)
