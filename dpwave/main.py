"""dpwave entry point.

    python -m dpwave.main --config=experiments/configs/mnist.py:demo --workdir=workdir/demo \
        [--config.dp.mechanism.target_epsilon=1]

Rerunning with the same workdir resumes (stage and step); there is no --resume flag. The console shows one
line per stage, the progress bars and a closing summary; the full log is `<workdir>/log.txt` (dpwave.console).

Errors a user can fix end the command with one line on stderr, `dpwave.main: <problem>; <fix>`, and exit 1:
  * anything that goes wrong while the command line and the config file are read (a typo, a bad value, an unknown
    config variant, a missing config file);
  * any ValueError or OSError of the checks made before the workdir is written (`pipeline.prepare`: the config's
    consistency, the DP secret seed, a finished stage from other inputs, the data and its privacy boundary, the DP
    settings against the private set's size), so a bad config or data folder leaves no workdir;
  * the errors of a running stage that name their fix (`RUN_ERRORS`: another run holds the workdir, damaged data,
    unreadable checkpoints, a full disk, ...).
Anything else is a bug and keeps its traceback.
"""

import dataclasses
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dpwave import console, files
from dpwave.data.errors import DataError
from dpwave.evaluate.inception_weights import InceptionWeightsError
from dpwave.privacy import LedgerMismatchError
from dpwave.train import distributed, pipeline
from dpwave.train import settings as settings_lib
from dpwave.train.checkpoint import CheckpointRestoreError
from dpwave.train.fingerprints import StaleStageError
from dpwave.train.secret_seed import SecretSeedError
from dpwave.train.workdir_lock import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors of a running stage that name their fix.
RUN_ERRORS = (WorkdirLockedError, DataError, SecretSeedError, StaleStageError, LedgerMismatchError,
              CheckpointRestoreError, files.DiskFullError, InceptionWeightsError)


def one_line(error: BaseException) -> str:
    """An error's message on one line: whitespace collapsed, lines joined by "; " (after a colon, by a space)."""
    out = ""
    for line in (" ".join(line.split()) for line in str(error).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def _last_line(error: BaseException) -> str:
    """The message a config file raised, out of the traceback text ml_collections puts in its flag error."""
    return next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), type(error).__name__)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad `--config.*` override or config file into one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        if "Error whilst parsing config file" in str(e):  # get_config(arg) raised: its own message is the last line
            sys.exit(f"dpwave.main: bad config file: {_last_line(e)}")
        name = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and str(e).strip("'\"") in a),
                    None)
        hint = f" ({_no_such_field(name)})" if name else ""
        sys.exit(f"dpwave.main: bad flags: {type(e).__name__}: {one_line(e)}{hint}")


def _no_such_field(flag: str) -> str:
    """The hint for an override of a missing field; a flat `--config.dp.KEY` names the section KEY moved to."""
    key = flag.removeprefix("--config.dp.")
    section = next((name for name, cls in settings_lib.DP_SECTIONS.items()
                    if key in {f.name for f in dataclasses.fields(cls)}), None)
    if section is not None:
        return f"{flag}: config.dp is in sections now; use --config.dp.{section}.{key}"
    old_secret = {"secret_seed": "seed", "secret_seed_file": "seed_file"}.get(key)
    if old_secret is not None:
        return f"{flag}: config.dp is in sections now; use --config.dp.secret.{old_secret}"
    return f"{flag}: no such config field; see the config file for valid keys"


def _stop(error: BaseException) -> None:
    logging.info("run ended: %s: %s", type(error).__name__, error)
    sys.exit(f"dpwave.main: {one_line(error)}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}; overrides look like --config.a.b=value")
    workdir = _WORKDIR.value
    try:
        config = _CONFIG.value
        settings_lib.read(config)  # the config's consistency, before anything runs
    except OSError as e:  # ml_collections defers a config file it could not load to the first access
        sys.exit(f"dpwave.main: bad config file: {_last_line(e)}")
    except ValueError as e:
        sys.exit(f"dpwave.main: bad config: {one_line(e)}")
    console.setup(workdir)
    distributed.maybe_initialize_distributed()
    log = console.set_process_index(jax.process_index())
    logging.info("config:\n%s", config)
    try:
        plan = pipeline.prepare(config, workdir)  # writes nothing: its errors are the config's or the data's
    except (OSError, ValueError) as e:
        _stop(e)
    try:
        finished = pipeline.execute(plan, on_hold=console.start_log_file)
    except RUN_ERRORS as e:
        _stop(e)
    if finished and jax.process_index() == 0:
        text = console.summary(workdir, log)
        logging.info("%s", text)
        print(text)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
