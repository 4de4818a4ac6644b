"""Every config or data error is one line at the CLI: `python -m dpwave.main` with a bad config or a bad data folder
exits non-zero with one line on stderr naming the problem and the fix, before writing anything in the workdir
(dpwave/main.py's docstring says which errors are one line).
tests/train/test_main.py has the command-line cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from helpers import runs

pytestmark = pytest.mark.integration

_TINY = "--config=experiments/configs/mnist.py:tiny"


def _private_folder(name: str) -> list[str]:
    """Overrides that make the image folder `{root}/<name>` the private set."""
    return [_TINY, "--config.data.private.name=image_folder", "--config.data.private.split=train",
            f"--config.data.private.manual_dir={{root}}/{name}", "--config.data.private.data_dir={root}/tfds"]


# case: (arguments before --workdir, fragments of the one line: the problem and the fix)
_CASES = {
    "delta_above_1_over_n": ([_TINY, "--config.dp.mechanism.delta=0.01"],
                             ["config.dp over the 2000 examples of config.data.private: delta=0.01 >= 1/N",
                              "Use delta well below 1/N"]),
    "unknown_variant": (["--config=experiments/configs/mnist.py:tinyy"],
                        ["bad config file", "unknown mnist variant 'tinyy'; use demo, ", "or tiny"]),
    "missing_config_file": (["--config=experiments/configs/nope.py"],
                            ["bad config file", "No such file or directory: 'experiments/configs/nope.py'"]),
    "batch_above_private_set": (_private_folder("ten_images"),
                                ["dp.mechanism.expected_batch_size=64 is larger than the 10 examples it samples from",
                                 "lower dp.mechanism.expected_batch_size", "give config.data.private more examples"]),
    "missing_folder": (_private_folder("nowhere"),
                       ["the folder does not exist", "{root}/nowhere", "expected layout"]),
    "nan_pixels": (_private_folder("nan_image"), ["'train/c0/bad.tif': 1 pixel values are NaN", "fix or drop"]),
    "zero_checkpoint_interval": ([_TINY, "--config.checkpoint.every_steps=0"],
                                 ["config.checkpoint.every_steps=0 must be an int >= 1"]),
    "bad_model_field": ([_TINY, "--config.tokenizer.model.codebook_size=1"],
                        ["config.tokenizer.model: ", "codebook_size must be an int >= 2"]),
    "stale_finished_stage": ([_TINY], ["stage 'tokenizer'", "was finished from other inputs",
                                       "rerun with a new --workdir"]),
}


def _class_folder(root, count: int) -> None:
    for i in range(count):
        path = root / "train" / f"c{i % 2}" / f"d{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), 20 * i, np.uint8)).save(path)


def _folders(root) -> None:
    _class_folder(root / "ten_images", 10)
    _class_folder(root / "nan_image", 4)
    bad = np.full((32, 32), 0.5, np.float32)
    bad[1, 2] = np.nan
    Image.fromarray(bad).save(root / "nan_image" / "train" / "c0" / "bad.tif")
    stale = root / "stale_finished_stage" / "tokenizer"  # a finished stage recorded under other inputs
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text(json.dumps({"stage": "tokenizer", "inputs_sha256": "0" * 64}))


def _listing(workdir) -> dict[str, bytes] | None:
    """Every file of `workdir`, or None."""
    if not workdir.exists():
        return None
    return {str(p): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def outcomes(compile_cache, tmp_path_factory) -> dict[str, tuple[int, str, bool, str]]:
    """(exit code, stderr, whether the workdir is as before, the test's root) of each case, run concurrently."""
    root = tmp_path_factory.mktemp("bad")
    _folders(root)
    before = {name: _listing(root / name) for name in _CASES}
    commands = {name: [a.replace("{root}", str(root)) for a in args] + [f"--workdir={root / name}"]
                for name, (args, _) in _CASES.items()}
    return {name: (code, stderr, _listing(root / name) == before[name], str(root))
            for name, (code, stderr) in runs.run_cli(commands, compile_cache).items()}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_a_bad_config_or_data_folder_is_one_line_and_writes_nothing(outcomes, case):
    code, stderr, untouched, root = outcomes[case]
    lines = runs.message_lines(stderr)
    assert code == 1 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("dpwave.main: "), lines
    for fragment in _CASES[case][1]:
        assert fragment.replace("{root}", root) in lines[0], lines[0]
    assert untouched  # refused before the workdir was created or written
