"""Your own images: a DP generator from a folder of private images and a folder of public images like them.

    python -m dpwave.main --config=experiments/configs/folder.py:demo --workdir=workdir/folder_demo

`demo` runs on the bundled MNIST digits written once as two PNG folders (`demo_folders`); replace it with
`public=DIR,private=DIR` for your own images (docs/your_images.md has the command, the layout and what each
output means). Args (`:arg`, comma-separated):

* `public=DIR`: images like the private ones that you may train on without DP (tagged public by an explicit
  assertion, `override_private_default=True`, logged at every load); the tokenizer, AR pretraining and refiner
  train on it, and the held-out and test images are carved from it (`image_folder.carve`: 15% and 15% of each
  class, by file name) unless `heldout=DIR` / `test=DIR` are given (or it has `train/` and `test/` folders).
* `private=DIR`: the sensitive images, the private role: only the DP stage trains on them.
* `size=N` (32, 64, 128, 256 or 512): center-crop and resize every image to N x N; default: the images' own size
  (one size in every folder) rounded down to one of those, at most 256. `channels=1|3`: convert every image;
  default: the folders' one mode (grey or colour).
* `epsilon=E` (default 10; `inf`: the non-private reference, `public`: the public-only control), `method`
  (dpwave, full_dp, bicubic), `seed`, `data_dir=DIR` (where the prepared copies go, default TFDS' own;
  the private folder's copy is private data), `tiny` (every model and schedule shrunk: a test in about a minute).

What is read from the data, at config time, from file names and image headers only (folder_scan): class
subfolders (label conditioning) or `captions.jsonl` (caption conditioning, prompts from the held-out captions)
or neither (unconditional); the channels; the resolution. Wavelet levels, tokenizer patches and model sizes
follow from the resolution (experiments/configs/sizing.py). The DP stage's expected batch, steps and sigma
come from N, the private folder's size, and the target epsilon through `dpwave.privacy.planning`
(`sizing.dp_plan`), with the default DP-SGD recipe (`recipes.DEFAULT`, docs/tuning.md). A folder that cannot work
(missing, mixed sizes or modes, too few images per class, classes or captions that differ between folders, a
private folder inside the public one) is a one-line error here; a public image identical or nearly identical to
a private one is refused by the run-start content check (dpwave/data/overlap.py).

The privacy-utility curve on your data (the public-only control, epsilon inf, and `--epsilons`; each run on the
private data spends its own epsilon):

    python -m experiments.reproduce --table curve --config=experiments/configs/folder.py:demo --workdir=runs/curve

Tiny (the tests' size; about a minute here):

    python -m dpwave.main --config=experiments/configs/folder.py:demo,tiny --workdir=/tmp/folder_tiny

Sized for 2 CPU cores at 32 and 64 px (at 32 px the sizes and public schedules are mnist.py:demo's); larger
sides are for a GPU. Times at 32 and 64 px, with their metrics: docs/your_images.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import ml_collections
import numpy as np
from PIL import Image

from dpwave.data.builders import folder_scan, image_folder, mnist5k
from dpwave.data.errors import DataError
from experiments.configs import common, recipes, sizing

CARVED = {"heldout": 0.15, "test": 0.15}  # of each public class, when no heldout= / test= folder is given
MIN_PER_CLASS = 10  # public images per class (or in a flat folder) the public stages and the carve need
MIN_PRIVATE = 32  # private images: the smallest expected batch (q = 1/4) has at least 8
MAX_DEFAULT_SIDE = 256  # larger images are read at 256 px unless size= says otherwise
TINY_DP_EPOCHS = 4  # the tiny variant's DP compute, in passes over N (sizing.DP_EPOCHS otherwise)
MAX_TEXT_BYTES = 128


@dataclasses.dataclass(frozen=True)
class Folder:
    """A scanned folder in a role."""

    role: str
    root: str
    scan: folder_scan.FolderScan

    @property
    def size(self) -> int:
        return sum(map(len, self.scan.splits.values()))

    def headers(self) -> list[folder_scan.Header]:
        """Every image's size and mode, from its file header."""
        return folder_scan.read_headers(self.root, [e for split in self.scan.splits.values() for e in split])

    def class_counts(self, split: str) -> dict[str, int]:
        """Images per class of `split` ('' for a flat folder)."""
        counts = dict.fromkeys(self.scan.class_names or ("",), 0)
        for entry in self.scan.splits[split]:
            counts[self.scan.class_names[entry.label] if entry.label is not None else ""] += 1
        return counts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, public="", private="", heldout="", test="", size=0, channels=0, epsilon="10",
                            seed=0, method="dpwave", data_dir="", demo=False, tiny=False)
    _check_args(args)
    if args.demo:  # the bundled digits: 32 x 32 grey
        args.public, args.private = demo_folders()
        args.size, args.channels = args.size or 32, args.channels or 1
    folders = {role: read_folder(role, args[role]) for role in ("public", "private", "heldout", "test") if args[role]}
    check_folders(folders)
    c = common.base_config()
    c.lock()  # a key the base lacks is an error, not a new key
    c.seed, c.method = args.seed, args.method
    headers = {} if args.size and args.channels else {role: f.headers() for role, f in folders.items()}
    c.data.channels = args.channels or mode_channels(headers)
    levels = sizing.apply(c, args.size or resolution(headers)).levels
    public_size = _roles(c, folders, args.data_dir)
    # The public stages: mnist.py:demo's schedule at every size (raise the steps on a GPU).
    c.pretrain.steps = 800
    c.refiner.model.objective = "regression"
    c.perf.microbatch_size = 8
    c.checkpoint.every_steps = 100
    if args.tiny:
        _shrink(c, levels)
    for stage in (c.tokenizer, c.pretrain, c.refiner):  # a batch is never larger than the public role
        stage.batch_size = min(stage.batch_size, public_size)
    _dp(c, folders["private"].size, args.epsilon, TINY_DP_EPOCHS if args.tiny else sizing.DP_EPOCHS)
    return c


def _roles(c: ml_collections.ConfigDict, folders: dict[str, Folder], data_dir: str) -> int:
    """Sets the four data roles and the conditioning they allow; returns the public role's size."""
    public = folders["public"]
    c.data.condition = "label" if len(public.scan.class_names) >= 2 else "caption" if public.scan.captioned else "none"
    c.data.num_classes = len(public.scan.class_names) if c.data.condition == "label" else None
    if c.data.condition == "caption":
        c.sample.prompts = "heldout"  # the private captions are private
        c.transformer.max_text_len = caption_bytes(public)
    splits = public_splits(public, set(folders) - {"public", "private"})
    for role, split in splits.items():
        c.data[role].update(_dataset(public.root, split, "public", data_dir))
    for role in folders.keys() - {"public"}:
        privacy = "private" if role == "private" else "public"
        c.data[role].update(_dataset(folders[role].root, "+".join(folders[role].scan.splits), privacy, data_dir))
    return split_size(public.scan, splits["public"])


def _dp(c: ml_collections.ConfigDict, n: int, epsilon: str, epochs: int) -> None:
    """The DP stage for N private images: the plan's batch and steps (`sizing.dp_plan`), the recipe's settings
    and its learning-rate rule at them; the DP stage calibrates sigma to the target as the planner did (its value,
    q and the steps are in privacy_statement.txt)."""
    c.dp.mechanism.target_epsilon = common.epsilon_value(epsilon)
    c.dp.mechanism.delta = sizing.delta(n)
    plan = sizing.dp_plan(c.dp.mechanism.target_epsilon, c.dp.mechanism.delta, n, epochs)
    c.dp.mechanism.steps = plan.steps
    recipes.apply(c, recipes.DEFAULT, n, expected_batch_size=plan.expected_batch_size)


def _check_args(args: ml_collections.ConfigDict) -> None:
    if "variant" in args:
        raise ValueError(f"unknown bare word {args.variant!r}; the bare words are demo and tiny (others are key=value: "
                         "public, private, heldout, test, size, channels, epsilon, seed, method, data_dir)")
    if args.demo and (args.public or args.private):
        raise ValueError("demo runs on the bundled digits; drop it to use public=DIR,private=DIR")
    if not (args.demo or (args.public and args.private)):
        raise ValueError("folder.py needs public=DIR,private=DIR (your folders), or demo (the bundled digits)")
    if args.method not in common.METHODS:
        raise ValueError(f"method={args.method!r}; use one of {common.METHODS}")
    if not (common.epsilon_value(args.epsilon) > 0 or args.epsilon == "public"):
        raise ValueError(f"epsilon={args.epsilon!r} must be > 0 (or inf for the non-private reference, public for "
                         "the public-only control)")
    if args.size and args.size not in sizing.SIDES:
        raise ValueError(f"size={args.size}: use one of {sizing.SIDES} (the sizing rule's sides)")
    if args.channels not in (0, 1, 3):
        raise ValueError(f"channels={args.channels}: use 1 (grey) or 3 (colour)")


def read_folder(role: str, root: str) -> Folder:
    """Scans the folder of `role`: its layout, file names and sizes, and captions."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"{role} folder {root} does not exist")
    try:
        scan = folder_scan.scan_folder(root)
    except DataError as e:  # its message goes on with the expected layout (docs/your_images.md shows it)
        problem = str(e).splitlines()[0].removeprefix("image_folder: ")
        raise DataError(f"{role} folder {root}: {problem} (layout: docs/your_images.md)") from None
    return Folder(role, root, scan)


def check_folders(folders: dict[str, Folder]) -> None:
    """Refuses, in one line each, folders that cannot make a run: nested public and private folders, classes or
    captions that differ from the public folder's, too few public images per class or private images."""
    public, private = folders["public"], folders["private"]
    for other in folders.values():
        for a, b in ((other, private), (private, other)):
            if a is not b and os.path.commonpath([a.root, b.root]) == b.root:
                raise DataError(f"the {a.role} folder {a.root} lies inside the {b.role} folder {b.root}; keep the "
                                "private images apart from every other folder")
    for folder in folders.values():
        if folder.scan.captioned != public.scan.captioned:
            has = {True: "has", False: "has no"}
            raise DataError(f"the public folder {has[public.scan.captioned]} {folder_scan.CAPTIONS_FILE} but the "
                            f"{folder.role} folder {has[folder.scan.captioned]}; give both or neither")
        if folder.scan.class_names != public.scan.class_names:
            raise DataError(f"{folder.role} folder {folder.root} has classes {list(folder.scan.class_names)} but the "
                            f"public folder has {list(public.scan.class_names)}; a label is its class folder's "
                            "place in the sorted names, so every folder needs the same class folders")
    small = {name: n for name, n in public.class_counts("train").items() if n < MIN_PER_CLASS}
    if small:
        what = "it has" if list(small) == [""] else f"classes {small} have"
        raise DataError(f"public folder {public.root}: {what} too few images; each class needs at least "
                        f"{MIN_PER_CLASS} (the public stages train on them; held-out and test images are carved "
                        "from them)")
    for role in ("heldout", "test"):
        if role in folders and (empty := [k for k, n in folders[role].class_counts("train").items() if not n]):
            raise DataError(f"{role} folder {folders[role].root}: classes {empty} have no image")
    if private.size < MIN_PRIVATE:
        raise DataError(f"private folder {private.root} has {private.size} images; the DP stage needs at least "
                        f"{MIN_PRIVATE}")


def resolution(headers: dict[str, list[folder_scan.Header]]) -> int:
    """The side every image is read at: the one size of all images, rounded down to a side of the sizing rule
    (at most MAX_DEFAULT_SIDE). Mixed sizes are an error that names two images and the fix (size=N)."""
    fix = f"pass size=N (one of {sizing.SIDES}) to center-crop and resize every image to N x N"
    seen: dict[tuple[int, int], str] = {}
    for role, role_headers in headers.items():
        for header in role_headers:
            seen.setdefault(header.size, f"{role} {header.relpath}")
    if len(seen) > 1:
        shown = ", ".join(f"{w}x{h} ({where})" for (w, h), where in list(seen.items())[:2])
        raise DataError(f"the images have {len(seen)} sizes, e.g. {shown}; {fix}")
    (width, height), where = next(iter(seen.items()))
    fitting = [s for s in sizing.SIDES if s <= min(width, height, MAX_DEFAULT_SIDE)]
    if not fitting:
        raise DataError(f"the images are {width}x{height} ({where}), smaller than {sizing.SIDES[0]} px; pass "
                        f"size={sizing.SIDES[0]} to upscale them")
    return fitting[-1]


def mode_channels(headers: dict[str, list[folder_scan.Header]]) -> int:
    """1 when every image is grey, 3 when every image is colour; mixed modes are an error naming one of each."""
    seen: dict[int, str] = {}
    for role, role_headers in headers.items():
        for header in role_headers:
            seen.setdefault(header.channels, f"{role} {header.relpath} is {header.mode}")
    if len(seen) > 1:
        raise DataError(f"grey and colour images are mixed ({seen[1]}, {seen[3]}); convert them to one mode, or pass "
                        "channels=1 (grey) or channels=3 (colour) to convert them when read")
    return next(iter(seen))


def public_splits(public: Folder, given: set[str]) -> dict[str, str]:
    """The split expression of each role the public folder serves: public, and heldout / test unless `given`
    (a `test/` folder in it is the test role; the rest is carved from `train`)."""
    out = {}
    carved = {role: fraction for role, fraction in CARVED.items() if role not in given}
    if "test" in public.scan.splits and "test" in carved:
        out["test"] = "test"
        del carved["test"]
    if carved:
        return {**out, **image_folder.carve(public.scan, carved)}
    return {**out, "public": "train" if out else "+".join(public.scan.splits)}


def split_size(scan: folder_scan.FolderScan, expression: str) -> int:
    """Images that a split expression of `public_splits` (whole splits and slices joined by '+') reads."""
    total = 0
    for term in expression.split("+"):
        name, _, window = term.partition("[")
        start, _, stop = window.rstrip("]").partition(":")
        total += int(stop) - int(start) if window else len(scan.splits[name])
    return total


def caption_bytes(public: Folder) -> int:
    """Caption bytes the model reads: the public captions' longest UTF-8 length up to a multiple of 16, at most
    MAX_TEXT_BYTES (the private captions are not read here)."""
    longest = max(len(c.encode()) for split in public.scan.splits.values() for e in split for c in e.captions)
    return min(MAX_TEXT_BYTES, 16 * math.ceil(longest / 16))


def _dataset(root: str, split: str, privacy: str, data_dir: str) -> dict:
    """An image_folder role; a public one carries the operator's assertion that the folder holds no private data."""
    return dict(name="image_folder", split=split, privacy=privacy, manual_dir=root, data_dir=data_dir or None,
                override_private_default=privacy == "public")


def _shrink(c: ml_collections.ConfigDict, levels: int) -> None:
    """mnist.py:tiny's sizes and schedules (the wavelet levels and patches stay the resolution's)."""
    c.tokenizer.model.update(codebook_size=64, width=16, depth=1)
    c.tokenizer.update(steps=30, batch_size=32)
    c.transformer.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.pretrain.update(steps=30, batch_size=32)
    c.refiner.model.update(widths=(16,) * levels, num_blocks=1, sample_steps=2)
    c.refiner.update(steps=30, batch_size=32)
    c.sample.update(num_samples=100, batch_size=50)
    c.eval.update(feature_epochs=2, downstream_epochs=2, num_real=200)
    c.checkpoint.every_steps = 10
    c.log_every_steps = 10


def demo_folders(root: str | None = None) -> tuple[str, str]:
    """The bundled MNIST digits as two folders of class subfolders of PNGs, written once under `root` (default
    $XDG_CACHE_HOME/dpwave/folder_demo): `public` holds mnist5k's public, heldout and test splits (3,000 digits),
    `private` its private split (2,000). Returns (public, private)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = root or os.path.join(cache, "dpwave", "folder_demo")
    if not os.path.isdir(root):
        images, labels = mnist5k.mnist5k_arrays()
        rows = mnist5k.split_rows(labels)
        tmp = f"{root}.tmp{os.getpid()}"
        for folder, splits in (("public", ("public", "heldout", "test")), ("private", ("private",))):
            for row in np.concatenate([rows[s] for s in splits]):
                path = os.path.join(tmp, folder, str(labels[row]), f"{mnist5k.example_id(int(row))}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(images[row, ..., 0]).save(path)
        try:
            os.rename(tmp, root)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp)
    return os.path.join(root, "public"), os.path.join(root, "private")
