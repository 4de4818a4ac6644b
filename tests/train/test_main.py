"""`python -m dpwave.main`: bad command lines and bad data end with a clean message, a non-zero exit and no work
done."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from helpers import runs

pytestmark = pytest.mark.integration

_CONFIG = "--config=experiments/configs/mnist.py:tiny"
_CASES = {
    "typo": ([_CONFIG, "--config.dp.sepsilon=1"], ["--config.dp.sepsilon", "no such config field"]),
    # The flat spelling of a DP key before config.dp had sections names the key's section.
    "flat_dp_key": ([_CONFIG, "--config.dp.target_epsilon=1"],
                    ["--config.dp.target_epsilon", "use --config.dp.mechanism.target_epsilon"]),
    "flat_secret_seed": ([_CONFIG, "--config.dp.secret_seed=1"], ["use --config.dp.secret.seed"]),
    "no_workdir": ([_CONFIG], ["--workdir", "must have a value"]),
    "bad_value": ([_CONFIG, "--config.dp.mechanism.steps=ten"], ["--config.dp.mechanism.steps", "ten"]),
    "no_config": ([], ["--config", "must have a value"]),
    "bad_seed_file": ([_CONFIG, "--config.dp.secret.seed_file=/nonexistent/dp_seed"],
                      ["dp.secret.seed_file '/nonexistent/dp_seed' does not exist", "umask 077"]),
    "private_as_public": ([_CONFIG, "--config.data.public.split=private", "--config.data.public.privacy=private"],
                          ["dpwave.main: bad config: config.data.public is tagged privacy='private'"]),
    # A user's image folder with one corrupt PNG as the public data ({root}: the test's folder).
    "corrupt_png": ([_CONFIG, "--config.data.public.name=image_folder", "--config.data.public.split=train",
                     "--config.data.public.manual_dir={root}/images", "--config.data.public.data_dir={root}/tfds",
                     "--config.data.public.override_private_default=True"],
                    ["example 'bad.png': cannot decode image", "repair or remove that file"]),
}


def _image_folder_with_a_corrupt_png(folder) -> None:
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((32, 32), 60 * i, np.uint8)).save(folder / f"digit{i}.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


@pytest.fixture(scope="module")
def outcomes(compile_cache, tmp_path_factory) -> dict[str, tuple[int, str, bool]]:
    """(exit code, stderr, whether the workdir was created) of each case, run concurrently."""
    root = tmp_path_factory.mktemp("cli")
    _image_folder_with_a_corrupt_png(root / "images")
    commands = {name: [a.replace("{root}", str(root)) for a in args]
                + ([f"--workdir={root / name}"] if name != "no_workdir" else []) for name, (args, _) in _CASES.items()}
    return {name: (code, stderr, (root / name).exists())
            for name, (code, stderr) in runs.run_cli(commands, compile_cache, timeout=180).items()}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_command_line_gives_a_clean_error(outcomes, case):
    code, stderr, created = outcomes[case]
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    for fragment in _CASES[case][1]:
        assert fragment in stderr, stderr
    assert not created  # failed before touching the workdir


def test_a_bad_secret_seed_file_is_one_line(outcomes):
    stderr = outcomes["bad_seed_file"][1]
    assert stderr.strip().splitlines()[-1].startswith("dpwave.main: dp.secret.seed_file '/nonexistent/dp_seed' does "
                                                      "not exist; create it with (umask 077;")


def test_a_corrupt_image_is_one_line_naming_the_file_and_the_fix(outcomes):
    last = outcomes["corrupt_png"][1].strip().splitlines()[-1]
    assert last.startswith("dpwave.main: example 'bad.png': cannot decode image ") and last.endswith(
        "repair or remove that file and rerun the same command"), last
