"""experiments/configs/folder.py on generated image folders: the sizing rule, what is read from the folders, the
one-line refusals of folders that cannot work, the curve's rows, and the tiny run end to end through the CLI.

`write_shapes` makes the folders (also those of docs/your_images.md's measured runs): circles, squares, triangles
and crosses of random size, turn, place and colour on a random background, grey or RGB, in class subfolders or a
flat folder with captions.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dpwave.data.errors import DataError
from dpwave.models.tokenizer import TokenizerConfig
from experiments import reproduce
from experiments.configs import folder, mnist, paper, sizing
from experiments.configs.tables import PUBLIC

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle", "cross")
PRIVATE_N = 40  # every test folder's private size: one DP plan (calibrated once per process) serves them all


def shape_image(shape: str, side: int, mode: str, rng: np.random.Generator) -> Image.Image:
    """One `shape` (one of SHAPES), turned, sized and placed at random, on a background of a random colour, ramp and
    blotches, with pixel noise; converted to PIL `mode`. Two such images stay below the content check's near-copy
    threshold (0.998: at most 0.993 between 600 and 800 of them, at 32 and at 64 px)."""
    yy, xx = np.mgrid[:side, :side] / side
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(-60, 60)
    blotches = np.asarray(Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8)).resize((side, side),
                                                                                             Image.BILINEAR))
    background = rng.integers(0, 110, 3) + (ramp + 0.3 * (blotches - 128.0))[..., None]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw, colour = ImageDraw.Draw(image), tuple(map(int, rng.integers(140, 256, 3)))
    r, turn = side * rng.uniform(0.18, 0.38), rng.uniform(0, 2 * np.pi)
    cx, cy = side / 2 + side * rng.uniform(-0.15, 0.15, 2)
    corners = [(cx + r * np.cos(turn + i * np.pi / 2), cy + r * np.sin(turn + i * np.pi / 2)) for i in range(4)]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r * rng.uniform(0.7, 1.0), cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.polygon(corners, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx + r * np.cos(turn + i * 2 * np.pi / 3), cy + r * np.sin(turn + i * 2 * np.pi / 3))
                      for i in range(3)], fill=colour)
    else:
        draw.line([corners[0], corners[2]], fill=colour, width=max(1, side // 10))
        draw.line([corners[1], corners[3]], fill=colour, width=max(1, side // 10))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 8, (side, side, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)


def write_shapes(root: Path, per_class: int, *, side: int = 32, mode: str = "L", classes: int = 2,
                 captions: bool = False, seed: int = 0) -> Path:
    """`per_class` images of each of the first `classes` SHAPES: class subfolders, or a flat folder with
    captions.jsonl ("a <shape>"); PNG in PIL `mode` ("L" grey, "RGB" colour)."""
    rng = np.random.default_rng(seed)
    lines = []
    for shape in SHAPES[:classes]:
        for i in range(per_class):
            name = f"{shape}_{i:04d}.png" if captions else f"{shape}/{i:04d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shape_image(shape, side, mode, rng).save(root / name)
            lines.append(json.dumps({"file": name, "caption": f"a {shape}"}))
    if captions:
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def folders(tmp_path: Path, **kw) -> tuple[Path, Path]:
    """A public folder of 20 images per class and a private one of PRIVATE_N images, alike."""
    classes = kw.get("classes", 2)
    public = write_shapes(tmp_path / "public", 20, seed=1, **kw)
    private = write_shapes(tmp_path / "private", PRIVATE_N // classes, seed=2, **kw)
    return public, private


def config(public: Path, private: Path, extra: str = ""):
    return folder.get_config(",".join(filter(None, (f"public={public},private={private}", extra))))


def refusal(public: Path, private: Path, extra: str = "") -> str:
    """The message of the DataError the config raises: one line."""
    with pytest.raises(DataError) as info:
        config(public, private, extra)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.unit
@pytest.mark.parametrize("side", sizing.SIDES)
def test_sizes_follow_the_rule(side):
    s = sizing.sizes(side)
    k = int(math.log2(side / 32))
    assert s.coarse == 2 ** (int(math.log2(side)) // 2 + 1) and s.side == s.coarse * 2**s.levels
    assert (s.width, s.depth, s.num_heads, s.mlp_dim) == (64 * round(2 * 2 ** (k / 2)), 2 + k, s.width // 32,
                                                          2 * s.width)
    assert (s.codebook_size, s.tokenizer_width, s.refiner_widths) == (256 * 2**k, s.width // 2,
                                                                      (s.width // 4,) * s.levels)
    # Every scale, coarse first, is a (C/2) x (C/2) token grid (the tokenizer checks that each patch divides its band).
    tok = TokenizerConfig(image_size=(side, side), channels=3, levels=s.levels, patch_sizes=s.patch_sizes)
    assert tok.tokens_per_scale == ((s.coarse // 2) ** 2,) * (s.levels + 1) == (s.tokens[0],) * (s.levels + 1)


@pytest.mark.unit
def test_the_rule_gives_mnist_and_the_paper_their_sizes_and_the_docstring_its_table():
    assert [line for line in sizing.__doc__.splitlines() if line.startswith("| ") and line[2].isdigit()] == \
        sizing.table().splitlines()
    demo, s32 = mnist.get_config("demo"), sizing.sizes(32)
    assert (demo.wavelet.levels, tuple(demo.tokenizer.model.patch_sizes), demo.transformer.width,
            demo.transformer.depth, tuple(demo.refiner.model.widths)) == (s32.levels, s32.patch_sizes, s32.width,
                                                                          s32.depth, s32.refiner_widths)
    big = paper.paper_config(paper.parse_args("manual_dir=/x"), datasets={}, private_size=10_000, delta=1e-6,
                             dp_steps=1, pretrain_steps=1, num_real=1)
    s256 = sizing.sizes(256)
    assert (big.wavelet.levels, tuple(big.tokenizer.model.patch_sizes)) == (s256.levels, s256.patch_sizes)
    with pytest.raises(ValueError, match="the sizing rule covers"):
        sizing.sizes(48)


@pytest.mark.unit
def test_grey_class_folders_make_a_labelled_32px_run(tmp_path):
    public, private = folders(tmp_path)
    c = config(public, private)
    assert (c.data.image_size, c.data.channels, c.data.condition, c.data.num_classes) == (32, 1, "label", 2)
    assert (c.wavelet.levels, tuple(c.tokenizer.model.patch_sizes)) == (2, (2, 2, 4))
    roles = {role: c.data[role] for role in ("public", "private", "heldout", "test")}
    assert {r.name for r in roles.values()} == {"image_folder"}
    assert roles["private"].manual_dir == str(private) and roles["private"].privacy == "private"
    assert not roles["private"].override_private_default
    for role in ("public", "heldout", "test"):  # the public folder, tagged public by the operator's assertion
        assert (roles[role].manual_dir, roles[role].privacy, roles[role].override_private_default) == \
            (str(public), "public", True)
    # 20 per class in path order: 14 public, 3 heldout, 3 test; disjoint and covering.
    assert roles["public"].split == "train[0:14]+train[20:34]"
    assert roles["heldout"].split == "train[14:17]+train[34:37]"
    assert roles["test"].split == "train[17:20]+train[37:40]"
    assert (c.tokenizer.batch_size, c.pretrain.batch_size, c.refiner.batch_size) == (28, 28, 28)  # 28 public images
    # The DP stage: the planner's batch (q = 1/2 ranks first by sigma/B) over 75 epochs, the sgd recipe.
    m = c.dp.mechanism
    assert (m.expected_batch_size, m.steps, m.delta, c.dp.recipe.optimizer) == (20, 150, 1e-5, "sgd")
    assert m.target_epsilon == 10.0 and m.noise_multiplier is None  # the DP stage calibrates sigma
    assert config(public, private, "epsilon=public").dp.mechanism.target_epsilon == 0.0
    assert config(public, private, "epsilon=inf").dp.mechanism.steps == 150


@pytest.mark.unit
def test_rgb_caption_folders_at_their_own_size_and_at_a_chosen_one(tmp_path):
    public, private = folders(tmp_path, side=64, mode="RGB", captions=True)
    c = config(public, private, "tiny")
    assert (c.data.image_size, c.data.channels, c.data.condition, c.data.num_classes) == (64, 3, "caption", None)
    assert (c.sample.prompts, c.transformer.max_text_len) == ("heldout", 16)  # "a square": 8 bytes, up to 16
    assert (c.wavelet.levels, c.tokenizer.model.patch_sizes) == (2, (2, 2, 4))
    assert c.dp.mechanism.steps == 8 and c.pretrain.steps == 30  # tiny: 4 DP epochs, mnist.py:tiny's schedules
    assert config(public, private, "tiny,size=32,channels=1").data.image_size == 32
    Image.new("RGB", (300, 300)).save(public / "big.png")
    with open(public / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "big.png", "caption": "a big one"}) + "\n")
    assert config(public, private, "tiny,size=128").data.image_size == 128  # mixed sizes, resized


@pytest.mark.unit
def test_one_class_is_unconditional_and_large_images_are_read_at_256px(tmp_path):
    public, private = folders(tmp_path, side=300, classes=1)
    c = config(public, private, "tiny")
    assert (c.data.image_size, c.data.condition, c.wavelet.levels) == (256, "none", 3)


@pytest.mark.unit
@pytest.mark.parametrize("break_folders, match", [
    (lambda pub, priv: Image.new("L", (28, 28)).save(pub / "circle" / "odd.png"),
     r"the images have 2 sizes, e\.g\. 32x32 \(public circle/0000\.png\), 28x28 \(public circle/odd\.png\); "
     r"pass size=N"),
    (lambda pub, priv: Image.new("RGB", (32, 32)).save(priv / "square" / "colour.png"),
     r"grey and colour images are mixed \(public circle/0000\.png is L, private square/colour\.png is RGB\); .* "
     r"channels=1"),
    (lambda pub, priv: [p.unlink() for p in sorted((pub / "square").iterdir())[9:]],
     r"public folder .*: classes \{'square': 9\} have too few images; each class needs at least 10"),
    (lambda pub, priv: os.rename(priv / "square", priv / "cube"),
     r"private folder .* has classes \['circle', 'cube'\] but the public folder has \['circle', 'square'\]"),
    (lambda pub, priv: [p.unlink() for p in sorted((priv / "square").iterdir())[5:]],
     r"private folder .* has 25 images; the DP stage needs at least 32"),
    (lambda pub, priv: Image.new("L", (32, 32)).save(pub / "stray.png"), r"public folder .*: .* mixes class "
     r"subfolders \['circle', 'square'\] with images/captions; use one or the other \(layout: docs/your_images.md\)"),
], ids=["mixed sizes", "mixed modes", "too few per class", "other classes", "too few private", "stray image"])
def test_folders_that_cannot_work_are_one_line_errors(tmp_path, break_folders, match):
    public, private = folders(tmp_path)
    break_folders(public, private)
    message = refusal(public, private)
    assert re.search(match, message), message


@pytest.mark.unit
def test_missing_nested_and_mismatched_folders_are_one_line_errors(tmp_path):
    public, private = folders(tmp_path)
    assert refusal(public, tmp_path / "absent") == f"private folder {tmp_path / 'absent'} does not exist"
    assert "lies inside the public folder" in refusal(public, public / "circle")
    captioned = write_shapes(tmp_path / "captioned", 20, captions=True)
    assert "public folder has captions.jsonl but the private folder has no" in refusal(captioned, private)
    too_small = Image.new("L", (16, 16))
    for p in list(public.rglob("*.png")) + list(private.rglob("*.png")):
        too_small.save(p)
    assert "smaller than 32 px; pass size=32" in refusal(public, private)
    with pytest.raises(ValueError, match="needs public=DIR,private=DIR"):
        folder.get_config(f"public={public}")
    with pytest.raises(ValueError, match="size=48: use one of"):
        config(public, private, "size=48")


@pytest.mark.unit
def test_given_heldout_and_test_folders_leave_the_public_folder_whole(tmp_path):
    public, private = folders(tmp_path)
    heldout = write_shapes(tmp_path / "heldout", 3, seed=3)
    c = config(public, private, f"heldout={heldout}")
    assert (c.data.public.split, c.data.heldout.split, c.data.heldout.manual_dir) == \
        ("train[0:17]+train[20:37]", "train", str(heldout))
    assert c.data.test.split == "train[17:20]+train[37:40]"
    c = config(public, private, f"heldout={heldout},test={heldout}")
    assert c.data.public.split == "train" and c.data.heldout.override_private_default


@pytest.mark.unit
def test_the_curve_has_the_controls_and_each_epsilon(tmp_path):
    spec = "experiments/configs/folder.py:public=/p,private=/q"
    rows = reproduce.table_rows("curve", spec, ("2", "8"))
    assert [(r.label, r.epsilon) for r in rows] == [("dpwave_public", PUBLIC), ("dpwave_eps2", "2"),
                                                    ("dpwave_eps8", "8"), ("dpwave_epsinf", "inf")]
    assert rows[1].spec == f"{spec},method=dpwave,epsilon=2"
    assert [r.epsilon for r in reproduce.table_rows("curve", spec, None)] == [PUBLIC, "1", "4", "10", "inf"]
    with pytest.raises(ValueError, match="needs --config"):
        reproduce.table_rows("curve", None, None)
    with pytest.raises(ValueError, match="--config and --epsilons make the 'curve' table"):
        reproduce.table_rows("mnist_cpu", spec, None)


@pytest.mark.unit
def test_curve_writes_table_plot_and_sample_sheet(tmp_path):
    spec = "experiments/configs/folder.py:public=/p,private=/q"
    rng = np.random.default_rng(0)

    def runner(command):  # the pipeline's outputs, made up
        run = Path(command[-1].removeprefix("--workdir="))
        (run / "sample").mkdir(parents=True)
        np.savez(run / "sample" / "samples.npz", images=rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8))
        (run / "metrics.json").write_text(json.dumps({"epsilon": 1.0, "fd_cls": 3.0, "reasons": {}}))
        return 0

    assert reproduce.main(["--table", "curve", "--config", spec, "--epsilons", "1", "--workdir", str(tmp_path),
                           "--no-reuse"], runner=runner) == 0
    assert {p.name for p in tmp_path.glob("curve*")} == {"curve.md", "curve.json", "curve.png", "curve_samples.png"}
    sheet = Image.open(tmp_path / "curve_samples.png")
    assert sheet.height == 3 * (8 + 2) + 2  # one row of samples per run: public, epsilon 1, inf


def run_main(config_spec: str, workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dpwave.main", f"--config={config_spec}", f"--workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.integration
def test_cli_refuses_bad_folders_in_one_line_before_the_workdir(tmp_path):
    public, private = folders(tmp_path)
    Image.new("L", (28, 28)).save(public / "circle" / "odd.png")
    result = run_main(f"experiments/configs/folder.py:public={public},private={private}", tmp_path / "run")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("dpwave.main: bad config file: ")
    assert "the images have 2 sizes" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def tiny_run(tmp_path: Path, public: Path, private: Path, extra: str = "") -> dict:
    """The tiny config through the CLI; checks it ends with the run's three outputs, returns metrics.json."""
    spec = f"experiments/configs/folder.py:public={public},private={private},tiny,data_dir={tmp_path / 'tfds'}{extra}"
    result = run_main(spec, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("metrics.json", "privacy_statement.txt", "samples.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert "privacy:  (epsilon 9.9" in result.stdout
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.e2e
@pytest.mark.slow  # 32 px grey through the CLI: 60-150 s on 2 cores; the tiny pipeline test covers the stages
def test_grey_class_folders_run_end_to_end_through_the_cli(tmp_path):
    public, private = folders(tmp_path)
    metrics = tiny_run(tmp_path, public, private)
    assert 9 < metrics["epsilon"] <= 10 and metrics["fd_cls"] is not None
    with np.load(tmp_path / "run" / "sample" / "samples.npz") as f:
        assert f["images"].shape == (100, 32, 32, 1)


@pytest.mark.e2e
@pytest.mark.slow  # 64 px captions: about 2 minutes beside other jobs
def test_rgb_caption_folders_run_end_to_end_at_64px(tmp_path):
    public, private = folders(tmp_path, side=64, mode="RGB", captions=True)
    metrics = tiny_run(tmp_path, public, private)
    assert metrics["fd_lowpass"] is not None and metrics["fd_cls"] is None  # no labels to train a classifier on
    with np.load(tmp_path / "run" / "sample" / "samples.npz") as f:
        assert f["images"].shape == (100, 64, 64, 3)


@pytest.mark.integration
def test_a_public_folder_holding_a_private_image_is_refused_in_one_line(tmp_path):
    public, private = folders(tmp_path)
    copy = private / "circle" / "0000.png"
    (public / "circle" / "copied.png").write_bytes(copy.read_bytes())
    result = run_main(f"experiments/configs/folder.py:public={public},private={private},tiny,"
                      f"data_dir={tmp_path / 'tfds'}", tmp_path / "run")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dpwave.main: ") and "circle/copied.png" in last and "circle/0000.png" in last, last
