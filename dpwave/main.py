"""dpwave entry point.

    python -m dpwave.main --config=experiments/configs/mnist.py:demo --workdir=workdir/demo \
        [--config.dp.target_epsilon=1]

Rerunning with the same workdir resumes (stage and step); there is no --resume flag. The console shows one
line per stage, the progress bars and a closing summary; the full log is `<workdir>/log.txt` (dpwave.console).
Config typos and inconsistent configs, data errors (a corrupt image, a private split in a public role, ...) and
secret-seed errors end the command with one line naming the fix.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dpwave import console
from dpwave.data.errors import DataError
from dpwave.train import distributed, pipeline
from dpwave.train import settings as settings_lib
from dpwave.train.secret_seed import SecretSeedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad `--config.*` override into a one-line error, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        name = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and str(e).strip("'\"") in a),
                    None)
        hint = f" ({name}: no such config field; see the config file for valid keys)" if name else ""
        sys.exit(f"dpwave.main: bad flags: {type(e).__name__}: {e}{hint}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}; overrides look like --config.a.b=value")
    workdir = _WORKDIR.value
    try:
        settings_lib.read(_CONFIG.value)  # the config's consistency, before anything runs
    except ValueError as e:
        sys.exit(f"dpwave.main: bad config: {e}")
    console.setup(workdir)
    distributed.maybe_initialize_distributed()
    log = console.set_process_index(jax.process_index())
    logging.info("config:\n%s", _CONFIG.value)
    try:
        finished = pipeline.train_and_evaluate(_CONFIG.value, workdir)
    except (SecretSeedError, DataError) as e:
        logging.info("run ended: %s: %s", type(e).__name__, e)
        sys.exit(f"dpwave.main: {e}")
    if finished and jax.process_index() == 0:
        text = console.summary(workdir, log)
        logging.info("%s", text)
        print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
