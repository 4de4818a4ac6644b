"""The paper's tables as named lists of rows; `python -m experiments.reproduce --table NAME` runs one.

A row is a config spec without its seed (the runner appends `,seed=k`), plus the method and the
target epsilon it stands for (the table's grouping and the plot's axes).
"""

from __future__ import annotations

import dataclasses
import itertools

from experiments.configs import common

EPSILONS = ("1", "10", "inf")


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: `label` (also its workdir name), config file + variant, method, target epsilon."""

    label: str
    config: str
    method: str
    epsilon: str

    @property
    def spec(self) -> str:
        """The `--config` value without the seed, e.g. `.../mnist.py:demo,method=dpwave,epsilon=1`."""
        path, _, variant = self.config.partition(":")
        args = ",".join(filter(None, (variant, f"method={self.method}", f"epsilon={self.epsilon}")))
        return f"{path}:{args}"

    @property
    def epsilon_value(self) -> float:
        return common.epsilon_value(self.epsilon)


def grid(config: str, methods: tuple[str, ...], epsilons: tuple[str, ...]) -> tuple[Row, ...]:
    """Every method at every epsilon, labelled `<method>_eps<epsilon>`."""
    return tuple(Row(f"{m}_eps{e}", config, m, e) for m, e in itertools.product(methods, epsilons))


def _paper(config: str) -> tuple[Row, ...]:
    """DP methods at epsilon 1 and 10, plus the non-private reference (full_dp at epsilon inf)."""
    reference = Row("nonprivate", config, "nonprivate", "inf")
    return grid(config, ("dpwave", "full_dp"), ("1", "10")) + (reference,)


TABLES: dict[str, tuple[Row, ...]] = {
    "mnist_cpu": grid("experiments/configs/mnist.py:demo", common.METHODS, EPSILONS),
    "mnist_shift": grid("experiments/configs/mnist.py:shift", common.METHODS, EPSILONS),
    "mnist_tiny": grid("experiments/configs/mnist.py:tiny", common.METHODS, EPSILONS),
    "celeba_paper": _paper("experiments/configs/mm_celeba_hq.py"),
    "coco_paper": _paper("experiments/configs/coco.py"),
}


def get_table(name: str) -> tuple[Row, ...]:
    """The rows of table `name`; an unknown name is a ValueError listing the known tables."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known tables: {sorted(TABLES)}")
    return TABLES[name]
