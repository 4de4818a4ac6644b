"""The DP stage's secret seed: from the config (reproducibility mode, not secret), an owner-only file, the
environment, or drawn once from the OS and kept owner-only in the stage directory. It seeds the Poisson draws,
the noise and the DP step's per-example randomness; it is never written in the clear anywhere else (checkpoints
hold its commitment, `dpwave.privacy.seed_commitment`)."""

from __future__ import annotations

import json
import os
import secrets
import stat

import jax

from dpwave.train import loop
from dpwave.train.settings import Dp

SECRET_SEED_ENV = "DPWAVE_DP_SECRET_SEED"
SECRET_SEED_FILE = "secret_seed.json"
_MAX_SEED = 2**63 - 1
_DRAW = "python -c 'import secrets; print(secrets.randbits(62))'"


class SecretSeedError(ValueError):
    """The DP secret seed's file or environment variable is missing, unreadable, not owner-only or malformed."""


def _new_seed_file(path: str) -> str:
    return f"(umask 077; {_DRAW} > {path})"


def _parse_seed(text: str, where: str, fix: str) -> int:
    """The decimal seed in `text`; the error never repeats the text (it may be a mistyped secret)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_SEED:
        raise SecretSeedError(f"{where} must hold one decimal integer in [0, 2**63) and nothing else (its content "
                              f"is not shown); {fix}")
    return int(text)


def read_seed_file(path: str) -> int:
    """The seed in the owner-only file `path`, which holds one decimal integer."""
    where = f"dp.secret_seed_file {path!r}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SecretSeedError(f"{where} does not exist; create it with {_new_seed_file(path)}") from None
    except OSError as e:
        raise SecretSeedError(f"{where} cannot be read ({e.strerror}); make it a file you own and can read "
                              f"(chmod 600 {path})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretSeedError(f"{where} is not a regular file; point dp.secret_seed_file at a file holding "
                                  "the seed")
        if info.st_mode & 0o077:
            raise SecretSeedError(f"{where} has mode {stat.S_IMODE(info.st_mode):04o}: group or other users may "
                                  f"access it; make it owner-only with chmod 600 {path}")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return _parse_seed(text, where, f"write a fresh one with {_new_seed_file(path)}")


def seed_source(dp: Dp) -> tuple[int, str] | None:
    """The DP secret seed given by `dp.secret_seed`, `dp.secret_seed_file` or the environment variable
    DPWAVE_DP_SECRET_SEED, with how it was given; None when the stage draws its own (single host only).

    Raises SecretSeedError for a bad file or variable, more than one source, or a multi-host run without one.
    """
    given = [name for name, value in (("dp.secret_seed", dp.secret_seed), ("dp.secret_seed_file", dp.secret_seed_file),
                                      (SECRET_SEED_ENV, os.environ.get(SECRET_SEED_ENV))) if value is not None]
    if len(given) > 1:
        raise SecretSeedError(f"the DP secret seed is given more than once ({', '.join(given)}); keep only one")
    if dp.secret_seed is not None:
        return int(dp.secret_seed), "set in the config (reproducibility mode: NOT secret)"
    if dp.secret_seed_file is not None:
        return (read_seed_file(dp.secret_seed_file),
                "read from the owner-only file dp.secret_seed_file (secret)")
    if SECRET_SEED_ENV in os.environ:
        seed = _parse_seed(os.environ[SECRET_SEED_ENV], SECRET_SEED_ENV,
                           f"set it to the output of {_DRAW} (the same on every host)")
        return seed, f"read from the environment variable {SECRET_SEED_ENV} (secret)"
    if jax.process_count() > 1:
        raise SecretSeedError(
            "a multi-host DP run needs the same secret seed on every host: set dp.secret_seed_file to an owner-only "
            f"file every host can read (write one with {_new_seed_file('FILE')}), or export {SECRET_SEED_ENV} on "
            "every host")
    return None


def secret_seed(dp: Dp, stage_dir: str) -> tuple[int, str]:
    """The seed of the Poisson draws, the noise and the DP step's per-example randomness, and how it was given.

    Unless `seed_source` gives one, it is drawn once from the OS and kept in `<stage_dir>/secret_seed.json`
    (owner-only, in an owner-only directory), so a resumed run continues the same draws.
    """
    given = seed_source(dp)
    if given is not None:
        return given
    path = os.path.join(stage_dir, SECRET_SEED_FILE)
    if not os.path.exists(path):
        loop.private_dir(stage_dir)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"secret_seed": secrets.randbits(62)}, f)
        os.replace(tmp, path)
    with open(path) as f:
        return (int(json.load(f)["secret_seed"]),
                f"drawn from the OS, kept owner-only in the workdir ({os.path.basename(stage_dir)}/{SECRET_SEED_FILE})")
