"""Provenance and the one rule of "already done": what a result was made from
(:class:`Fingerprint` of each input file, the producer, the settings) and :func:`is_done`,
which predict, explain and radiomics all decide by."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cxrtool.io.study import open_regular

# A file modified this recently may change again within the file system's timestamp
# resolution without its stat changing: its stat is not trusted for the quick check.
_RACY_SECONDS = 2.0


# ----------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Fingerprint:
    """A file's content (SHA-256) and, for the quick check, the stat it had when hashed.

    :meth:`same_content` trusts an unchanged stat (size, modification and change times,
    inode: the file was not touched since) and otherwise hashes the file again, so a
    copied or touched study costs a hash, never a wrong answer.
    """

    sha256: str
    size: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    inode: int | None = None

    @classmethod
    def of(cls, path: str | os.PathLike) -> Fingerprint:
        before = os.stat(path)
        digest = sha256_file(path)
        after = os.stat(path)
        stable = _stat_key(before) == _stat_key(after) and time.time() - after.st_mtime > _RACY_SECONDS
        if not stable:
            return cls(digest)  # changing under us, or too fresh to trust its stat later
        return cls(digest, after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino)

    def unchanged_stat(self, path: str | os.PathLike) -> bool:
        if self.size is None:
            return False
        try:
            return _stat_key(os.stat(path)) == (self.size, self.mtime_ns, self.ctime_ns, self.inode)
        except OSError:
            return False

    def same_content(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` holds the content this fingerprint was taken of."""
        if self.unchanged_stat(path):
            return True
        try:
            return sha256_file(path) == self.sha256
        except OSError:
            return False

    def to_dict(self) -> dict[str, Any]:
        stat = {k: getattr(self, k) for k in ("size", "mtime_ns", "ctime_ns", "inode")}
        return {"sha256": self.sha256, "stat": stat if self.size is not None else None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Fingerprint | None:
        if not isinstance(values, Mapping) or not isinstance(values.get("sha256"), str):
            return None
        stat = values.get("stat") or {}
        return cls(values["sha256"], *(stat.get(k) for k in ("size", "mtime_ns", "ctime_ns", "inode")))


def _stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a regular file's content.

    Raises:
        NotRegularFile: a FIFO, device, socket or folder (which could block or never end).
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_digest(settings: Any) -> str:
    """A short stable digest of settings (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    """What a result was made from: its input files, its producer, its settings.

    Attributes:
        inputs: role -> fingerprint of each input file (``image``, ``mask``).
        producer: what made it: a model's checkpoint SHA-256, or the measuring code.
        settings: stage -> the settings of that stage that change the result.
    """

    inputs: Mapping[str, Fingerprint]
    producer: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": {role: fp.to_dict() for role, fp in self.inputs.items()}, "producer": self.producer,
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, values: Any) -> Provenance | None:
        if not isinstance(values, Mapping):
            return None
        inputs = {role: Fingerprint.from_dict(fp) for role, fp in (values.get("inputs") or {}).items()}
        if any(fp is None for fp in inputs.values()):
            return None
        return cls(inputs, str(values.get("producer", "")), dict(values.get("settings") or {}))  # type: ignore[arg-type]


def is_done(
    recorded: Provenance | None,
    *,
    inputs: Mapping[str, str | os.PathLike | None],
    producer: str,
    settings: Mapping[str, Any],
) -> bool:
    """The one rule of "already done", for every command.

    A recorded result is done when its producer is ``producer``, each stage in ``settings``
    was run with exactly those settings (a result may hold more stages: a study explained
    is also predicted), and every input file still holds the content it was made from.
    """
    if recorded is None or recorded.producer != producer:
        return False
    if any(recorded.settings.get(stage) != wanted for stage, wanted in settings.items()):
        return False
    for role, path in inputs.items():
        fingerprint = recorded.inputs.get(role)
        if path is None:
            if fingerprint is not None:
                return False
            continue
        if fingerprint is None or not fingerprint.same_content(path):
            return False
    return True
