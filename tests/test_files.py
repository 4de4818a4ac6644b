"""dpwave.files: atomic, process-0-aware reads and writes on a local disk and on a (fake) gs:// bucket."""
import json
import math
import os
import stat
from unittest import mock

import jax
import numpy as np
import pytest
from helpers.fake_bucket import fake_bucket

from dpwave import files

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A folder on the local disk, or in a fresh in-memory gs:// bucket."""
    if request.param == "local":
        yield str(tmp_path)
    else:
        with fake_bucket():
            yield "gs://bucket/run"


def _names(folder) -> list[str]:
    return sorted(p.name for p in files.as_path(folder).iterdir())


def test_json_is_strict_with_non_finite_floats_as_strings(root):
    path = f"{root}/sub/summary.json"
    data = {"epsilon": math.inf, "low": -math.inf, "nan": math.nan, "np": [np.float32(np.inf), np.float64(1.5)],
            "n": 3, "s": "x"}
    assert str(files.write_json(path, data)) == path
    text = files.read_text(path)
    json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in strict JSON"))
    got = files.read_json(path)
    assert got == {"epsilon": "Infinity", "low": "-Infinity", "nan": "NaN", "np": ["Infinity", 1.5], "n": 3, "s": "x"}
    assert float(got["epsilon"]) == math.inf and float(got["low"]) == -math.inf and math.isnan(float(got["nan"]))


def test_read_json_reads_legacy_bare_tokens_and_defaults(root):
    files.write_text(f"{root}/old.jsonl", '{"loss": NaN, "epsilon": Infinity}')
    got = files.read_json(f"{root}/old.jsonl")
    assert math.isnan(got["loss"]) and got["epsilon"] == math.inf
    assert files.read_json(f"{root}/missing.json", None) is None
    with pytest.raises(FileNotFoundError):
        files.read_json(f"{root}/missing.json")


def test_npz_and_text_round_trip(root):
    arrays = {"images": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "labels": np.array([3, 1])}
    files.write_npz(f"{root}/samples.npz", arrays, compressed=True)
    got = files.read_npz(f"{root}/samples.npz")
    assert got.keys() == arrays.keys() and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    files.write_text(f"{root}/report.md", "# ε report\n")
    assert files.read_text(f"{root}/report.md") == "# ε report\n"


def test_a_failed_serialization_leaves_the_old_file(root):
    path = f"{root}/metrics.json"
    files.write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"v": object()})
    assert files.read_json(path) == {"v": 1} and _names(root) == ["metrics.json"]


def test_a_crash_mid_write_leaves_the_old_file_and_no_temporary(root):
    path = f"{root}/summary.json"
    files.write_json(path, {"v": 1})
    if root.startswith("gs://"):
        backend = files.as_path(path)._backend
        real_open = backend.memory.open

        def half_then_fail(name, mode="rb", **kw):
            handle = real_open(name, mode, **kw)
            if "w" in mode:
                real_write = handle.write

                def write(data):
                    real_write(data[: len(data) // 2])
                    raise OSError("connection reset")

                handle.write = write
            return handle

        patch = mock.patch.object(backend.memory, "open", half_then_fail)
    else:
        patch = mock.patch.object(os, "fsync", side_effect=OSError("disk full"))
    with patch, pytest.raises(OSError):
        files.write_json(path, {"v": 2, "padding": "x" * 1000})
    assert files.read_json(path) == {"v": 1} and _names(root) == ["summary.json"]


def test_temporary_names_are_unique_per_write():
    path = files.as_path("/tmp/x/summary.json")
    names = {files._temporary(path).name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".summary.json.tmp-0-") for n in names)


def test_only_process_0_writes(root):
    with mock.patch.object(jax, "process_index", return_value=1):
        assert files.write_json(f"{root}/a.json", {"v": 1}) is None
        assert files.write_npz(f"{root}/a.npz", {"x": np.zeros(2)}) is None
        assert not files.exists(f"{root}/a.json") and not files.exists(f"{root}/a.npz")
        assert files.write_text(f"{root}/b.txt", "mine", all_processes=True) is not None
        assert files.read_text(f"{root}/b.txt") == "mine"
        assert ".b.txt.tmp-1-" not in " ".join(_names(root))


def test_private_files_and_folders_are_owner_only(tmp_path):
    folder = files.makedirs(tmp_path / "dp_finetune", private=True)
    path = files.write_json(folder / "secret.json", {"k": 1}, private=True)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_appender_local_writes_reach_the_file_at_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with files.Appender(path) as out:
        out.write("a\n")
        assert path.read_text() == "old\na\n"
        out.write("b\n")
    assert path.read_text() == "old\na\nb\n"


def test_appender_on_a_bucket_rewrites_the_whole_file_at_flush():
    with fake_bucket():
        path = "gs://bucket/run/log.txt"
        files.write_text(path, "earlier run\n")
        with files.Appender(path, flush_every_s=3600) as out:
            out.write("line 1\n")
            assert files.read_text(path) == "earlier run\n"  # buffered: no append on object stores
            out.flush()
            assert files.read_text(path) == "earlier run\nline 1\n"
            out.write("line 2\n")
        assert files.read_text(path) == "earlier run\nline 1\nline 2\n"
        with files.Appender("gs://bucket/run/events", binary=True, flush_every_s=0) as out:
            out.write(b"\x00\x01")
            assert files.read_bytes("gs://bucket/run/events") == b"\x00\x01"
        assert _names("gs://bucket/run") == ["events", "log.txt"]


def test_fake_bucket_is_not_the_local_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fake_bucket():
        files.write_json("gs://bucket/run/summary.json", {"v": 1})
        assert files.exists("gs://bucket/run/summary.json")
    assert not os.path.exists(tmp_path / "gs:")


def test_image_folder_is_scanned_and_decoded_from_a_bucket():
    import io

    from PIL import Image

    from dpwave.data.builders.folder_scan import scan_folder
    from dpwave.data.images import read_image_file

    with fake_bucket():
        for i, name in enumerate(("a.png", "b.png")):
            buffer = io.BytesIO()
            Image.fromarray(np.full((6, 5, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
            files.write_bytes(f"gs://bucket/images/{name}", buffer.getvalue())
        files.write_text("gs://bucket/images/captions.jsonl",
                         '{"file": "a.png", "caption": "dark"}\n{"file": "b.png", "caption": "grey"}\n')
        scan = scan_folder("gs://bucket/images")
        assert [(e.relpath, e.captions) for e in scan.splits["train"]] == [("a.png", ("dark",)), ("b.png", ("grey",))]
        assert read_image_file("gs://bucket/images/b.png", "b.png").max() == 40
