"""`loop.StageLoop`, the machinery a stage's own loop calls: what every checkpoint holds (the final one included),
the checkpoint cadence, resume, an early stop, and what a private stage keeps out of its summary."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dpwave.train import loop
from dpwave.train.checkpoint import Checkpointer

pytestmark = pytest.mark.unit

OPTIONS = loop.LoopOptions(checkpoint_every=2, max_to_keep=10, log_every=1)
INIT = {"w": jnp.zeros(2)}


def _train(stage_dir, total: int, *, stop_at: int | None = None, private: bool = False, resumed: list | None = None):
    """A stage's loop as the DP stage writes it: its meta (a step counter standing in for the ledger) goes into
    every checkpoint, and `on_restore` gets it back."""
    ledger = {"steps": 0}

    def on_restore(meta):
        ledger.update(meta["ledger"])
        if resumed is not None:
            resumed.append(meta["ledger"]["steps"])

    with loop.StageLoop("toy", str(stage_dir), OPTIONS, inputs={"stage": "toy"}, private=private) as stage_loop:
        state, step = stage_loop.restore(INIT, on_restore)
        for i, batch in stage_loop.batches(lambda i: np.float32(i), total):
            if i == stop_at:
                stage_loop.stop_early(i, "budget")
                break
            state = {"w": state["w"] + batch}
            ledger["steps"] += 1
            step = i + 1
            if stage_loop.end_step(step, state, {"loss": 0.0}, meta=lambda: {"ledger": dict(ledger)}):
                return stage_loop.result
        return stage_loop.finish(state, step, state["w"], meta=lambda: {"ledger": dict(ledger)},
                                 summary_extra={"ledger_steps": ledger["steps"]})


def _metas(stage_dir) -> dict[int, dict]:
    with Checkpointer(f"{stage_dir}/checkpoints") as ckpt:
        return {step: ckpt.restore(step, INIT)[1] for step in ckpt.all_steps()}


def test_every_checkpoint_holds_the_stage_meta_the_final_one_included(tmp_path):
    result = _train(tmp_path, 5)
    assert result.finished and result.step == 5
    metas = _metas(tmp_path)
    assert sorted(metas) == [2, 4, 5]  # the cadence, then the final step
    assert {step: meta["ledger"]["steps"] for step, meta in metas.items()} == {2: 2, 4: 4, 5: 5}
    assert all(meta["inputs"] == {"stage": "toy"} for meta in metas.values())
    np.testing.assert_array_equal(result.state["w"], np.full(2, 0 + 1 + 2 + 3 + 4, np.float32))


def test_a_rerun_resumes_from_the_newest_checkpoint_with_its_meta(tmp_path):
    _train(tmp_path, 4)
    resumed: list = []
    result = _train(tmp_path, 7, resumed=resumed)  # more steps: continues from step 4
    assert resumed == [4] and result.step == 7
    assert result.summary["ledger_steps"] == 7
    np.testing.assert_array_equal(result.state["w"], np.full(2, sum(range(7)), np.float32))


def test_an_early_stop_is_recorded_and_finishes_at_the_last_step_taken(tmp_path):
    result = _train(tmp_path, 10, stop_at=3)
    assert result.finished and result.step == 3
    assert result.summary["stopped_early"] and result.summary["final_step"] == 3
    assert _metas(tmp_path)[3]["ledger"]["steps"] == 3


def test_a_private_stage_keeps_its_timing_out_of_the_summary(tmp_path):
    public = _train(tmp_path / "public", 2).summary
    private = _train(tmp_path / "private", 2, private=True).summary
    assert "wall_time_s" in public and "input_wait_fraction" in public
    assert not {"wall_time_s", "input_wait_s", "input_wait_fraction"} & set(private)
    timing = json.loads((tmp_path / "private" / loop.PRIVATE_TIMING).read_text())
    assert timing["stage"] == "toy" and timing["wall_time_s"] >= 0
    assert (tmp_path / "private").stat().st_mode & 0o077 == 0  # owner-only
