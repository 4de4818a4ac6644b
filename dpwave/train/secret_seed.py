"""The DP stage's secret: from the config (reproducibility mode, not secret), an owner-only file, the environment,
or drawn once from the OS (256 bits) and kept owner-only in the stage directory. It seeds the Poisson draws, the
noise and the DP step's per-example randomness (`dpwave.privacy.DpSecret` derives each stream from all its bits);
it is never written in the clear anywhere else (checkpoints hold its commitment).

Files and the environment variable hold 32 to 64 hex digits (128 to 256 bits). A decimal seed below 2**63 (what
dpwave drew before, 62 bits) only resumes the run it started: a new run refuses a secret shorter than 128 bits.
"""

from __future__ import annotations

import json
import os
import secrets
import stat

import jax

from dpwave import privacy
from dpwave.privacy.secret import SECRET_BITS
from dpwave.train import loop
from dpwave.train.settings import Dp

SECRET_SEED_ENV = "DPWAVE_DP_SECRET_SEED"
SECRET_SEED_FILE = "secret_seed.json"
_HEX_DIGITS = (privacy.MIN_SECRET_BITS // 4, SECRET_BITS // 4)
_LEGACY_MAX = 2**63 - 1
_LEGACY_BITS = 63
_DRAW = f"python -c 'import secrets; print(secrets.token_hex({SECRET_BITS // 8}))'"


class SecretSeedError(ValueError):
    """The DP secret's file or environment variable is missing, unreadable, not owner-only, malformed or too short
    for a new run."""


def _new_seed_file(path: str) -> str:
    return f"(umask 077; {_DRAW} > {path})"


def _parse_secret(text: str, where: str, fix: str) -> privacy.DpSecret:
    """The secret in `text`: hex (up to 256 bits) or a legacy decimal seed below 2**63 (read first: a hex secret of
    19 digits or fewer is too short for a new run either way); the error never repeats the text."""
    text = text.strip()
    low, high = _HEX_DIGITS
    if text.isascii() and text.isdigit() and len(text) <= len(str(_LEGACY_MAX)) and int(text) <= _LEGACY_MAX:
        return privacy.DpSecret(int(text), _LEGACY_BITS)
    if text.isascii() and 0 < len(text) <= high and all(c in "0123456789abcdefABCDEF" for c in text):
        return privacy.DpSecret(int(text, 16), 4 * len(text))  # fewer than `low` digits: refused for a new run
    raise SecretSeedError(f"{where} must hold {low} to {high} hex digits ({privacy.MIN_SECRET_BITS} to "
                          f"{SECRET_BITS} bits) and nothing else (its content is not shown); {fix}")


def read_seed_file(path: str) -> privacy.DpSecret:
    """The secret in the owner-only file `path`."""
    where = f"dp.secret.seed_file {path!r}"
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
            raise SecretSeedError(f"{where} is not a regular file; point dp.secret.seed_file at a file holding "
                                  "the secret")
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
    return _parse_secret(text, where, f"write a fresh one with {_new_seed_file(path)}")


def seed_source(dp: Dp) -> tuple[privacy.DpSecret, str] | None:
    """The DP secret given by `dp.secret.seed`, `dp.secret.seed_file` or the environment variable
    DPWAVE_DP_SECRET_SEED, with how it was given; None when the stage draws its own (single host only).

    Raises SecretSeedError for a bad file or variable, more than one source, or a multi-host run without one.
    """
    given = [name for name, value in (("dp.secret.seed", dp.secret.seed), ("dp.secret.seed_file", dp.secret.seed_file),
                                      (SECRET_SEED_ENV, os.environ.get(SECRET_SEED_ENV))) if value is not None]
    if len(given) > 1:
        raise SecretSeedError(f"the DP secret seed is given more than once ({', '.join(given)}); keep only one")
    if dp.secret.seed is not None:
        value = int(dp.secret.seed)
        return (privacy.DpSecret(value, max(1, value.bit_length()), reproducible=True),
                "set in the config (reproducibility mode: NOT secret)")
    if dp.secret.seed_file is not None:
        return read_seed_file(dp.secret.seed_file), "read from the owner-only file dp.secret.seed_file (secret)"
    if SECRET_SEED_ENV in os.environ:
        secret = _parse_secret(os.environ[SECRET_SEED_ENV], SECRET_SEED_ENV,
                               f"set it to the output of {_DRAW} (the same on every host)")
        return secret, f"read from the environment variable {SECRET_SEED_ENV} (secret)"
    if jax.process_count() > 1:
        raise SecretSeedError(
            "a multi-host DP run needs the same secret on every host: set dp.secret.seed_file to an owner-only "
            f"file every host can read (write one with {_new_seed_file('FILE')}), or export {SECRET_SEED_ENV} on "
            "every host")
    return None


def has_checkpoints(stage_dir: str) -> bool:
    """Whether the DP stage has started (a resume, not a new run)."""
    try:
        return any(name.isdigit() for name in os.listdir(os.path.join(stage_dir, "checkpoints")))
    except OSError:
        return False


def check_strength(secret: privacy.DpSecret, origin: str, stage_dir: str) -> None:
    """Refuses a secret shorter than MIN_SECRET_BITS for a new run; a legacy seed may resume the run it started."""
    if secret.strong or has_checkpoints(stage_dir):
        return
    raise SecretSeedError(
        f"the DP secret ({origin.split(' (')[0]}) has {secret.bits} bits; a new DP run needs at least "
        f"{privacy.MIN_SECRET_BITS} (a decimal seed only resumes the run it started): write a new one with "
        f"{_new_seed_file('FILE')}")


def _draw(path: str) -> None:
    loop.private_dir(os.path.dirname(path))
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"secret_hex": secrets.token_hex(SECRET_BITS // 8)}, f)
    os.replace(tmp, path)


def _read_drawn(path: str) -> privacy.DpSecret:
    with open(path) as f:
        record = json.load(f)
    if "secret_hex" in record:
        return privacy.DpSecret(int(record["secret_hex"], 16), 4 * len(record["secret_hex"]))
    return privacy.DpSecret(int(record["secret_seed"]), _LEGACY_BITS)  # drawn before 256-bit secrets


def secret_seed(dp: Dp, stage_dir: str) -> tuple[privacy.DpSecret, str]:
    """The secret of the Poisson draws, the noise and the DP step's per-example randomness, and how it was given.

    Unless `seed_source` gives one, it is drawn once from the OS (256 bits) and kept in
    `<stage_dir>/secret_seed.json` (owner-only, in an owner-only directory), so a resumed run continues the same
    draws; a legacy 62-bit file there is replaced unless the stage has checkpoints to resume.
    """
    given = seed_source(dp)
    origin = (f"drawn from the OS, kept owner-only in the workdir ({os.path.basename(stage_dir)}/"
              f"{SECRET_SEED_FILE})")
    path = os.path.join(stage_dir, SECRET_SEED_FILE)
    if given is None and (not os.path.exists(path)
                          or not (_read_drawn(path).strong or has_checkpoints(stage_dir))):
        _draw(path)
    secret, origin = given if given is not None else (_read_drawn(path), origin)
    check_strength(secret, origin, stage_dir)
    return secret, origin
