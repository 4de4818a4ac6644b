"""A run's settings: the experiment ConfigDict read ONCE, here, into frozen and validated dataclasses.

Nothing else in dpwave reads a ConfigDict. Each stage declares the settings it reads (`Stage.inputs`); its
fingerprint is their JSON plus the fingerprints of the stages it consumes. Settings no stage reads (`perf`,
`ops`, where the DP secret seed comes from, `dp.operations`) never make a finished stage stale.

Each config section is read into the dataclass of its name, key by key: a key the dataclass lacks is an error,
not dropped (config.dp's sections mechanism, recipe, secret and operations are `Dp`'s four fields).

`read` raises a ValueError naming the config key (or section) at fault; `Settings.check_dp_input` is the one check
that needs the data (the DP input's size), made before the first stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from dpwave import data, privacy
from dpwave.privacy import planning
from dpwave.data import near_duplicates, overlap
from dpwave.models import transformer as transformer_lib
from dpwave.models.pixel_flow import PixelFlowConfig
from dpwave.models.refiner import RefinerConfig
from dpwave.models.tokenizer import TokenizerConfig
from dpwave.models.transformer import TransformerConfig
from dpwave.generation import METHODS as AR_METHODS

MERF_METHODS = ("dp_merf", "dpwave_merf")  # DP-MERF in pixel space; its release on the coarse band + the refiner
DIFFUSION = "dp_diffusion"  # a pixel-space flow model, pretrained on public data and DP-SGD finetuned
METHODS = (*AR_METHODS, *MERF_METHODS, DIFFUSION)
ROLES = ("public", "private", "heldout", "test")
CONDITIONS = ("label", "caption", "none")
PROMPTS = ("labels", "heldout")
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Image size, conditioning and the dataset of each role (`ROLES`) at that size."""

    image_size: int
    channels: int
    condition: str  # label | caption | none
    num_classes: int | None  # label conditioning only
    specs: Mapping[str, data.DatasetSpec]
    near_copy_threshold: float = overlap.DEFAULT_THRESHOLD  # the content check's (`overlap.check_disjoint`)

    def load(self, role: str) -> data.Source:
        return data.load(self.specs[role], role=f"config.data.{role}")

    @property
    def holds_private(self) -> bool:
        """Whether the private role is tagged private: every mode but tuning, whose DP input is a public
        stand-in (`_dataset_spec` allows no other combination)."""
        return self.specs["private"].privacy == "private"

    def check_boundary(self) -> dict[str, overlap.PixelHashes]:
        """Run-start check of every role, in every mode (dp, epsilon inf, the public-only control, tuning).

        Each role is opened once, which resolves its split expression (`all`, `a+b`, slices) into the splits it
        reads and refuses a public tag on any private one. Then, when the private role holds private data, its
        pixels are hashed (read for this only: the public-only control trains nothing on them) and no image of
        the private set may be in a role read without DP (public; heldout, whose captions are also the sampling
        prompts; test). A tuning run names no private data (its private role is a public stand-in), so it has
        no content check: every role is public-tagged and split-checked.

        Returns:
          The pixel hashes, "private" first then by role; empty for a tuning run.

        Raises:
          SplitExpressionError, PrivateSplitError, PrivateOverlapError, ValueError: naming the role.
        """
        sources = {role: data.load(dataclasses.replace(self.specs[role], in_memory=False), role=f"config.data.{role}")
                   for role in ROLES}
        private = sources.pop("private")
        if not self.holds_private:
            return {}
        cache = overlap.cache_path(private)  # the closest pairs name private images: reported beside their cache
        return overlap.check_disjoint(private, {f"config.data.{role}": s for role, s in sources.items()},
                                      threshold=self.near_copy_threshold,
                                      report_dir=None if cache is None else os.path.dirname(cache))


@dataclasses.dataclass(frozen=True)
class Training:
    """The optimization of a public stage. `init_params_from`: a finished stage directory of the same stage, or a
    workdir holding one, whose parameters (only: no optimizer state, no step) the stage starts from."""

    steps: int
    batch_size: int
    learning_rate: float
    init_params_from: str | None


@dataclasses.dataclass(frozen=True)
class ModelTraining:
    """A model and its `Training` (the tokenizer's and the refiner's config sections)."""

    model: Any  # TokenizerConfig | RefinerConfig
    steps: int
    batch_size: int
    learning_rate: float
    init_params_from: str | None

    @property
    def training(self) -> Training:
        return Training(self.steps, self.batch_size, self.learning_rate, self.init_params_from)


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """The DP mechanism's settings (config.dp.mechanism): what the privacy guarantee depends on.

    `target_epsilon`: > 0 calibrates sigma so that `steps` steps stay within it; inf is the non-private
    reference (sigma 0, still clipped); 0 is the public-only control (no DP stage). `tuning` runs the DP stage on
    a public stand-in with the q and sigma/B of a private run of `tuning_private_size` examples (docs/tuning.md).
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float | None
    l2_clip: float
    expected_batch_size: int
    steps: int
    accountant: str
    neighboring: str
    allow_large_delta: bool
    tuning: bool
    tuning_private_size: int

    @property
    def public_only(self) -> bool:
        return self.target_epsilon == 0

    def simulated_size(self, dataset_size: int) -> int:
        """The N that sets q = expected batch / N: the private run's size that a tuning run stands in for, else
        the DP input's own size."""
        return self.tuning_private_size if self.tuning and self.tuning_private_size else dataset_size

    def sampling(self, dataset_size: int, single_release: bool) -> tuple[float, int]:
        """(q, steps): expected batch / N over `steps` DP-SGD steps, or (1, 1) for one release of the whole set
        (DP-MERF's embedding; `expected_batch_size` and `steps` are then unused)."""
        return (1.0, 1) if single_release else (self.expected_batch_size / dataset_size, self.steps)

    def check(self, dataset_size: int, single_release: bool = False) -> None:
        """Refuses what `build(dataset_size)` would refuse, in words of the config: an expected batch larger than
        the set it samples from, a delta >= 1/N, a sigma or epsilon out of range."""
        simulated = self.simulated_size(dataset_size)
        if not single_release and self.expected_batch_size > simulated:
            more = ("raise dp.mechanism.tuning_private_size" if simulated != dataset_size else
                    "give config.data.private more examples")
            raise ValueError(f"dp.mechanism.expected_batch_size={self.expected_batch_size} is larger than the "
                             f"{simulated} examples it samples from (Poisson sampling probability "
                             f"{self.expected_batch_size / simulated:.3g} > 1); lower dp.mechanism.expected_batch_size "
                             f"(well below {simulated}) or {more}")
        try:
            self.build(dataset_size, single_release)
        except ValueError as e:
            raise ValueError(f"config.dp over the {dataset_size} examples of config.data.private: {e}") from None

    def build(self, dataset_size: int, single_release: bool = False) -> privacy.DpSgdMechanism:
        """The DP stage's mechanism over a DP input of `dataset_size` examples; with `single_release`, one step of
        q = 1 and C = 1 (the DP-MERF release, `privacy.mean_embedding`)."""
        simulated = self.simulated_size(dataset_size)
        q, steps = self.sampling(simulated, single_release)
        sigma = planning.run_noise_multiplier(self.target_epsilon, self.delta, q, steps, accountant=self.accountant,
                                              neighboring=self.neighboring, given=self.noise_multiplier)
        return privacy.DpSgdMechanism(1.0 if single_release else self.l2_clip, privacy.DpParams(
            noise_multiplier=sigma * planning.tuning_noise_scale(dataset_size, simulated),
            sampling_prob=float(q), delta=self.delta, accountant=self.accountant,
            target_epsilon=None if math.isinf(self.target_epsilon) or self.tuning else self.target_epsilon,
            dataset_size=dataset_size, allow_large_delta=self.allow_large_delta, neighboring=self.neighboring))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the DP stage optimizes (config.dp.recipe; dpwave/train/dp_recipe.py): none of it changes the guarantee."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    trainable: str
    lora_rank: int
    lora_targets: str
    lr_schedule: str
    warmup_steps: int
    ema_decay: float
    cond_dropout: float | None


@dataclasses.dataclass(frozen=True)
class Secret:
    """Where the DP secret comes from (config.dp.secret; dpwave/train/secret_seed.py): `seed` is the
    reproducibility mode (not secret) and a stage input; `seed_file` (or the environment, or the OS) is not."""

    seed: int | None
    seed_file: str | None


@dataclasses.dataclass(frozen=True)
class DpOperations:
    """How a DP run is resumed and logged (config.dp.operations); no stage input."""

    compose_on_resume: bool
    log_private_metrics: bool


@dataclasses.dataclass(frozen=True)
class Dp:
    """The DP stage's settings, one field per section of config.dp."""

    mechanism: Mechanism
    recipe: Recipe
    secret: Secret
    operations: DpOperations


DP_SECTIONS = {"mechanism": Mechanism, "recipe": Recipe, "secret": Secret, "operations": DpOperations}


@dataclasses.dataclass(frozen=True)
class Merf:
    """The DP-MERF methods (config.merf; `privacy.mean_embedding`, `models.merf_generator`): the released embedding
    (`num_features`, `count_weight`, `length_scale`: None is the median heuristic on the public split) and the
    generator fitted to it (`code_dim`, `hidden`, `steps`, `batch_size`, `learning_rate`)."""

    num_features: int
    count_weight: float
    length_scale: float | None
    code_dim: int
    hidden: tuple[int, ...]
    steps: int
    batch_size: int
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class Perf:
    """How the DP step computes the clipped sum, not what it computes: `microbatch_size` examples at a time (None:
    the whole batch) and certified ghost norms or materialized per-example gradients. Each path gives the same
    update up to float rounding (tests/privacy/test_clipping.py, test_ghost.py, tests/train/test_parallel.py).
    How the training stages' batches are made: on `input_workers` threads (0: in the loop's thread, when the step
    asks), up to `input_prefetch` steps ahead; every batch is a function of (seed, step), the same for any of these
    (tests/data/test_prefetch.py). None of this is a stage input."""

    microbatch_size: int | None
    use_ghost_norms: bool
    input_workers: int
    input_prefetch: int


@dataclasses.dataclass(frozen=True)
class Sampling:
    num_samples: int
    batch_size: int
    temperature: float
    top_k: int | None
    top_p: float | None
    guidance_scale: float
    prompts: str  # labels: balanced class labels; heldout: captions of the held-out split


@dataclasses.dataclass(frozen=True)
class Evaluation:
    feature_epochs: int
    downstream_epochs: int
    inception_weights: str | None
    num_real: int


@dataclasses.dataclass(frozen=True)
class Ops:
    """Checkpoint and logging frequency: a resumed stage ends bit-identical whatever they are."""

    checkpoint_every: int
    max_to_keep: int
    log_every: int


@dataclasses.dataclass(frozen=True)
class Wavelet:
    name: str
    levels: int
    mode: str


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run reads. `transformer` is the pretrained AR model; `dp_transformer` the DP stage's (the same
    plus its LoRA adapters and condition dropout)."""

    seed: int
    method: str
    data: DataSettings
    wavelet: Wavelet
    tokenizer: ModelTraining
    transformer: TransformerConfig
    pretrain: Training
    dp_transformer: TransformerConfig
    dp: Dp
    merf: Merf
    diffusion: ModelTraining
    refiner: ModelTraining
    sample: Sampling
    eval: Evaluation
    perf: Perf
    ops: Ops

    @property
    def coarse_only(self) -> bool:
        """dpwave and its bicubic ablation model only the coarse band; the full-DP baseline all scales."""
        return self.method != "full_dp"

    @property
    def uses_merf(self) -> bool:
        """The DP-MERF methods: one release of a mean embedding instead of DP-SGD steps."""
        return self.method in MERF_METHODS

    @property
    def public_only(self) -> bool:
        """The public-only control (dp.mechanism.target_epsilon = 0): no DP stage, nothing trains on private data (the
        private split is opened only to hash its pixels for the run-start content check)."""
        return self.dp.mechanism.public_only

    @property
    def mode(self) -> str:
        """public_only, tuning (DP stage on a public stand-in) or dp."""
        return "public_only" if self.public_only else "tuning" if self.dp.mechanism.tuning else "dp"

    def check_dp_input(self) -> None:
        """Refuses, before the first stage, DP settings the DP stage could not build over its input
        (`Mechanism.check`); opens config.data.private for its size only. Nothing to check without a DP stage."""
        if self.public_only:
            return
        spec = dataclasses.replace(self.data.specs["private"], in_memory=False)
        self.dp.mechanism.check(len(data.load(spec, role="config.data.private")), single_release=self.uses_merf)


_PATHS = ("init_params_from", "inception_weights")  # "" (e.g. `--config.eval.inception_weights=`) means None


def _dataclass(cls: type, path: str, section: Mapping[str, Any], **derived: Any) -> Any:
    """`cls` from config section `path`, every key of which is a field of `cls` (`derived` gives the fields the
    section's raw values do not)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"config.{path} has {', '.join(unknown)}, which {cls.__name__} does not read; the keys of "
                         f"config.{path} are {', '.join(sorted(names))}")
    values = {k: (v or None) if k in _PATHS else v for k, v in section.items() if k not in derived}
    return cls(**values, **derived)


def expected_privacy(role: str, tuning: bool) -> str:
    """The tag a role's data must carry: "private" for the private role, except in a tuning run (whose DP input is a
    public stand-in), "public" for every other role."""
    return "private" if role == "private" and not tuning else "public"


def _dataset_spec(config: ml_collections.ConfigDict, role: str) -> data.DatasetSpec:
    section = config.data[role].to_dict()
    for key in ("data_dir", "manual_dir"):
        section[key] = section.get(key) or None
    spec = data.DatasetSpec.from_config({**section, "resolution": config.data.image_size,
                                         "channels": config.data.channels})
    expected = expected_privacy(role, config.dp.mechanism.tuning)
    if spec.privacy != expected:
        why = ("a tuning run (dp.mechanism.tuning) reads no private data: its DP input stands in for it"
               if config.dp.mechanism.tuning else "only the DP stage reads private data")
        raise ValueError(f"config.data.{role} is tagged privacy={spec.privacy!r}; the {role} role must be "
                         f"{expected!r} ({why})")
    return spec


def _transformer(config: ml_collections.ConfigDict, tok: TokenizerConfig, coarse_only: bool, *,
                 finetune: bool) -> TransformerConfig:
    """The AR model over the coarse tokens (dpwave, bicubic) or every scale's tokens (full_dp). `finetune`: the DP
    stage's model, which adds the LoRA adapters of `dp.recipe.lora_rank` and uses `dp.recipe.cond_dropout` when set."""
    model = config.transformer.to_dict()
    if finetune:
        dp = config.dp
        model.update(lora_rank=dp.recipe.lora_rank, lora_targets=dp.recipe.lora_targets)
        if dp.recipe.cond_dropout is not None:
            model["cond_dropout"] = dp.recipe.cond_dropout
    condition = config.data.condition
    if condition != "caption":
        model["max_text_len"] = 0
    if condition == "none":
        model["cond_dropout"] = 0.0
    num_classes = config.data.num_classes if condition == "label" else None
    if coarse_only:
        return TransformerConfig(vocab_size=tok.codebook_size, seq_len=tok.tokens_per_scale[0],
                                 num_classes=num_classes, **model)
    return TransformerConfig(vocab_size=tok.vocab_size, seq_len=tok.scale_boundaries[-1],
                             scale_boundaries=tok.scale_boundaries, num_classes=num_classes, **model)


def _check(config: ml_collections.ConfigDict) -> None:
    """Refuses inconsistent choices before anything is built."""
    _check_run(config)
    _check_ops(config)
    _check_dp(config.dp)
    _check_merf(config.merf)


def _check_merf(merf: ml_collections.ConfigDict) -> None:
    for key in ("num_features", "code_dim", "steps", "batch_size"):
        if isinstance(merf[key], bool) or not isinstance(merf[key], int) or merf[key] < 1:
            raise ValueError(f"config.merf.{key}={merf[key]!r} must be an int >= 1")
    if merf.num_features % 2:
        raise ValueError(f"config.merf.num_features={merf.num_features} must be even (cos and sin halves)")
    if not 0 < merf.count_weight < 1:
        raise ValueError(f"config.merf.count_weight={merf.count_weight!r} must be in (0, 1): the share of the unit "
                         "sensitivity spent on the class counts")
    if merf.length_scale is not None and not (math.isfinite(merf.length_scale) and merf.length_scale > 0):
        raise ValueError(f"config.merf.length_scale={merf.length_scale!r} must be > 0, or None (median heuristic "
                         "on the public split)")
    if not merf.learning_rate > 0:
        raise ValueError(f"config.merf.learning_rate={merf.learning_rate!r} must be > 0")


def _check_ops(config: ml_collections.ConfigDict) -> None:
    for key, value in (("checkpoint.every_steps", config.checkpoint.every_steps),
                       ("checkpoint.max_to_keep", config.checkpoint.max_to_keep),
                       ("log_every_steps", config.log_every_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{key}={value!r} must be an int >= 1")


def _check_run(config: ml_collections.ConfigDict) -> None:
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r} is unknown; use one of {METHODS}")
    d = config.data
    for key in ("image_size", "channels"):
        if not (isinstance(d[key], int) and d[key] >= 1):
            raise ValueError(f"config.data.{key}={d[key]!r}: the config must set it (a positive int)")
    near_duplicates.check_threshold(d.near_copy_threshold, "config.data.near_copy_threshold")
    if d.condition not in CONDITIONS:
        raise ValueError(f"config.data.condition={d.condition!r}; use one of {CONDITIONS}")
    if d.condition == "label" and not (isinstance(d.num_classes, int) and d.num_classes >= 2):
        raise ValueError(f"config.data.num_classes={d.num_classes!r}: label conditioning needs the number of "
                         "classes (>= 2)")
    if config.method in MERF_METHODS and d.condition == "caption":
        raise ValueError(f"config.method={config.method!r} embeds class labels or nothing; caption conditioning "
                         "(config.data.condition='caption') needs an AR method (dpwave, full_dp, bicubic)")
    if config.method == DIFFUSION:
        if d.condition == "caption":
            raise ValueError(f"config.method={DIFFUSION!r} is conditioned on class labels or nothing; caption "
                             "conditioning (config.data.condition='caption') needs an AR method (dpwave, full_dp, "
                             "bicubic)")
        if config.dp.recipe.trainable != "all" or config.dp.recipe.lora_rank:
            raise ValueError(f"config.method={DIFFUSION!r} DP-finetunes every parameter of its pixel model; set "
                             f"dp.recipe.trainable='all' and dp.recipe.lora_rank=0 (got "
                             f"{config.dp.recipe.trainable!r}, {config.dp.recipe.lora_rank}): the other groups name "
                             "transformer parts")
    if config.sample.prompts not in PROMPTS:
        raise ValueError(f"config.sample.prompts={config.sample.prompts!r}; use one of {PROMPTS}")
    microbatch = config.perf.microbatch_size
    if microbatch is not None and not (isinstance(microbatch, int) and microbatch >= 1):
        raise ValueError(f"config.perf.microbatch_size={microbatch!r} must be an int >= 1 or None (whole batch)")
    workers, prefetch = config.perf.input_workers, config.perf.input_prefetch
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"config.perf.input_workers={workers!r} must be an int >= 0 (input threads; 0 makes each "
                         "batch in the loop's thread)")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < max(1, workers):
        raise ValueError(f"config.perf.input_prefetch={prefetch!r} must be an int >= max(1, "
                         f"config.perf.input_workers={workers}) (steps made ahead; fewer leaves workers idle)")


def _check_dp(dp: ml_collections.ConfigDict) -> None:
    m, r = dp.mechanism, dp.recipe
    if not m.target_epsilon >= 0:
        raise ValueError(f"config.dp.mechanism.target_epsilon={m.target_epsilon}: use > 0, inf (non-private "
                         "reference) or 0 (public-only control)")
    if m.target_epsilon == 0 and m.tuning:
        raise ValueError("config.dp.mechanism.tuning needs a DP stage; target_epsilon=0 (the public-only control) "
                         "has none")
    if m.tuning_private_size and not m.tuning:
        raise ValueError(f"config.dp.mechanism.tuning_private_size={m.tuning_private_size} applies only with "
                         "tuning=True")
    if m.tuning_private_size < 0:
        raise ValueError(f"config.dp.mechanism.tuning_private_size={m.tuning_private_size} must be >= 0 (0: the "
                         "proxy's own size)")
    if r.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.dp.recipe.optimizer={r.optimizer!r}; use one of {OPTIMIZERS}")
    if r.weight_decay and r.optimizer != "adamw":
        raise ValueError(f"config.dp.recipe.weight_decay={r.weight_decay} applies only to optimizer='adamw' (got "
                         f"{r.optimizer!r}); set it to 0 or use adamw")
    if r.lr_schedule not in SCHEDULES:
        raise ValueError(f"config.dp.recipe.lr_schedule={r.lr_schedule!r}; use one of {SCHEDULES}")
    if not 0 <= r.warmup_steps <= m.steps:
        raise ValueError(f"config.dp.recipe.warmup_steps={r.warmup_steps} must be in [0, "
                         f"dp.mechanism.steps={m.steps}]")
    if not 0 <= r.ema_decay < 1:
        raise ValueError(f"config.dp.recipe.ema_decay={r.ema_decay} must be in [0, 1) (0: no EMA)")
    groups = transformer_lib.trainable_groups(r.trainable)
    if r.lora_rank and not {"lora", "all"} & set(groups):
        raise ValueError(f"config.dp.recipe.lora_rank={r.lora_rank} adds adapters that trainable={r.trainable!r} "
                         "keeps frozen at zero; add 'lora' to trainable (e.g. 'cond+lora') or set lora_rank=0")


@contextlib.contextmanager
def _section(path: str) -> Iterator[None]:
    """Names config section `path` in a ValueError or TypeError raised while it is read (a model config's own
    checks name its field, not where the config sets it)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if str(e).startswith("config."):
            raise
        raise ValueError(f"config.{path}: {e}") from e


def read(config: ml_collections.ConfigDict) -> Settings:
    """`config` as validated `Settings` (raises ValueError naming the config key or section at fault)."""
    _check(config)
    d, w, dp = config.data, config.wavelet, config.dp
    coarse_only = config.method != "full_dp"
    common = dict(channels=d.channels, levels=w.levels, wavelet=w.name, mode=w.mode)
    with _section("tokenizer.model"):
        tok = TokenizerConfig(image_size=(d.image_size, d.image_size), **common, **config.tokenizer.model.to_dict())
    with _section("diffusion.model"):
        diffusion = PixelFlowConfig(image_size=d.image_size, channels=d.channels,
                                    num_classes=d.num_classes if d.condition == "label" else None,
                                    **config.diffusion.model.to_dict())
    with _section("refiner.model"):
        refiner = RefinerConfig(image_size=d.image_size, num_classes=d.num_classes if d.condition == "label" else None,
                                **common, **config.refiner.model.to_dict())
    specs = {}
    for role in ROLES:
        with _section(f"data.{role}"):
            specs[role] = _dataset_spec(config, role)
    with _section("transformer"):
        transformer = _transformer(config, tok, coarse_only, finetune=False)
    with _section("dp (the DP stage's transformer)"):
        dp_transformer = _transformer(config, tok, coarse_only, finetune=True)
    with _section("sample"):
        sample = config.sample
        transformer_lib.check_sampling(sample.temperature, sample.top_k, sample.top_p, transformer.vocab_size)
    return Settings(
        seed=config.seed, method=config.method,
        data=DataSettings(d.image_size, d.channels, d.condition, d.num_classes if d.condition == "label" else None,
                          specs, d.near_copy_threshold),
        wavelet=Wavelet(w.name, w.levels, w.mode),
        tokenizer=_dataclass(ModelTraining, "tokenizer", config.tokenizer, model=tok),
        transformer=transformer,
        pretrain=_dataclass(Training, "pretrain", config.pretrain),
        dp_transformer=dp_transformer,
        dp=Dp(*(_dataclass(cls, f"dp.{name}", dp[name]) for name, cls in DP_SECTIONS.items())),
        merf=_dataclass(Merf, "merf", config.merf, hidden=tuple(config.merf.hidden)),
        diffusion=_dataclass(ModelTraining, "diffusion", config.diffusion, model=diffusion),
        refiner=_dataclass(ModelTraining, "refiner", config.refiner, model=refiner),
        sample=_dataclass(Sampling, "sample", config.sample), eval=_dataclass(Evaluation, "eval", config.eval),
        perf=_dataclass(Perf, "perf", config.perf),
        ops=Ops(config.checkpoint.every_steps, config.checkpoint.max_to_keep, config.log_every_steps))
