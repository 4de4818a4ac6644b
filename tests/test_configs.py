"""Experiment configs: every documented command's config loads (through absl, locked), typos and
unknown `:arg` keys fail, the paper configs describe the data and models they claim. No pipeline run."""
import ast
import re
from pathlib import Path

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from dpwave import privacy
from dpwave.data import require_public
from dpwave.train import settings
from dpwave.train.ar_examples import init_transformer
from experiments.configs import coco, common, mm_celeba_hq, recipes
from experiments.configs.tables import TABLES
from helpers.trees import smoke_args, write_smoke_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
# The config files: the modules defining get_config (common.py, paper.py, recipes.py and tables.py are shared parts).
CONFIG_FILES = sorted(p for p in (REPO / "experiments" / "configs").glob("*.py") if "def get_config(" in p.read_text())
PAPER = {"mm_celeba_hq": mm_celeba_hq, "coco": coco}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths in commands are relative to the repository root


def load_config(spec: str, *overrides: str):
    """Loads `spec` exactly as `python -m dpwave.main --config=spec [overrides]` does."""
    argv = ["dpwave.main", f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def documented_specs(path: Path) -> list[str]:
    """The `--config=` values of the commands in a config file's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return [m.rstrip("\\'\"") for m in re.findall(r"--config=(\S+\.py(?::\S+)?)", doc)]


def all_documented_specs() -> list[str]:
    return [spec for path in CONFIG_FILES for spec in documented_specs(path)]


def test_every_config_file_documents_its_commands():
    assert {p.stem for p in CONFIG_FILES} >= {"mm_celeba_hq", "coco"}
    for path in CONFIG_FILES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "python -m dpwave.main" in doc, path
        own = f"experiments/configs/{path.name}"
        assert any(s.split(":")[0] == own for s in documented_specs(path)), path


@pytest.mark.parametrize("spec", all_documented_specs())
def test_documented_command_loads_locked(spec):
    config = load_config(spec)
    assert config.is_locked
    with pytest.raises(AttributeError, match="target_epsilonn"):
        config.dp.target_epsilonn = 1.0
    with pytest.raises(AttributeError, match="target_epsilonn"):
        load_config(spec, "--config.dp.target_epsilonn=1")
    assert load_config(spec, "--config.dp.mechanism.steps=7").dp.mechanism.steps == 7


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_unknown_arg_key_fails_clearly(path):
    spec = documented_specs(path)[0]
    with pytest.raises(flags.IllegalFlagValueError, match="unknown config arg 'bogus_key'"):
        load_config(f"{spec},bogus_key=1" if ":" in spec else f"{spec}:bogus_key=1")


@pytest.mark.parametrize("table, row", [(t, r) for t, rows in TABLES.items() for r in rows],
                         ids=lambda x: x if isinstance(x, str) else x.label)
def test_every_table_row_loads_with_its_method_and_epsilon(table, row):
    extra = ",manual_dir=/data/raw" if table.endswith("_paper") else ""
    config = load_config(f"{row.spec}{extra},seed=3")
    assert config.seed == 3
    assert config.dp.mechanism.target_epsilon == row.epsilon_value
    assert config.method == ("full_dp" if row.method == "nonprivate" else row.method)


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.parametrize("arg, message", [
    ("method=nonprivate,epsilon=1", "method=nonprivate trains without DP but epsilon=1"),
    ("method=dp_sgd", "method='dp_sgd'; use one of"),
    ("epsilon=0", "epsilon='0' must be > 0"),
    ("epsilon=-1", "epsilon='-1' must be > 0"),
    ("smoke", "smoke needs manual_dir"),
    ("smok,manual_dir=/x", "unknown variant 'smok'"),
])
def test_paper_config_rejects_bad_args(name, arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PAPER[name].get_config(arg)


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_defaults_and_nonprivate(name):
    default = PAPER[name].get_config("manual_dir=/raw")
    assert (default.method, default.dp.mechanism.target_epsilon) == ("dpwave", 1.0)
    nonprivate = PAPER[name].get_config("method=nonprivate,manual_dir=/raw")
    assert (nonprivate.method, nonprivate.dp.mechanism.target_epsilon) == ("full_dp", float("inf"))
    assert PAPER[name].get_config("method=nonprivate,epsilon=inf").dp.mechanism.target_epsilon == float("inf")
    bicubic = PAPER[name].get_config("method=bicubic,epsilon=10,seed=4")
    assert (bicubic.method, bicubic.dp.mechanism.target_epsilon, bicubic.seed) == ("bicubic", 10.0, 4)


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_data_respects_the_privacy_boundary(name):
    module = PAPER[name]
    config = module.get_config("manual_dir=/raw")
    specs = settings.read(config).data.specs
    private_name = {"mm_celeba_hq": "mm_celeba_hq", "coco": "coco_captions"}[name]
    assert (specs["private"].name, specs["private"].split) == (private_name, "train")
    assert specs["public"].name == "image_folder"
    assert specs["public"].manual_dir == f"/raw/{module.PUBLIC_SUBDIR}" != specs["private"].manual_dir
    assert "celeb" not in specs["public"].manual_dir.lower()  # CelebA-HQ is a subset of CelebA
    for role in ("heldout", "test"):  # evaluation reads the release's other split, never train
        assert specs[role].name == private_name and "train" not in specs[role].split
    assert {(s.resolution, s.channels, s.data_dir) for s in specs.values()} == {(256, 3, None)}
    assert (config.data.condition, config.data.num_classes) == ("caption", None)
    assert config.sample.prompts == "heldout"


@pytest.mark.parametrize("name", PAPER)
@pytest.mark.parametrize("smoke, coarse, tokens", [(False, 32, 256), (True, 4, 16)])
def test_paper_config_models_fit_the_image(name, smoke, coarse, tokens):
    arg = "smoke,manual_dir=/raw" if smoke else "manual_dir=/raw"
    config = settings.read(PAPER[name].get_config(arg))
    tok = config.tokenizer.model
    assert tok.band_shapes[0] == (coarse, coarse, 3)
    assert tok.tokens_per_scale == (tokens,) * 4
    assert config.refiner.model.levels == 3
    coarse_model = config.transformer
    full_model = settings.read(PAPER[name].get_config(arg + ",method=full_dp")).transformer
    assert (coarse_model.seq_len, full_model.seq_len) == (tokens, 4 * tokens)
    assert coarse_model.conditioning == full_model.conditioning == "text"
    if not smoke:
        assert (coarse_model.width, coarse_model.depth, coarse_model.dtype) == (1024, 24, "bfloat16")
        assert config.dp.mechanism.expected_batch_size == 4096


def flat_keys(config) -> set[str]:
    def walk(d, prefix):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return set(walk(config.to_dict(), ""))


@pytest.mark.parametrize("spec", all_documented_specs())
def test_configs_override_values_never_add_keys(spec):
    assert flat_keys(load_config(spec)) == flat_keys(common.base_config())


def test_docstrings_record_the_paper_anchors():
    assert "33.27" in mm_celeba_hq.__doc__ and "57.01" in mm_celeba_hq.__doc__
    for module in PAPER.values():
        for needed in ("Paper row", "Sized for", "Expected result", "Expected cost",
                       "python -m dpwave.main"):
            assert needed in module.__doc__, (module.__name__, needed)


@pytest.mark.parametrize("name", PAPER)
def test_smoke_variant_reads_the_fixture_tree(name, tmp_path):
    root = write_smoke_tree(name, tmp_path / "raw", n=6)
    spec = smoke_args(name, root)
    config = settings.read(load_config(spec)).data
    assert spec == f"experiments/configs/{name}.py:smoke,manual_dir={root}"
    private = config.load("private")
    assert private.privacy == "private" and len(private) == 6
    example = private[0]
    assert example["image"].shape == (32, 32, 3) and example["caption"]
    with pytest.raises(ValueError, match="trains without DP"):
        require_public(private, "AR pretraining")
    public = config.load("public")
    require_public(public, "AR pretraining")
    assert len(public) == 6 and public[0]["caption"].startswith("public image")
    assert public[0]["image"].shape == (32, 32, 3)
    assert len(config.load("heldout")) + len(config.load("test")) == 5
    assert (tmp_path / "raw" / "tfds").is_dir()  # smoke prepares next to the fixture, not in ~


def test_smoke_args_refuses_commas_and_unknown_configs(tmp_path):
    with pytest.raises(ValueError, match="contains a comma"):
        smoke_args("coco", tmp_path / "a,b")
    with pytest.raises(ValueError, match="unknown paper config 'mnist'"):
        smoke_args("mnist", tmp_path)


def test_mnist_public_control_subsampling_and_tuning_variants():
    public = load_config("experiments/configs/mnist.py:shift,epsilon=public")
    assert public.dp.mechanism.target_epsilon == 0.0 and public.data.public.labels == (0, 1, 2, 3, 4)
    assert load_config("experiments/configs/mnist.py:shift,n_private=500").data.private.split == "private[:500]"
    with pytest.raises(flags.IllegalFlagValueError, match="n_private=2001"):
        load_config("experiments/configs/mnist.py:shift,n_private=2001")
    tune = load_config("experiments/configs/mnist.py:tune,epsilon=1")
    shift = load_config("experiments/configs/mnist.py:shift,epsilon=1")
    # The tuning run is the shift run with a public stand-in for the private digits, and nothing else.
    assert (tune.dp.mechanism.tuning, tune.dp.mechanism.tuning_private_size) == (True, 2000)
    specs = settings.read(tune).data.specs
    assert {role: spec.privacy for role, spec in specs.items()} == dict.fromkeys(settings.ROLES, "public")
    assert specs["private"].split == "heldout"
    with tune.unlocked(), shift.unlocked():
        for c in (tune, shift):
            c.data.private = None
            c.dp.mechanism.tuning, c.dp.mechanism.tuning_private_size = False, 0
    assert tune.to_json_best_effort() == shift.to_json_best_effort()
    assert load_config("experiments/configs/mnist.py:tune,n_private=500").dp.mechanism.tuning_private_size == 500


def test_mnist_style_variant_restyles_every_role_but_public_and_is_the_shift_run_otherwise():
    style = load_config("experiments/configs/mnist.py:style,epsilon=1")
    shift = load_config("experiments/configs/mnist.py:shift,epsilon=1")
    specs = settings.read(style).data.specs
    assert {role: spec.name for role, spec in specs.items()} == {
        "public": "mnist5k", "private": "mnist5k_style", "heldout": "mnist5k_style", "test": "mnist5k_style"}
    assert specs["public"].labels is None and specs["private"].privacy == "private"
    with style.unlocked(), shift.unlocked():
        for c in (style, shift):
            c.data = None
    assert style.to_json_best_effort() == shift.to_json_best_effort()  # same recipe and sizes


PRIVATE_SIZES = {"mnist.py": 2000, "coco.py": 118_287, "mm_celeba_hq.py": 24_000}


@pytest.mark.parametrize("spec", ["mnist.py:demo", "mnist.py:shift,epsilon=1", "mnist.py:style", "mnist.py:tune",
                                  "mnist.py:tiny", "coco.py:epsilon=1", "mm_celeba_hq.py:epsilon=10"])
def test_every_config_a_user_starts_from_runs_the_default_recipe(spec):
    c = load_config(f"experiments/configs/{spec}")
    default = recipes.RECIPES[recipes.DEFAULT]
    assert (c.dp.recipe.optimizer, c.dp.recipe.trainable, c.dp.recipe.cond_dropout) == (
        default["optimizer"], default["trainable"], default["cond_dropout"])
    assert c.dp.recipe.learning_rate == pytest.approx(default["learning_rate"](c, PRIVATE_SIZES[spec.split(":")[0]]))
    assert c.sample.temperature == (0.8 if c.dp.mechanism.target_epsilon >= 10 else 1.0)


@pytest.mark.parametrize("epsilon, temperature", [("1", 1.0), ("4", 1.0), ("10", 0.8), ("inf", 0.8),
                                                  ("public", 1.0)])
def test_the_default_samples_at_temperature_08_from_epsilon_10(epsilon, temperature):
    assert load_config(f"experiments/configs/mnist.py:shift,epsilon={epsilon}").sample.temperature == temperature
    named = load_config(f"experiments/configs/mnist.py:shift,epsilon={epsilon},recipe=sgd_drop")
    assert named.sample.temperature == 1.0  # another recipe keeps the config's sampling


def test_learning_rate_rule_scales_with_the_noise_per_example_squared():
    """lr = base min(1, (r / (sigma / B))^2): base at the tuned setting and below its noise; at a fixed q and
    steps (so the same sigma), half the batch means a quarter of the learning rate."""
    rule = recipes.noise_scaled_lr(0.3, recipes.TUNED_AT)
    c = load_config("experiments/configs/mnist.py:shift,epsilon=10")
    with c.unlocked():
        assert rule(c, 2000) == pytest.approx(0.3)  # the tuned setting itself
        c.dp.mechanism.expected_batch_size = 512
        assert rule(c, 1000) == pytest.approx(0.3 / 4, rel=1e-6)
        c.dp.mechanism.target_epsilon = 1.0
        at_eps1 = rule(c, 1000)
        sigma = lambda eps: privacy.calibrate_noise(eps, 1e-5, 0.512, 150)
        assert at_eps1 == pytest.approx(0.3 / 4 * (sigma(10.0) / sigma(1.0)) ** 2, rel=1e-6)
        c.dp.mechanism.target_epsilon = 64.0
        c.dp.mechanism.expected_batch_size = 1024
        assert rule(c, 2000) == 0.3  # less noise than the tuned setting: capped at base
        c.dp.mechanism.target_epsilon = float("inf")
        assert rule(c, 2000) == 0.3


def test_scanned_blocks_reach_both_transformers_and_stack_the_dp_models_weights():
    read = settings.read(load_config("experiments/configs/mnist.py:tiny", "--config.transformer.scan_blocks=True"))
    assert read.transformer.scan_blocks and read.dp_transformer.scan_blocks
    _, params = init_transformer(read.dp_transformer, jax.random.key(0))
    assert params["blocks"]["mlp"]["fc1"]["kernel"].value.shape[0] == read.dp_transformer.depth
