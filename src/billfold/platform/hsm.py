"""A SoftHSM2 token in the data dir for development and tests (production configures a real HSM).

SoftHSM2 reads `SOFTHSM2_CONF` once, when the PKCS#11 module is initialised (python-pkcs11 loads
and initialises one library object per module path per process), so `ensure_softhsm_token` must
run before the first `Pkcs11KeyStore.open` of the process, and every later call in the process
must name the same data dir.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SOFTHSM_UTIL = "softhsm2-util"

# The configuration file this process pointed SoftHSM2 at (None until the first call).
_process_conf: Path | None = None


class HsmUnavailable(RuntimeError):
    """SoftHSM2 is not installed, or the token could not be initialised."""


@dataclass(frozen=True)
class SoftHsmToken:
    conf: Path
    label: str
    pin: str


def softhsm_available(module: str = "/usr/lib/softhsm/libsofthsm2.so") -> bool:
    return shutil.which(SOFTHSM_UTIL) is not None and Path(module).exists()


def ensure_softhsm_token(data_dir: Path, label: str, pin: str = "") -> SoftHsmToken:
    """Point SoftHSM2 at `<data_dir>/hsm/tokens` and make sure a token labelled `label` exists.

    An empty `pin` means "use (or generate) the one kept in `<data_dir>/hsm/pin`" (mode 0600);
    the SO PIN is generated beside it. Safe to call again and from several processes at once
    (a file lock serialises the initialisation)."""
    global _process_conf
    if shutil.which(SOFTHSM_UTIL) is None:
        raise HsmUnavailable("softhsm2-util is not installed (apt-get install softhsm2)")
    hsm_dir = Path(data_dir).resolve() / "hsm"
    tokens = hsm_dir / "tokens"
    conf = hsm_dir / "softhsm2.conf"
    if _process_conf is not None and _process_conf != conf:
        raise HsmUnavailable(
            f"this process already uses SoftHSM2 configuration {_process_conf}; the module "
            "reads it once, so one process cannot switch to another data dir"
        )
    tokens.mkdir(parents=True, exist_ok=True)
    with _locked(hsm_dir / ".lock"):
        if not conf.exists():
            conf.write_text(
                f"directories.tokendir = {tokens}\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n"
                "slots.removable = false\n"
            )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        _process_conf = conf
        user_pin = pin or _secret_file(hsm_dir / "pin")
        if label not in _token_labels():
            so_pin = _secret_file(hsm_dir / "so-pin")
            _util("--init-token", "--free", "--label", label, "--pin", user_pin, "--so-pin", so_pin)
    return SoftHsmToken(conf, label, user_pin)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _secret_file(path: Path) -> str:
    if not path.exists():
        # Digits and letters only: some HSM tools take the PIN on a command line.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
    return path.read_text().strip()


def _token_labels() -> set[str]:
    out = _util("--show-slots")
    return {
        line.split(":", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("Label:")
    }


def _util(*args: str) -> str:
    try:
        done = subprocess.run(  # noqa: S603 (fixed program, arguments are ours)
            [SOFTHSM_UTIL, *args], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as exc:
        raise HsmUnavailable(f"{SOFTHSM_UTIL} could not run: {exc}") from exc
    if done.returncode != 0:
        # The PINs are on our command line, never in softhsm2-util's messages.
        raise HsmUnavailable(f"{SOFTHSM_UTIL} {args[0]} failed: {done.stderr.strip()}")
    return done.stdout
