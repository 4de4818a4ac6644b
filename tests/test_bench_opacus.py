"""bench_opacus: the torch twin's size formula without torch; with torch and Opacus (optional, requirements-opacus.txt)
the twin against dpwave's model and one step of each Opacus mode."""

import sys

import numpy as np
import pytest
from flax import nnx

from dpwave.models.transformer import ARTransformer, TransformerConfig
from experiments.bench import bench_dp_step as dp_step
from experiments.bench import bench_opacus as bench


def _torch():
    pytest.importorskip("opacus", reason="optional: pip install -r requirements-opacus.txt")
    return pytest.importorskip("torch")


@pytest.mark.unit
@pytest.mark.parametrize("size_name", ["quick", "full"])
def test_param_count_formula_equals_dpwave_models(size_name):
    size = bench.SIZES[size_name]
    cfg = TransformerConfig(**{k: v for k, v in size.items() if k != "batch"})
    params = nnx.state(nnx.eval_shape(lambda: ARTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    assert bench.param_count(size) == bench.jax_param_count(params)
    if size_name == "full":
        assert bench.param_count(size) == 3_701_504  # the count the docstring quotes


@pytest.mark.unit
def test_missing_torch_exits_with_one_line_naming_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus now raises ImportError
    monkeypatch.setattr(sys, "argv", ["bench_opacus", "--quick", "--omp-wait-policy", "unset"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    message = str(exit_info.value)
    assert "pip install -r requirements-opacus.txt" in message and "\n" not in message


@pytest.mark.integration
def test_torch_twin_matches_dpwave_model_at_quick_size():
    _torch()
    size = bench.SIZES["quick"]
    graphdef, params, batch, _ = dp_step._build(size)
    twin = bench.twin_model(size, params)
    assert sum(p.numel() for p in twin.parameters()) == bench.jax_param_count(params) == bench.param_count(size)
    check = bench.twin_check(graphdef, params, batch, twin)
    assert check["max_logit_diff"] < 1e-4 < check["logit_std"]  # same logits, and they are not all equal
    assert check["loss_torch"] == pytest.approx(check["loss_jax"], abs=1e-5)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Secure RNG turned off")  # Opacus's notice (bench_opacus.main filters it too)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, on Opacus's hooks
@pytest.mark.parametrize("mode", ["opacus_ghost", "opacus_hooks", "torch_non_dp"])
def test_one_torch_step_runs_and_moves_the_parameters(mode):
    torch = _torch()
    torch.manual_seed(0)
    size = bench.SIZES["quick"]
    _, params, batch, _ = dp_step._build(size)
    step, twin = bench.torch_step(mode, size, params, np.asarray(batch["tokens"]))
    loss = step()
    assert loss == pytest.approx(np.log(size["vocab_size"]), abs=0.5)  # near uniform at the 0.02-std init
    moved = np.abs(twin.head.weight.detach().numpy() - np.asarray(params["head"]["kernel"][...]).T)
    assert 0 < moved.max() <= bench.LR * 1.01  # Adam's first step moves a coordinate by at most lr
    assert np.isfinite(step())
