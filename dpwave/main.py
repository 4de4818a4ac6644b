"""dpwave entry point.

    python -m dpwave.main --config=experiments/configs/mnist.py:demo --workdir=workdir/demo \
        [--config.dp.target_epsilon=1]

Rerunning with the same workdir resumes (stage and step); there is no --resume flag.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dpwave.train import distributed, pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}; overrides look like --config.a.b=value")
    distributed.maybe_initialize_distributed()
    logging.info("config:\n%s", _CONFIG.value)
    pipeline.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
