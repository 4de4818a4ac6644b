"""The paper's tables as named lists of rows; `python -m experiments.reproduce --table NAME` runs one, and `curve`
makes the privacy-utility curve of any config (`--table curve --config=SPEC`).

A row is a config spec without its seed (the runner appends `,seed=k`), plus the method and the
target epsilon it stands for (the table's grouping and the plot's axes). Every method has two controls
next to its DP rows: epsilon inf (no noise: what the DP stage could reach) and `public` (the public-only
control: no DP stage, the pretrained model sampled; what the DP stage must beat to earn its epsilon).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from experiments.configs import common

PUBLIC = "public"  # the epsilon of the public-only control (dp.mechanism.target_epsilon = 0)
CONTROLS = ("inf", PUBLIC)
EPSILONS = ("1", "10", *CONTROLS)
CURVE_EPSILONS = ("0.5", "1", "2", "4", "8", "10", "16", *CONTROLS)  # 1, 10 and the controls: the shift rows
CURVE_DEFAULT = ("1", "4", "10")  # the epsilons of `curve` unless --epsilons says otherwise
SCALING_SIZES = (500, 1000)  # and all 2,000: the shift table's own rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: `label` (also its workdir name), config file + variant, method, target epsilon, and
    `setting`: more `:arg` pairs (e.g. `n_private=500`), shown in the table as `shown_setting` when that is given
    (a row that runs the variant's default but stands for a setting, e.g. all private data).

    A post-processing row (`resample`) samples the trained models of row `resamples`, seed by seed, with other
    `sampling` settings (`sample.KEY=VALUE` overrides): the same DP model, so no further epsilon."""

    label: str
    config: str
    method: str
    epsilon: str
    setting: str = ""
    shown_setting: str = ""
    sampling: tuple[str, ...] = ()
    resamples: str = ""

    def __post_init__(self):
        if bool(self.sampling) != bool(self.resamples):
            raise ValueError(f"row {self.label}: sampling and resamples go together")
        if bad := [o for o in self.sampling if not re.fullmatch(r"sample\.\w+=\S+", o)]:
            raise ValueError(f"row {self.label}: {bad} are not sample.KEY=VALUE settings (post-processing only)")

    @property
    def setting_label(self) -> str:
        sampling = " ".join(o.removeprefix("sample.") for o in self.sampling)
        return " ".join(filter(None, (self.shown_setting or self.setting, sampling)))

    @property
    def spec(self) -> str:
        """The `--config` value without the seed, e.g. `.../mnist.py:demo,method=dpwave,epsilon=1`."""
        path, _, variant = self.config.partition(":")
        args = ",".join(filter(None, (variant, self.setting, f"method={self.method}", f"epsilon={self.epsilon}")))
        return f"{path}:{args}"

    @property
    def epsilon_value(self) -> float:
        return common.epsilon_value(self.epsilon)

    @property
    def is_control(self) -> bool:
        """epsilon inf (no noise) or the public-only control: drawn as reference lines, not on the epsilon axis."""
        return self.epsilon in CONTROLS


def label(method: str, epsilon: str, setting: str = "") -> str:
    """`<method>[_<setting>]_eps<epsilon>`, or `<method>[_<setting>]_public` for the public-only control, whose
    label drops the settings of the DP stage and the private data (`n_private`, `recipe`): it reads neither."""
    parts = [p for p in setting.split(",") if p]
    if epsilon == PUBLIC:
        parts = [p for p in parts if not p.startswith(("n_private=", "recipe="))]
    middle = "_".join(parts).replace("n_private=", "n").replace("recipe=", "").replace("pretrain_steps=", "pre")
    return "_".join(filter(None, (method, middle.replace("=", ""), "public" if epsilon == PUBLIC else f"eps{epsilon}")))


def resample(row: Row, **sampling: float) -> Row:
    """`row`'s trained models sampled with other `sample` settings (e.g. guidance_scale=2.0): post-processing."""
    suffix = "_".join(f"{key.split('_')[0]}{value:g}" for key, value in sampling.items())
    return dataclasses.replace(row, label=f"{row.label}_{suffix}", resamples=row.label,
                               sampling=tuple(f"sample.{key}={value}" for key, value in sampling.items()))


def grid(config: str, methods: tuple[str, ...], epsilons: tuple[str, ...]) -> tuple[Row, ...]:
    """Every method at every epsilon."""
    return tuple(Row(label(m, e), config, m, e) for m, e in itertools.product(methods, epsilons))


def curve(config: str, epsilons: tuple[str, ...] = CURVE_DEFAULT, methods: tuple[str, ...] = ("dpwave",)
          ) -> tuple[Row, ...]:
    """The privacy-utility curve of any config spec (`python -m experiments.reproduce --table curve
    --config=SPEC`): per method, the public-only control, each of `epsilons` and the non-private reference (epsilon
    inf), so a data owner sees what each epsilon buys before releasing a model. The config must take `method=`,
    `epsilon=` and `seed=` args (folder.py, mnist.py). Every row but the public-only control trains on the private
    data and spends its own epsilon, and the epsilon-inf row is not private: the curve is for the data owner, and a
    release chosen by looking at it is covered by no finite epsilon (docs/your_images.md; choose on a public
    stand-in, docs/tuning.md)."""
    return grid(config, methods, (PUBLIC, *epsilons, "inf"))


def _paper(config: str) -> tuple[Row, ...]:
    """DP methods at epsilon 1 and 10, their public-only controls, and the non-private reference (full_dp at
    epsilon inf)."""
    reference = Row("nonprivate", config, "nonprivate", "inf")
    return grid(config, ("dpwave", "full_dp"), ("1", "10", PUBLIC)) + (reference,)


def _scaling(config: str) -> tuple[Row, ...]:
    """dpwave at epsilon 1 and 10 on the first N private digits, N in SCALING_SIZES and all of them (the rows
    of the shift table itself, so a workdir shared with it runs them once), and the public-only control."""
    rows = [Row(label("dpwave", e, f"n_private={n}"), config, "dpwave", e, f"n_private={n}")
            for n in SCALING_SIZES for e in ("1", "10")]
    everything = [Row(label("dpwave", e), config, "dpwave", e, shown_setting="n_private=2000") for e in ("1", "10")]
    return (*rows, *everything, Row(label("dpwave", PUBLIC), config, "dpwave", PUBLIC))


def _fair(config: str) -> tuple[Row, ...]:
    """dpwave and the full-DP baseline with the same AR pretraining steps (the shift table's rows) and the baseline
    with the same AR pretraining FLOPs as dpwave (MATCHED_PRETRAIN), each at epsilon 1, 10 and its controls."""
    same = tuple(dataclasses.replace(r, shown_setting="pretrain_steps=800")
                 for r in grid(config, ("dpwave", "full_dp"), EPSILONS))
    matched = tuple(Row(label("full_dp", e, MATCHED_PRETRAIN), config, "full_dp", e, MATCHED_PRETRAIN)
                    for e in EPSILONS)
    return same + matched


def _tune() -> tuple[Row, ...]:
    """The recipe search on the public stand-in (docs/tuning.md): each (method, recipe) at the epsilons it was
    scored at, and the shift setup's public-only controls (the stand-in changes only the DP stage)."""
    rows = [Row(label(m, e, f"recipe={r}"), TUNE, m, e, f"recipe={r}") for m, r, eps in TUNE_SEARCH for e in eps]
    return (*rows, *grid(SHIFT, ("dpwave", "full_dp", "dp_diffusion"), (PUBLIC,)))


SHIFT = "experiments/configs/mnist.py:shift"
STYLE = "experiments/configs/mnist.py:style"
# In the shift config full DP's AR model costs 3.81x dpwave's per training example (48 tokens vs 16, XLA's count;
# tests/test_reproduce.py checks it), so 800 / 3.81 = 210 pretraining steps give it dpwave's pretraining FLOPs.
MATCHED_PRETRAIN = "pretrain_steps=210"
TUNE = "experiments/configs/mnist.py:tune"
# (method, recipe of experiments/configs/recipes.py, epsilons): the search, in the order it was run.
TUNE_SEARCH = (
    ("dpwave", "all", ("1", "10", "inf")),
    ("dpwave", "all_nodrop", ("1", "10")),
    ("dpwave", "cond", ("1", "10", "inf")),
    ("dpwave", "cond_lora", ("1", "10", "inf")),
    ("dpwave", "cond_lora_ema", ("1", "10")),
    ("dpwave", "cond_norm_head", ("1", "10")),
    ("dpwave", "all_b1024", ("10",)),
    ("dpwave", "lora16_b1024", ("10",)),
    ("dpwave", "lora16_b1024_lr1e2", ("10",)),
    ("dpwave", "all_sgd_b1024", ("1", "4", "10")),
    ("dpwave", "all_sgd_b1024_lr1", ("10",)),
    ("dpwave", "all_sgd_b1024_lr01", ("1", "2", "4", "10")),
    ("dpwave", "all_sgd_b1024_lr003", ("1", "2")),
    ("dpwave", "all_sgd_b1024_lr001", ("1",)),
    ("dpwave", "all_sgd_b1024_lr0003", ("1",)),
    ("dpwave", "all_sgd_b1024_ema", ("10",)),
    ("dpwave", "all_sgd_b256", ("10",)),
    ("dpwave", "cond_sgd_b1024", ("1", "10")),
    ("dpwave", "cond_lora4_sgd_b1024", ("1", "10")),
    ("full_dp", "all", ("10", "inf")),
    ("full_dp", "all_sgd_b1024", ("10",)),
    ("dp_diffusion", "sgd_drop", ("10",)),
    ("dp_diffusion", "sgd_drop_lr1", ("10",)),
    ("dp_diffusion", "sgd_drop_lr3", ("10",)),
    ("dp_diffusion", "sgd_drop_lr01", ("10",)),
)
# The ablations of the default recipe on the same stand-in (docs/tuning.md): condition dropout, trained subsets,
# and post-processing of the trained models (guidance, temperature), the public-only control included.
ABLATE_RECIPES = (("sgd", ("1", "10", "inf")), ("sgd_drop", ("1", "10")), ("sgd_attn", ("10",)), ("sgd_mlp", ("10",)))
ABLATE_SAMPLING = (dict(guidance_scale=2.0), dict(temperature=0.8))


def _ablate() -> tuple[Row, ...]:
    """ABLATE_RECIPES at their epsilons, the public-only control, and ABLATE_SAMPLING applied to the models of
    the finite-epsilon recipe rows with condition dropout on and off and of the control."""
    trained = [Row(label("dpwave", e, f"recipe={r}"), TUNE, "dpwave", e, f"recipe={r}")
               for r, eps in ABLATE_RECIPES for e in eps]
    public = Row(label("dpwave", PUBLIC), SHIFT, "dpwave", PUBLIC)
    sources = [r for r in trained if r.setting in ("recipe=sgd", "recipe=sgd_drop") and not r.is_control]
    return (*trained, public, *(resample(r, **s) for r in (*sources, public) for s in ABLATE_SAMPLING))


def _post(config: str) -> tuple[Row, ...]:
    """dpwave at epsilon 1, 10 and the public-only control, and each of their models sampled again with
    ABLATE_SAMPLING (post-processing: no further epsilon; a workdir shared with the table of `config` reuses its
    runs)."""
    rows = grid(config, ("dpwave",), ("1", "10", PUBLIC))
    return (*rows, *(resample(r, **s) for r in rows for s in ABLATE_SAMPLING))


TABLES: dict[str, tuple[Row, ...]] = {
    "mnist_cpu": grid("experiments/configs/mnist.py:demo", common.METHODS, EPSILONS),
    "mnist_shift": grid(SHIFT, common.METHODS, EPSILONS),
    # The style shift: public digits upright and thin, private/heldout/test italic and thick, all ten classes.
    "mnist_style": grid(STYLE, common.METHODS, EPSILONS),
    # The shift table's dpwave models sampled with guidance 2 and temperature 0.8 (post-processing).
    "mnist_shift_post": _post(SHIFT),
    # FD-cls and downstream accuracy against epsilon, with both controls (the shift variant).
    "mnist_curve": grid(SHIFT, ("dpwave", "full_dp", "dp_merf", "dpwave_merf", "dp_diffusion"), CURVE_EPSILONS),
    # The full-DP baseline with the same pretraining steps and with the same pretraining FLOPs as dpwave.
    "mnist_fair": _fair(SHIFT),
    # How much private data the DP stage needs to earn its epsilon (the shift variant's recipe).
    "mnist_scaling": _scaling(SHIFT),
    # The recipe search on the public stand-in of the shift table's DP stage (docs/tuning.md): no private
    # epsilon spent.
    "mnist_tune": _tune(),
    "mnist_ablate": _ablate(),
    "mnist_tiny": grid("experiments/configs/mnist.py:tiny", common.METHODS, EPSILONS),
    "celeba_paper": _paper("experiments/configs/mm_celeba_hq.py"),
    "coco_paper": _paper("experiments/configs/coco.py"),
}


def get_table(name: str) -> tuple[Row, ...]:
    """The rows of table `name`; an unknown name is a ValueError listing the known tables."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known tables: {sorted(TABLES)}")
    return TABLES[name]
