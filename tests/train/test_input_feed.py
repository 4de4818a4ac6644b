"""The loop's input feed: `Task.batch` runs on workers ahead of the step, the step consumes exactly batch i at step i
(through a budget stop and a resume), and the time waited for input is recorded (public stages: summary, metrics,
log; private ones: PRIVATE_TIMING only)."""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.runs import tiny_config

from dpwave.data import DataError
from dpwave.privacy import PoissonSampler
from dpwave.train import loop, pipeline, settings

FEED = loop.InputFeed(workers=2, prefetch=4)


def recording_task(consumed: list, produce, total_steps: int, **kw: Any) -> loop.Task:
    def step(state, batch, i):
        consumed.append((i, batch))
        return {"w": state["w"] + 1.0}, {"loss": 0.5}
    return loop.Task("toy", {"w": jnp.zeros(2)}, step, total_steps, params_of=lambda s: s, batch=produce, **kw)


def poisson_produce(sampler: PoissonSampler):
    def produce(i):
        indices, mask = sampler.batch(i)
        return indices * 3, mask
    return produce


def assert_consumed(consumed, produce, steps):
    assert [i for i, _ in consumed] == list(steps)
    for i, (examples, mask) in consumed:
        expected = produce(i)
        np.testing.assert_array_equal(examples, expected[0])
        np.testing.assert_array_equal(mask, expected[1])


@pytest.mark.integration
def test_a_budget_stop_uses_exactly_the_drawn_batches_before_it(tmp_path):
    produce = poisson_produce(PoissonSampler(300, 0.05, seed=4))
    consumed: list = []

    def before_step(i):
        if i == 5:
            raise loop.StopStage("budget")

    task = recording_task(consumed, produce, 20, before_step=before_step, private=True)
    result = loop.run(task, str(tmp_path), checkpoint_every=100, max_to_keep=2, log_every=1, feed=FEED)
    assert result.summary["final_step"] == 5 and result.summary["stopped_early"]
    assert_consumed(consumed, produce, range(5))  # batches 5.. were made ahead, never used


@pytest.mark.integration
def test_a_resumed_stage_consumes_the_same_batches_as_an_uninterrupted_one(tmp_path):
    produce = poisson_produce(PoissonSampler(300, 0.05, seed=9))
    whole: list = []
    loop.run(recording_task(whole, produce, 8), str(tmp_path / "whole"), checkpoint_every=1, max_to_keep=2,
             log_every=1, feed=FEED)
    assert_consumed(whole, produce, range(8))

    def stop_at_5(i):
        if i == 5:
            raise loop.StopStage("cut")

    first: list = []
    loop.run(recording_task(first, produce, 8, before_step=stop_at_5), str(tmp_path / "cut"), checkpoint_every=1,
             max_to_keep=2, log_every=1, feed=FEED)
    rest: list = []
    loop.run(recording_task(rest, produce, 8), str(tmp_path / "cut"), checkpoint_every=1, max_to_keep=2,
             log_every=1, feed=FEED)
    assert [i for i, _ in first] == list(range(5))
    assert_consumed(rest, produce, range(5, 8))


@pytest.mark.integration
def test_the_input_wait_is_recorded(tmp_path, caplog):
    def slow_batch(i):
        time.sleep(0.03)
        return np.full(2, i)

    task = loop.Task("toy", {"w": jnp.zeros(2)}, lambda state, batch, i: (state, {}), 12, params_of=lambda s: s,
                     batch=slow_batch)
    with caplog.at_level(logging.INFO):
        inline = loop.run(task, str(tmp_path), checkpoint_every=100, max_to_keep=2, log_every=4,
                          feed=loop.InputFeed()).summary
    assert inline["input_wait_s"] >= 12 * 0.03  # every batch is made while the step waits for it
    assert inline["input_wait_fraction"] == pytest.approx(inline["input_wait_s"] / inline["wall_time_s"], abs=0.01)
    assert any("[toy] input wait:" in r.getMessage() for r in caplog.records)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12] and all(line["input_wait_fraction"] > 0 for line in lines)


@pytest.mark.integration
@pytest.mark.parametrize("feed, ahead", [(FEED, True), (loop.InputFeed(), False)])
def test_workers_make_the_next_batch_while_the_step_runs(tmp_path, feed, ahead):
    made, ready = set(), threading.Condition()

    def batch(i):
        with ready:
            made.add(i)
            ready.notify_all()
        return np.full(2, i)

    def step(state, batch, i):  # step i waits (bounded) for batch i + 1: only a prefetching feed makes it meanwhile
        if i + 1 < steps:
            with ready:
                seen.append(ready.wait_for(lambda: i + 1 in made, timeout=10 if ahead else 0.2))
        return state, {}

    seen: list[bool] = []
    steps = 6
    task = loop.Task("toy", {"w": jnp.zeros(2)}, step, steps, params_of=lambda s: s, batch=batch)
    loop.run(task, str(tmp_path), checkpoint_every=100, max_to_keep=2, log_every=3, feed=feed)
    assert seen == [ahead] * (steps - 1)


@pytest.mark.integration
def test_a_private_stage_keeps_its_input_wait_out_of_the_summary_metrics_and_log(tmp_path, caplog):
    task = recording_task([], lambda i: np.zeros(1), 3, private=True)
    with caplog.at_level(logging.INFO):
        result = loop.run(task, str(tmp_path), checkpoint_every=100, max_to_keep=2, log_every=1, feed=FEED)
    timing = json.loads((tmp_path / loop.PRIVATE_TIMING).read_text())
    assert timing["input_wait_s"] >= 0 and 0 <= timing["input_wait_fraction"] <= 1
    assert not {"input_wait_s", "input_wait_fraction", "wall_time_s"} & set(result.summary)
    assert "input_wait" not in (tmp_path / "metrics.jsonl").read_text()
    assert not any("input wait" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_a_data_error_in_a_worker_ends_the_stage_with_that_error(tmp_path):
    def produce(i):
        if i == 2:
            raise DataError("image_folder/train: cannot read example 7 from /data/x.array_record: bad chunk")
        return np.zeros(1)

    consumed: list = []
    with pytest.raises(DataError, match="cannot read example 7 from /data/x.array_record"):
        loop.run(recording_task(consumed, produce, 6), str(tmp_path), checkpoint_every=100, max_to_keep=2,
                 log_every=1, feed=FEED)
    assert [i for i, _ in consumed] == [0, 1]


@pytest.mark.unit
@pytest.mark.parametrize("key, value, match", [
    ("input_workers", -1, r"config.perf.input_workers=-1 must be an int >= 0"),
    ("input_workers", True, r"config.perf.input_workers=True must be an int"),
    ("input_prefetch", 0, r"config.perf.input_prefetch=0 must be an int >= max\(1, config.perf.input_workers=2\)"),
    ("input_prefetch", 1, r"config.perf.input_prefetch=1 must be an int >= max"),
])
def test_bad_input_settings_are_one_line_errors_naming_the_key(key, value, match):
    config = tiny_config({f"perf.{key}": value})
    with pytest.raises(ValueError, match=match) as info:
        settings.read(config)
    assert "\n" not in str(info.value)


@pytest.mark.unit
def test_input_settings_are_read_and_are_not_a_stage_input():
    base = settings.read(tiny_config())
    other = settings.read(tiny_config({"perf.input_workers": 0, "perf.input_prefetch": 9}))
    assert (other.perf.input_workers, other.perf.input_prefetch) == (0, 9)
    assert pipeline.stage_inputs(base) == pipeline.stage_inputs(other)
