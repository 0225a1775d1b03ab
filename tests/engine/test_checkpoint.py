"""Checkpoints: an interrupted run resumed from one ends exactly where an uninterrupted run does."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from prefect_torch.engine.checkpoint import (
    CheckpointCallback,
    checkpoint_key,
    latest_checkpoint,
    load_checkpoint,
    resume_trainer,
    save_checkpoint,
)
from prefect_torch.engine.loop import Callback, LoopState, Trainer, TrainSpec
from prefect_torch.engine.models import ModelSpec, build_model
from prefect_torch.engine.optim import OptimizerSpec, SchedulerSpec, build_optimizer, build_scheduler
from prefect_torch.engine.split import SplitSpec, split_table
from prefect_torch.errors import ConfigError, StorageError

MODEL = ModelSpec(hidden=[16, 16], dropout=0.25)
TRAINING = TrainSpec(
    epochs=3, batch_size=16, accumulate=2, clip=1.0, device="cpu", seed=3, checkpoint_every=2,
    scheduler=SchedulerSpec(name="cosine", interval="step"), early_stopping_patience=5,
)


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(120, 4)), columns=list("abcd"))
    frame["y"] = frame["a"] * 2 - frame["c"] + 0.1 * rng.normal(size=120)
    return split_table(frame, SplitSpec(target="y"))


class Crash(Exception):
    pass


class CrashAtStep(Callback):
    """Stands in for a killed process: stops the run dead after optimizer step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.at:
            raise Crash


def new_trainer(splits, callbacks=()):
    model = build_model(MODEL, splits.info.n_features, splits.info.n_outputs)
    return Trainer(model, build_optimizer(OptimizerSpec(name="adamw", lr=0.01), model), splits, TRAINING, callbacks)


def test_a_run_resumed_after_a_crash_ends_bitwise_equal_to_an_uninterrupted_one(splits, tmp_path):
    uninterrupted = new_trainer(splits)
    uninterrupted.fit()

    # 84 rows in batches of 16, in pairs: 3 steps an epoch; checkpoints after steps 2, 3
    # (epoch end), 4, 6 (epoch end), 8. A crash at step 9 falls back to step 8, mid-epoch.
    crashing = new_trainer(splits, [CheckpointCallback(str(tmp_path)), CrashAtStep(9)])
    with pytest.raises(Crash):
        crashing.fit()
    torch.manual_seed(12345)  # whatever the RNG did since, the checkpoint puts it back

    resumed = new_trainer(splits, [CheckpointCallback(str(tmp_path))])
    state = resume_trainer(str(tmp_path), resumed)
    assert (state.epoch, state.batch, state.step) == (2, 4, 8)  # epoch 3 (0-based 2), before batch 4
    resumed.fit()

    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [r["train_loss"] for r in resumed.state.history] == [r["train_loss"] for r in uninterrupted.state.history]
    assert resumed.optimizer.param_groups[0]["lr"] == uninterrupted.optimizer.param_groups[0]["lr"]


def test_load_checkpoint_restores_model_optimizer_scheduler_and_loop_state(splits, tmp_path):
    trainer = new_trainer(splits)
    trainer.fit()
    save_checkpoint(str(tmp_path), trainer.model, trainer.optimizer, trainer.scheduler, trainer.state)

    model = build_model(MODEL, splits.info.n_features, splits.info.n_outputs)
    optimizer = build_optimizer(OptimizerSpec(name="adamw", lr=0.01), model)
    scheduler = build_scheduler(TRAINING.scheduler, optimizer, TRAINING.epochs, trainer.steps_per_epoch)
    state = load_checkpoint(str(tmp_path), model, optimizer, scheduler)

    assert state == trainer.state
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["param_groups"] == trainer.optimizer.state_dict()["param_groups"]
    saved_state = trainer.optimizer.state_dict()["state"]
    for index, values in optimizer.state_dict()["state"].items():
        assert all(torch.equal(values[k], saved_state[index][k]) for k in values)
    assert scheduler.state_dict() == trainer.scheduler.state_dict()


def test_only_the_two_newest_checkpoints_are_kept(splits, tmp_path):
    trainer = new_trainer(splits, [CheckpointCallback(str(tmp_path))])
    trainer.fit()

    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4  # two checkpoints, each a .json and a .safetensors
    last = json.loads(open(latest_checkpoint(str(tmp_path))).read())
    assert last["loop_state"]["epoch"] == TRAINING.epochs
    assert last["loop_state"]["step"] == trainer.state.step


def test_a_tensors_file_without_its_json_is_ignored(splits, tmp_path):
    trainer = new_trainer(splits)
    save_checkpoint(str(tmp_path), trainer.model, trainer.optimizer, trainer.scheduler, LoopState(step=1))
    # A process killed between the two writes leaves only the tensors of the newer one.
    (tmp_path / "ckpt-0000000009-e000000-b000000.safetensors").write_bytes(b"partial")

    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-0000000001-e000000-b000000.json")
    assert resume_trainer(str(tmp_path), new_trainer(splits)).step == 1


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path):
    document = json.loads(path.read_text())
    document["loop_state"]["step"] += 1  # still valid JSON, but not what was written
    path.write_text(json.dumps(document))


def two_checkpoints(splits, folder):
    trainer = new_trainer(splits)
    for step in (1, 2):
        save_checkpoint(str(folder), trainer.model, trainer.optimizer, trainer.scheduler, LoopState(step=step))
    return folder / "ckpt-0000000002-e000000-b000000"


@pytest.mark.parametrize(
    ("damage", "suffix"),
    [(flip_middle_byte, ".json"), (edit_json, ".json"), (truncate, ".json"),
     (flip_middle_byte, ".safetensors"), (truncate, ".safetensors")],
    ids=["json-byte-flipped", "json-edited", "json-truncated", "tensors-byte-flipped", "tensors-truncated"],
)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_intact_one(splits, tmp_path, caplog, damage, suffix):
    newest = two_checkpoints(splits, tmp_path)
    damage(newest.with_suffix(suffix))

    with caplog.at_level("WARNING", logger="prefect_torch.engine.checkpoint"):
        state = resume_trainer(str(tmp_path), new_trainer(splits))

    assert state.step == 1
    assert f"Skipping the checkpoint {newest}.json" in caplog.text
    assert "trying the one before it" in caplog.text and "starts over" not in caplog.text


def test_with_every_checkpoint_damaged_training_starts_over(splits, tmp_path, caplog):
    newest = two_checkpoints(splits, tmp_path)
    flip_middle_byte(newest.with_suffix(".safetensors"))
    truncate(tmp_path / "ckpt-0000000001-e000000-b000000.json")

    with caplog.at_level("WARNING", logger="prefect_torch.engine.checkpoint"):
        assert resume_trainer(str(tmp_path), new_trainer(splits)) is None
    assert caplog.text.count("Skipping the checkpoint") == 2 and "training starts over" in caplog.text
    with pytest.raises(StorageError, match="No intact checkpoint"):
        load_checkpoint(str(tmp_path), *(lambda t: (t.model, t.optimizer, t.scheduler))(new_trainer(splits)))


def test_a_tensors_file_missing_under_its_json_is_skipped(splits, tmp_path):
    newest = two_checkpoints(splits, tmp_path)
    newest.with_suffix(".safetensors").unlink()
    assert resume_trainer(str(tmp_path), new_trainer(splits)).step == 1


def test_a_checkpoint_of_the_previous_format_is_skipped_as_unverifiable(splits, tmp_path, caplog):
    newest = two_checkpoints(splits, tmp_path)
    # Format 1: the same files, with a checksum over the tensors only.
    document = json.loads(newest.with_suffix(".json").read_text())
    del document["digest"]
    document["format_version"] = 1
    document["tensors_sha256"] = hashlib.sha256(newest.with_suffix(".safetensors").read_bytes()).hexdigest()
    newest.with_suffix(".json").write_text(json.dumps(document))

    with caplog.at_level("WARNING", logger="prefect_torch.engine.checkpoint"):
        assert resume_trainer(str(tmp_path), new_trainer(splits)).step == 1
    assert "checkpoint format 1" in caplog.text and "cannot be verified" in caplog.text


def test_a_run_resumed_past_a_damaged_checkpoint_replaces_it(splits, tmp_path):
    # 84 rows in batches of 16, in pairs: 3 steps an epoch, checkpoints at 2, 3, 4, 6, 8, 9.
    crashing = new_trainer(splits, [CheckpointCallback(str(tmp_path)), CrashAtStep(9)])
    with pytest.raises(Crash):
        crashing.fit()
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == ["ckpt-0000000006-e000002-b000000.json", "ckpt-0000000008-e000002-b000004.json"]
    flip_middle_byte(tmp_path / names[1].replace(".json", ".safetensors"))

    resumed = new_trainer(splits, [CheckpointCallback(str(tmp_path))])
    assert resume_trainer(str(tmp_path), resumed).step == 6
    resumed.fit()
    uninterrupted = new_trainer(splits)
    uninterrupted.fit()

    assert all(torch.equal(v, uninterrupted.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    # The damaged one was pruned (or rewritten): what is left verifies.
    assert resume_trainer(str(tmp_path), new_trainer(splits)).step == uninterrupted.state.step


def test_a_checkpoint_left_newer_than_the_one_just_written_is_pruned(splits, tmp_path):
    newest = two_checkpoints(splits, tmp_path)
    flip_middle_byte(newest.with_suffix(".json"))
    trainer = new_trainer(splits)
    save_checkpoint(str(tmp_path), trainer.model, trainer.optimizer, trainer.scheduler, LoopState(step=1, batch=1))

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-0000000001-e000000-b000000.json", "ckpt-0000000001-e000000-b000000.safetensors",
        "ckpt-0000000001-e000000-b000001.json", "ckpt-0000000001-e000000-b000001.safetensors",
    ]


def test_a_checkpoint_of_another_optimizer_is_refused(splits, tmp_path):
    trainer = new_trainer(splits)
    save_checkpoint(str(tmp_path), trainer.model, trainer.optimizer, trainer.scheduler, LoopState(step=1))
    model = build_model(MODEL, splits.info.n_features, splits.info.n_outputs)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)

    with pytest.raises(ConfigError, match="different optimizer"):
        load_checkpoint(str(tmp_path), model, sgd, trainer.scheduler)


def test_a_checkpoint_of_another_model_is_refused(splits, tmp_path):
    trainer = new_trainer(splits)
    save_checkpoint(str(tmp_path), trainer.model, trainer.optimizer, trainer.scheduler, LoopState(step=1))
    wider = build_model(ModelSpec(hidden=[32]), splits.info.n_features, splits.info.n_outputs)

    with pytest.raises(ConfigError, match="different model"):
        load_checkpoint(str(tmp_path), wider, build_optimizer(OptimizerSpec(), wider), None)


def test_loading_from_an_empty_folder_says_there_is_nothing_to_resume(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(StorageError, match="No intact checkpoint"):
        load_checkpoint(str(tmp_path / "none"), model, build_optimizer(OptimizerSpec(), model), None)
    assert resume_trainer(str(tmp_path / "none"), None) is None


def test_checkpoint_key_ignores_cadence_but_not_what_changes_the_numbers():
    base = checkpoint_key("model-key", OptimizerSpec(), TrainSpec())
    assert checkpoint_key("model-key", OptimizerSpec(), TrainSpec(checkpoint_every=5, progress_every=2)) == base
    assert checkpoint_key("model-key", OptimizerSpec(lr=0.1), TrainSpec()) != base
    assert checkpoint_key("model-key", OptimizerSpec(), TrainSpec(epochs=11)) != base
    assert checkpoint_key("other-model", OptimizerSpec(), TrainSpec()) != base
    assert checkpoint_key("model-key", OptimizerSpec(), TrainSpec(), {"after_loss": "l1"}) != base
