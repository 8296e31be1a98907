"""Checkpoint retention and integrity without ranks: --keep-last, --keep-every, unreadable markers, damaged files, --resume-step, RNG files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from clova_train.core.errors import ClovaError
from clova_train.training.checkpoints.checkpoint import Checkpointer, damage, rng_from_json, rng_state, rng_to_json, set_rng_state, tag_for
from clova_train.training.run.config import TrainConfig
from clova_train.training.rundir import MARKER_FILE


def make(d, step, *, marker=True, payload=b"weights"):
    t = d / tag_for(step)
    t.mkdir(parents=True)
    (t / "model_states.pt").write_bytes(payload)
    if marker:
        (t / MARKER_FILE).write_text(json.dumps({"step": step, "files": {"model_states.pt": len(payload)}}))
    return t


def names(d):
    return sorted(p.name for p in d.iterdir())


def test_keep_last_defaults_to_three_and_keep_every_keeps_milestones(tmp_path):
    assert TrainConfig().keep_last == 3
    d = tmp_path / "checkpoints"
    for step in range(100, 1100, 100):
        make(d, step)
    Checkpointer(tmp_path, None, rank=0, world=1, keep_last=3, keep_every=500).prune()
    assert names(d) == [tag_for(s) for s in (500, 800, 900, 1000)]


def test_prune_keeps_a_checkpoint_whose_marker_did_not_read_and_the_newest_complete(tmp_path):
    d = tmp_path / "checkpoints"
    make(d, 4), make(d, 8), make(d, 12)
    (d / tag_for(4) / MARKER_FILE).write_text("{ half a marker")  # as a transient read error would show it
    make(d, 16, marker=False)  # a save cut short
    ck = Checkpointer(tmp_path, None, rank=0, world=1, keep_last=1)
    ck.prune()
    assert names(d) == [tag_for(4), tag_for(12)]
    assert Checkpointer.complete(d) == [(12, tag_for(12))]


def test_damaged_newest_checkpoint_is_named_and_resume_step_goes_back(tmp_path):
    d = tmp_path / "checkpoints"
    make(d, 4), make(d, 8)
    newest = make(d, 12)
    (newest / "model_states.pt").write_bytes(b"trunc")
    assert "5 bytes, the completion marker recorded 7" in damage(newest, json.loads((newest / MARKER_FILE).read_text()))
    ck = Checkpointer(tmp_path, None, rank=0, world=1, keep_last=0)
    with pytest.raises(ClovaError, match=r"step_00000012 is damaged .*model_states.pt has 5 bytes.*--resume-step 8"):
        ck._choose(None)
    with pytest.raises(ClovaError, match="no intact complete checkpoint at step 12; intact steps: 4, 8"):
        ck._choose(12)
    assert ck._choose(8) == tag_for(8)
    assert names(d) == [tag_for(4), tag_for(8)]  # the abandoned trajectory is gone: a restart cannot return to it
    (d / tag_for(8) / "model_states.pt").unlink()
    with pytest.raises(ClovaError, match="model_states.pt is missing.*--resume-step 4"):
        ck._choose(None)


def test_rng_state_round_trips_through_json(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    path = tmp_path / "rng.json"
    path.write_text(json.dumps(rng_to_json(rng_state())))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(rng_from_json(json.loads(path.read_text())))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
