"""dpwave's DP training step beside Opacus's (PyTorch) on the same 3.7M-parameter AR transformer.

    pip install -r requirements-opacus.txt   # optional (torch 2.13.0 CPU build, Opacus 1.6.0): this benchmark only
    python -m experiments.bench.bench_opacus --out /tmp/bench_opacus.json   # full size: about 5 min, idle 2 cores
    python -m experiments.bench.bench_opacus --quick                        # small model: 1 min on 2 busy cores

Model: bench_dp_step's "full" size, dpwave.models.transformer.ARTransformer with vocabulary 1024, sequence 64,
width 256, depth 4, 4 heads, MLP 1024 (3,701,504 parameters); batch 64; Adam (lr 1e-4); flat clipping C = 1; noise
multiplier 1. `--quick` takes bench_dp_step's "quick" size (vocabulary 256, sequence 32, width 64, depth 2, MLP 256,
batch 32; 135,232 parameters).

The PyTorch twin (`twin_model`) is the same network layer for layer: token, position and BOS embeddings (the BOS
vector plus position 0's embedding fills slot 0, tokens 0..T-2 fill slots 1..T-1), pre-norm blocks (LayerNorm
eps 1e-6, then q/k/v/o projections with biases and causal softmax attention scaled by 1/sqrt(head dim); LayerNorm,
then Linear -> tanh-approximated GELU -> Linear), a final LayerNorm and an untied head with bias; the loss is the
token cross-entropy averaged per example, then over the batch. Every parameter is an nn.Embedding, nn.Linear or
nn.LayerNorm weight, which Opacus's per-sample hooks and ghost norms support. Each twin starts from the JAX model's
own initial parameters (`load_jax_params`), and the run refuses to time anything unless the two models' logits on
the benchmark batch agree within 1e-4 (`twin_check`; 3e-7 at the quick size, logit std 0.16) and both parameter
counts equal `param_count` (both are printed).

Modes:
- `jax_non_dp`, `dpwave_ghost_mb8`, `dpwave_ghost_mb32`: bench_dp_step's own `non_dp`, `dp_ghost_mb8` and
  `dp_ghost_mb32` steps (its `_prepared` and `_run`: one jitted, compiled-ahead step; ghost norms, microbatches of 8
  (the CPU configs' setting) and 32).
- `torch_non_dp`: the plain PyTorch step (torch.optim.Adam).
- `opacus_ghost`: Opacus ghost clipping (`PrivacyEngine.make_private(grad_sample_mode="ghost")`, which returns a
  wrapped criterion whose `backward` runs Opacus's two backward passes).
- `opacus_hooks`: Opacus's standard per-sample gradients (`grad_sample_mode="hooks"`).
Both Opacus modes: DP-Adam, fixed batches (`poisson_sampling=False`, so the batch is the same 64 examples as the JAX
step's; expected batch size 64), noise drawn on every step.

Time: ONE process holds all six modes (JAX compiled ahead, torch with `torch.set_num_threads(<cores>)`) and runs
them round-robin, one step per mode per round, each step blocked until done (JAX: `block_until_ready`; torch CPU
steps are synchronous); the order rotates each round. `--warmup` rounds (default 2) are discarded; the median of the
`--rounds` timed rounds (default 10; quick 5) is reported, with its ratio to the same framework's non-DP step
(`step_x`) and to the Opacus ghost step (`vs_opacus_ghost`; for `dpwave_ghost_mb8` that is dpwave DP / Opacus
ghost). The JSON records torch, Opacus and JAX versions, the CPU model, the thread count and the load average.

OpenMP: torch's CPU build runs its ops on libgomp threads. The run sets OMP_WAIT_POLICY=PASSIVE before torch loads
(`--omp-wait-policy`): with libgomp's default (spin, then sleep) and torch at 2 threads on the 2 busy cores of the
development machine (another job at load 4-5), torch's quick steps took 0.2-2.8 s, bimodal, instead of 0.05-0.14 s
(1 thread, or 2 passive threads); spinning threads would also take cores from the JAX step that follows in the
round-robin. On an idle machine `--omp-wait-policy unset` measures torch with its default policy, for comparison.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from dpwave.models.transformer import batch_loss
from experiments.bench import bench_dp_step as dp_step
from experiments.bench.common import print_table, write_json

INSTALL = "pip install -r requirements-opacus.txt"
SIZES = dp_step.SIZES
# ours -> bench_dp_step's name
JAX_MODES = {"jax_non_dp": "non_dp", "dpwave_ghost_mb8": "dp_ghost_mb8", "dpwave_ghost_mb32": "dp_ghost_mb32"}
TORCH_MODES = ("torch_non_dp", "opacus_ghost", "opacus_hooks")
MODES = (*JAX_MODES, *TORCH_MODES)
BASELINE = {m: "jax_non_dp" for m in JAX_MODES} | {m: "torch_non_dp" for m in TORCH_MODES}
LN_EPS = 1e-6  # flax nnx.LayerNorm's default, which dpwave uses
LR = 1e-4
CLIP = 1.0
NOISE = 1.0


def param_count(size: dict[str, int]) -> int:
    """Parameters of ARTransformer (unconditional, untied head, LayerNorm) at `size`, and of its torch twin."""
    v, t, d, m = size["vocab_size"], size["seq_len"], size["width"], size["mlp_dim"]
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)  # two norms, q/k/v/o, fc1, fc2
    return v * d + t * d + d + size["depth"] * block + 2 * d + (d * v + v)  # embeddings, blocks, final norm, head


def jax_param_count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def torch_modules():
    """(torch, opacus) or ImportError naming the optional requirements file."""
    try:
        import opacus
        import torch
    except ImportError as e:
        raise ImportError(f"bench_opacus needs torch and opacus (not dpwave requirements): {INSTALL} ({e})") from e
    return torch, opacus


@functools.cache
def _twin_class():
    torch, _ = torch_modules()
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        """Pre-norm block: x + o(Attn(q, k, v of LN(x))), then x + fc2(gelu_tanh(fc1(LN(x))))."""

        def __init__(self, d: int, heads: int, mlp: int):
            super().__init__()
            self.heads = heads
            self.attn_norm = nn.LayerNorm(d, eps=LN_EPS)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
            self.mlp_norm = nn.LayerNorm(d, eps=LN_EPS)
            self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

        def forward(self, x):
            b, n, d = x.shape
            h = self.attn_norm(x)
            split = lambda y: y.view(b, n, self.heads, d // self.heads).transpose(1, 2)
            q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
            x = x + self.o_proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x)), approximate="tanh"))

    class Twin(nn.Module):
        """ARTransformer (unconditional) in PyTorch: tokens (B, T) -> logits (B, T, V)."""

        def __init__(self, size: dict[str, int]):
            super().__init__()
            v, t, d = size["vocab_size"], size["seq_len"], size["width"]
            self.token_embed, self.pos_embed, self.bos = nn.Embedding(v, d), nn.Embedding(t, d), nn.Embedding(1, d)
            self.blocks = nn.ModuleList(Block(d, size["num_heads"], size["mlp_dim"]) for _ in range(size["depth"]))
            self.final_norm = nn.LayerNorm(d, eps=LN_EPS)
            self.head = nn.Linear(d, v)

        def forward(self, tokens):
            b, t = tokens.shape
            # Contiguous index tensors: Opacus 1.6's ghost norm of nn.Embedding calls .view(-1, 1) on its input
            slots = torch.arange(t, device=tokens.device).expand(b, t).contiguous()
            bos = self.bos(torch.zeros((b, 1), dtype=torch.long, device=tokens.device))
            x = torch.cat([bos, self.token_embed(tokens[:, :-1].contiguous())], dim=1) + self.pos_embed(slots)
            for block in self.blocks:
                x = block(x)
            return self.head(self.final_norm(x))

    return Twin


def twin_model(size: dict[str, int], params: Any | None = None):
    """The torch twin of the benchmark model; with `params` (the JAX model's nnx.State) it starts from them."""
    model = _twin_class()({k: v for k, v in size.items() if k != "batch"})
    if params is not None:
        load_jax_params(model, params)
    return model


def load_jax_params(model, params: Any) -> None:
    """Copies ARTransformer's params into the twin (Dense kernels (in, out) -> Linear weights (out, in))."""
    torch, _ = torch_modules()
    flat = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk("", nnx.to_pure_dict(params))
    rename = {"attn.": "", "mlp.": "", ".kernel": ".weight", ".scale": ".weight"}
    state = {}
    for name, value in flat.items():
        target = name
        for old, new in rename.items():
            target = target.replace(old, new)
        if name in ("token_embed", "pos_embed", "bos"):
            target, value = f"{name}.weight", value.reshape(-1, value.shape[-1])
        elif name.endswith(".kernel"):
            value = value.T
        state[target] = torch.from_numpy(np.array(value, np.float32))
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"twin and JAX parameters differ in names: {sorted(missing)}")
    model.load_state_dict(state)


def torch_loss(model, tokens):
    """Mean over the batch of each example's mean token cross-entropy (dpwave's batch_loss)."""
    torch, _ = torch_modules()
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def twin_check(graphdef: nnx.GraphDef, params: Any, batch: dict[str, Any], twin) -> dict[str, float]:
    """dpwave's model and the twin (holding the same params) on one batch: losses and the largest logit gap."""
    torch, _ = torch_modules()
    jax_logits = np.asarray(nnx.merge(graphdef, params)(batch["tokens"]))
    tokens = torch.from_numpy(np.asarray(batch["tokens"], np.int64))
    with torch.no_grad():
        torch_logits = twin(tokens).numpy()
        loss_torch = float(torch_loss(twin, tokens))
    return {"loss_jax": float(batch_loss(graphdef, params, batch, None)), "loss_torch": loss_torch,
            "max_logit_diff": float(np.abs(jax_logits - torch_logits).max()), "logit_std": float(jax_logits.std())}


def _step(optimizer: Any, loss_fn: Callable[[], Any]) -> Callable[[], float]:
    """One training step on the fixed batch: zero the gradients, backward `loss_fn()`, step; returns the loss."""

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def torch_step(mode: str, size: dict[str, int], params: Any, tokens_np: np.ndarray) -> tuple[Callable[[], float], Any]:
    """(a closure running one training step of a torch mode on the fixed batch and returning its loss, the twin it
    trains, built from `params`)."""
    torch, opacus = torch_modules()
    model = twin_model(size, params)
    tokens = torch.from_numpy(np.asarray(tokens_np, np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    if mode == "torch_non_dp":
        return _step(optimizer, lambda: torch_loss(model, tokens)), model
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=size["batch"])
    common = dict(optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP,
                  poisson_sampling=False, loss_reduction="mean")
    engine = opacus.PrivacyEngine()
    if mode == "opacus_ghost":
        module, dp_opt, criterion, _ = engine.make_private(
            module=model, criterion=torch.nn.CrossEntropyLoss(), grad_sample_mode="ghost", **common
        )

        def ghost_loss() -> Any:
            logits = module(tokens)
            # shape= makes the criterion reduce per sequence (the privacy unit), then backward() clips and re-weights
            return criterion(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), shape=logits.shape)

        return _step(dp_opt, ghost_loss), model
    if mode == "opacus_hooks":
        module, dp_opt, _ = engine.make_private(module=model, grad_sample_mode="hooks", **common)
        return _step(dp_opt, lambda: torch_loss(module, tokens)), model
    raise ValueError(f"unknown torch mode {mode!r}; known: {TORCH_MODES}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def time_modes(
    modes: list[str], size: dict[str, int], rounds: int, warmup: int, threads: int | None = None
) -> dict[str, Any]:
    """Builds every mode, checks the twin against dpwave's model, then times the modes round-robin."""
    torch, _ = torch_modules()
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    graphdef, params, batch, _ = dp_step._build(size)
    tokens = np.asarray(batch["tokens"])
    twin = twin_model(size, params)
    counts = {"jax": jax_param_count(params), "torch": sum(p.numel() for p in twin.parameters()),
              "formula": param_count(size)}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"parameter counts differ: {counts}")
    init = twin_check(graphdef, params, batch, twin)
    if init["max_logit_diff"] > 1e-4 or abs(init["loss_jax"] - init["loss_torch"]) > 1e-4:
        raise RuntimeError(f"the torch twin does not compute dpwave's model at the same parameters: {init}")

    steps: dict[str, Callable[[int], Any]] = {}
    for mode in modes:
        if mode in JAX_MODES:
            prep = dp_step._prepared(JAX_MODES[mode], size)  # compiled ahead
            steps[mode] = functools.partial(dp_step._run, prep)
        else:
            run, _ = torch_step(mode, size, params, tokens)
            steps[mode] = lambda seed, run=run: run()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(warmup + rounds):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            start = time.perf_counter()
            steps[mode](r)
            if r >= warmup:
                times[mode].append(time.perf_counter() - start)
    return {"times": times, "params": counts, "init": init, "torch_threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bench_dp_step's small model, 5 rounds")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {list(MODES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch's threads (default: the cores)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active", "unset"], default="passive",
                        help="OMP_WAIT_POLICY for torch's OpenMP, set before torch loads (default passive; unset: "
                        "the environment's, or libgomp's spin-then-sleep)")
    parser.add_argument("--out", default="/tmp/bench_opacus.json")
    args = parser.parse_args()
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # libgomp reads it when torch loads it
    for message in ("Secure RNG turned off", "Full backward hook is firing"):  # Opacus's and torch's notices
        warnings.filterwarnings("ignore", message=message)
    try:
        torch, opacus = torch_modules()
    except ImportError as e:
        raise SystemExit(str(e)) from None
    modes = args.modes.split(",") if args.modes else list(MODES)
    unknown = sorted(set(modes) - set(MODES))
    needed = {BASELINE[m] for m in modes if m in MODES}
    if unknown or not needed <= set(modes):
        parser.error(f"--modes takes names from {list(MODES)} with each framework's non-DP step; unknown: {unknown}")
    size_name = "quick" if args.quick else "full"
    size = SIZES[size_name]
    rounds = args.rounds or (5 if args.quick else 10)
    load_before = os.getloadavg()
    result = time_modes(modes, size, rounds, args.warmup, args.torch_threads)
    times = result["times"]
    median = {m: statistics.median(t) for m, t in times.items()}
    rows = []
    for m in modes:
        row = {"mode": m, "framework": "jax" if m in JAX_MODES else "torch", "step_s": median[m],
               "step_x": median[m] / median[BASELINE[m]]}
        if "opacus_ghost" in median:
            row["vs_opacus_ghost"] = median[m] / median["opacus_ghost"]
        rows.append({**row, "min_s": min(times[m]), "max_s": max(times[m]), "times_s": times[m]})
    counts = result["params"]
    init = result["init"]
    print(f"parameters: dpwave ARTransformer {counts['jax']:,}, torch twin {counts['torch']:,}; same initial "
          f"parameters: loss {init['loss_jax']:.6f} (JAX) / {init['loss_torch']:.6f} (torch), largest logit gap "
          f"{init['max_logit_diff']:.2g} (logit std {init['logit_std']:.2g})")
    print_table(rows, ["mode", "framework", "step_s", "step_x", "vs_opacus_ghost", "min_s", "max_s"])
    ratio = None
    if {"dpwave_ghost_mb8", "opacus_ghost"} <= set(median):
        ratio = median["dpwave_ghost_mb8"] / median["opacus_ghost"]
        print(f"dpwave DP (ghost, microbatch 8) / Opacus ghost: {ratio:.3g}")
    write_json(args.out, "opacus", rows, size_name=size_name, size=size, rounds=rounds, warmup=args.warmup,
               dpwave_dp_over_opacus_ghost=ratio, params=counts, twin_check=init,
               same_process=True, torch_threads=result["torch_threads"], cpu_model=cpu_model(),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
               versions={"torch": torch.__version__, "opacus": opacus.__version__, "jax": jax.__version__},
               load_average_before=load_before, load_average_after=os.getloadavg())


if __name__ == "__main__":
    main()
