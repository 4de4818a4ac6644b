"""Scans and validates an image-folder tree for the ``image_folder`` builder."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable

from PIL import Image

from dpwave import files
from dpwave.data.builders.base import make_layout_error
from dpwave.data.errors import DatasetLayoutError, InvalidExampleError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CAPTIONS_FILE = "captions.jsonl"
SPLIT_FOLDERS = ("train", "test")
LAYOUT = """\
  [train/ [test/]]                  optional split folders; without them everything is 'train'
  each split folder (or the root) holds EITHER
    <class name>/<image>            class subfolders: label = index of the class in sorted order
  OR
    <image> ...                     a flat folder of images, optionally with
    captions.jsonl                  one {"file": "<image>", "caption": "..."} per line (>= 1 per image)
  images: .png .jpg .jpeg .bmp .gif .tif .tiff .webp (8-bit, or float in [0, 1])"""
SOURCE = "your own images"
# PIL modes that decode to one channel (read_image_file keeps them grey); every other mode decodes to RGB.
GREY_MODES = ("1", "L", "F", "I")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image: its path relative to the root, its label index and its captions."""

    relpath: str
    label: int | None
    captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """A validated folder: entries per split, class names, whether it has captions, a fingerprint."""

    splits: dict[str, list[Entry]]
    class_names: tuple[str, ...]
    captioned: bool
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Header:
    """What an image file's header says: its path relative to the root, (width, height) and PIL mode."""

    relpath: str
    size: tuple[int, int]
    mode: str

    @property
    def channels(self) -> int:
        """1 for the modes the builder reads as grey, else 3."""
        return 1 if self.mode in GREY_MODES or self.mode.startswith("I;") else 3


def _error(root: str, problem: str) -> DatasetLayoutError:
    return make_layout_error("image_folder", root, problem, LAYOUT, SOURCE)


def _listing(folder: str) -> dict[str, bool]:
    """The visible names in ``folder``, sorted, each mapped to whether it is a folder (one directory read,
    no stat per name, for a local folder)."""
    if files.is_local(folder):
        with os.scandir(folder) as found:
            names = {e.name: e.is_dir() for e in found if not e.name.startswith(".")}
    else:
        names = {p.name: p.is_dir() for p in files.as_path(folder).iterdir() if not p.name.startswith(".")}
    return dict(sorted(names.items()))


def _file_identity(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns): an image edited in place, even to the same size, changes it."""
    if files.is_local(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = files.as_path(path).stat()
    return st.length, int(st.mtime * 1e9)


def _isdir(path: str) -> bool:
    return files.as_path(path).is_dir()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _read_captions(root: str, path: str, images: list[str]) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {name: [] for name in images}
    with files.as_path(path).open("r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, caption = record["file"], record["caption"]
            except (ValueError, KeyError, TypeError) as e:
                raise _error(root, f"{path}:{number} is not a {{\"file\", \"caption\"}} JSON object ({e!r})"
                             ) from None
            if name not in captions:
                raise _error(root, f"{path}:{number} captions {name!r}, which is not an image here")
            captions[name].append(str(caption).strip())
    bare = [n for n, c in captions.items() if not c]
    if bare:
        raise _error(root, f"{len(bare)} images in {os.path.dirname(path)} have no caption in "
                     f"{CAPTIONS_FILE}, e.g. {bare[:5]}")
    return captions


def _scan_split(root: str, folder: str) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """-> ({class name or '': image relpaths}, {relpath: captions} or None)."""
    listing = _listing(folder)
    names = list(listing)
    subdirs = [n for n, is_dir in listing.items() if is_dir]
    images = [n for n, is_dir in listing.items() if _is_image(n) and not is_dir]
    rel = os.path.relpath(folder, root)
    prefix = "" if rel == "." else rel + "/"
    if subdirs and (images or CAPTIONS_FILE in names):
        raise _error(root, f"{folder} mixes class subfolders {subdirs[:5]} with images/captions; "
                     "use one or the other")
    if not subdirs:
        captions = None
        if CAPTIONS_FILE in names:
            by_name = _read_captions(root, os.path.join(folder, CAPTIONS_FILE), images)
            captions = {prefix + n: c for n, c in by_name.items()}
        return {"": [prefix + n for n in images]}, captions
    classes = {}
    for name in subdirs:
        inner = _listing(os.path.join(folder, name))
        nested = [n for n, is_dir in inner.items() if is_dir]
        if nested:
            raise _error(root, f"class folder {prefix}{name}/ contains folders {nested[:5]}; class "
                         "folders must hold images directly")
        classes[name] = [f"{prefix}{name}/{n}" for n in inner if _is_image(n)]
    return classes, None


def _fingerprint(root: str, splits: dict[str, list[Entry]]) -> str:
    """Hash of every entry's split, path, file size and modification time, label and captions."""
    digest = hashlib.sha256()
    for split, entries in sorted(splits.items()):
        for e in entries:
            size, mtime = _file_identity(os.path.join(root, e.relpath))
            digest.update(json.dumps([split, e.relpath, size, mtime, e.label, e.captions]).encode())
    return digest.hexdigest()[:12]


def scan_folder(root: str) -> FolderScan:
    """Validates ``root`` against ``LAYOUT`` and lists its images.

    Raises:
      DatasetLayoutError: missing, mixed, inconsistent or empty layouts, with the expected layout.
    """
    if not _isdir(root):
        raise _error(root, "the folder does not exist (set DatasetSpec.manual_dir)")
    listing = _listing(root)
    names = list(listing)
    if listing.get("train"):
        extra = [n for n, is_dir in listing.items() if n not in SPLIT_FOLDERS and (is_dir or _is_image(n))]
        if extra:
            raise _error(root, f"{extra[:5]} sit beside the split folders; only train/ and test/ may")
        folders = {s: os.path.join(root, s) for s in SPLIT_FOLDERS if s in names}
    else:
        folders = {"train": root}
    scanned = {split: _scan_split(root, folder) for split, folder in folders.items()}
    class_mode = {split: "" not in groups for split, (groups, _) in scanned.items()}
    captioned = {split: caps is not None for split, (_, caps) in scanned.items()}
    if len(set(class_mode.values())) > 1 or len(set(captioned.values())) > 1:
        raise _error(root, f"splits disagree: class subfolders {class_mode}, captions {captioned}")
    class_names = tuple(sorted({c for groups, _ in scanned.values() for c in groups if c}))
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, (groups, caps) in scanned.items():
        entries = [Entry(rel, index[c] if c else None, tuple(caps[rel]) if caps else ())
                   for c, rels in groups.items() for rel in rels]
        if not entries:
            raise _error(root, f"split {split!r} ({folders[split]}) has no images (empty dataset)")
        splits[split] = sorted(entries, key=lambda e: e.relpath)
    return FolderScan(splits, class_names, any(captioned.values()), _fingerprint(root, splits))


def read_headers(root: str, entries: Iterable[Entry]) -> list[Header]:
    """Each entry's size and mode from its file header: PIL opens the file lazily and decodes no pixels.

    Raises:
      InvalidExampleError: one line naming the file PIL cannot identify.
    """
    headers = []
    for entry in entries:
        path = os.path.join(root, entry.relpath)
        try:
            with (open(path, "rb") if files.is_local(path) else files.as_path(path).open("rb")) as f, \
                    Image.open(f) as pil:
                headers.append(Header(entry.relpath, pil.size, pil.mode))
        except (OSError, Image.DecompressionBombError) as e:
            raise InvalidExampleError(f"example {entry.relpath!r}: cannot read the header of {path!r} ({e}); repair "
                                      "or remove that file") from None
    return headers
