"""The ``store`` output stage: each study's DICOM objects sent to a PACS after the run wrote
them (``cxrtool predict --dicom sr --store-to URL``, ``predict(..., outputs=[..., store_to(URL)])``).

What is sent: every file a study's result lists under ``outputs`` whose name ends in
``.dcm`` (its DICOM SR, ``outputs["sr"]``; any other DICOM object a stage lists), for the
studies of the run that have a result (predicted now, or done before); nothing of a study
that failed. The stage looks at each study once the stages after it have too (it sends a
study when the next one comes, the last one in ``finish``), so it sees what the run stored,
wherever it stands among the named stages.

Where to (``--store-to``):

- ``dicomweb://HOST:PORT/PATH`` (``dicomwebs://`` for https): STOW-RS with dicomweb-client,
  a study's objects in one request; an instance the server lists as failed is an error;
- ``dicom://AET@HOST:PORT``: C-STORE with pynetdicom, to called AE title AET, from calling
  AE title ``CXRTOOL`` (``--ae-title``); one association for the run, opened again when a
  new kind of object needs a presentation context the first did not ask for.

What was sent is recorded in ``cxrtool_sent.json`` in each output folder (beside its table):
destination -> file -> ``{"study", "sha256", "sop_instance_uid", "status": "sent", "at"}``,
or ``"status": "failed"`` with the ``error``. A file whose entry says sent with the same
content (sha256) is not sent again; one that failed is tried again by the next run, which
says so ("sent ... (retried: the last run could not: ...)"). A rewritten object (a new
result) is sent again.

A study whose objects cannot be sent says why in one line naming the server and what it
answered (refused association, HTTP status line, timeout, unreachable); its result stands,
the batch goes on, and the run's exit status is 1 (:attr:`cxrtool.runner.RunSummary.problems`).
After a failure that says the server cannot be reached at all (unreachable, timed out,
association refused), the rest of the run's studies are not tried: they fail with the same
line and are retried next run.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cxrtool.errors import UsageError
from cxrtool.io.dicomweb import describe, http_url, is_dicomweb, require_client, timeout_s
from cxrtool.io.records import sha256_file
from cxrtool.io.study import one_line
from cxrtool.stages import OutputKind, StudyOutcome

NAME = "store"
JOURNAL = "cxrtool_sent.json"  # in each output folder: what was sent where
DEFAULT_AE_TITLE = "CXRTOOL"
ENVIRONMENT = "CXRTOOL_STORE_TO"  # the destination of the registered stage (outputs=["store"]); the CLI takes --store-to
_FLUSH_EVERY_S = 30.0
_FORMS = "dicomweb://HOST:PORT/PATH (STOW-RS), dicomwebs://... (over https) or dicom://AET@HOST:PORT (C-STORE)"


class SendError(Exception):
    """Objects a destination did not take: one line naming it and what it answered.
    ``down``: the destination cannot be reached at all (the run tries it no more)."""

    def __init__(self, message: str, *, down: bool = False) -> None:
        super().__init__(message)
        self.down = down


# ----------------------------------------------------------------------------- destinations


class StowDestination:
    """A DICOMweb server, by STOW-RS (dicomweb-client)."""

    def __init__(self, text: str) -> None:
        service = text.rstrip("/")
        service = service[: -len("/studies")] if service.endswith("/studies") else service
        parts = urlsplit(http_url(service))
        if parts.query or parts.fragment:
            raise UsageError(f"--store-to {text}: the service's URL takes no query (dicomweb://HOST:PORT/PATH)")
        require_client()
        self.name = service
        self.http = parts.geturl()
        self._client: Any = None

    def send(self, files: Sequence[Path]) -> list[str]:
        import pydicom
        import requests

        from cxrtool.io.dicomweb import client

        datasets = [pydicom.dcmread(path) for path in files]
        if self._client is None:
            self._client = client(self.http)
        try:
            answer = self._client.store_instances(datasets)
        except Exception as error:  # noqa: BLE001 - whatever the server or the client did: said in one line
            down = isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout)
            raise SendError(describe(self.name, error), down=down) from None
        failed = list(answer.get("FailedSOPSequence", []) or [])
        if failed:
            item = failed[0]
            reason = item.get("FailureReason")
            code = f" (failure reason 0x{int(reason):04X})" if isinstance(reason, int) else ""
            raise SendError(f"{self.name}: the server did not store instance {item.get('ReferencedSOPInstanceUID', '?')}"
                            f"{code}" + (f" and {len(failed) - 1} more" if len(failed) > 1 else ""))
        return [str(dataset.SOPInstanceUID) for dataset in datasets]

    def close(self) -> None:
        self._client = None


class DimseDestination:
    """A DICOM node, by C-STORE (pynetdicom): ``dicom://AET@HOST:PORT``."""

    def __init__(self, text: str, ae_title: str = DEFAULT_AE_TITLE) -> None:
        parts = urlsplit(text)
        called = parts.username or ""
        try:
            port = parts.port
        except ValueError:
            port = None
        if not called or not parts.hostname or port is None or parts.path.strip("/") or parts.query:
            raise UsageError(f"--store-to {text}: a DICOM node is dicom://AET@HOST:PORT (its AE title, host and port)")
        for what, title in (("the called AE title", called), ("--ae-title", ae_title)):
            if not 0 < len(title) <= 16 or "\\" in title or not title.isprintable() or not title.strip():
                raise UsageError(f"{what} {title!r}: 1 to 16 printable characters, no backslash")
        try:
            import pynetdicom  # noqa: F401
        except ImportError:
            raise UsageError('sending to a DICOM node needs pynetdicom: pip install "cxrtool[pacs]"') from None
        self.name = f"dicom://{called}@{parts.hostname}:{port}"
        self.called, self.host, self.port, self.calling = called, parts.hostname, port, ae_title
        self._assoc: Any = None
        self._contexts: set[tuple[str, str]] = set()

    def _associate(self, needed: set[tuple[str, str]]) -> Any:
        from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt

        if self._assoc is not None and self._assoc.is_established and needed <= self._contexts:
            return self._assoc
        self.close()
        wanted = self._contexts | needed
        ae = AE(ae_title=self.calling)
        wait = timeout_s()
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = wait
        for sop_class in sorted({sop_class for sop_class, _ in wanted}):
            syntaxes = {syntax for cls, syntax in wanted if cls == sop_class}
            if any(not UID(syntax).is_compressed for syntax in syntaxes):
                syntaxes |= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
            ae.add_requested_context(sop_class, sorted(syntaxes))
        opened: list[bool] = []
        assoc = ae.associate(self.host, self.port, ae_title=self.called,
                             evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(True))])
        if assoc.is_established:
            self._assoc, self._contexts = assoc, wanted
            return assoc
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            why = f"{answer.result_str}, {answer.source_str}: {answer.reason_str}" if answer is not None else "no reason given"
            raise SendError(f"{self.name}: the association was refused ({why})", down=True)
        if not opened:
            raise SendError(f"{self.name}: unreachable ({self._why_unreachable(wait)})", down=True)
        raise SendError(f"{self.name}: the association was aborted before it was accepted "
                        f"(no answer within {wait:g} s, or the node hung up)", down=True)

    def _why_unreachable(self, wait: float) -> str:
        try:
            with socket.create_connection((self.host, self.port), timeout=wait):
                return "the connection opened, then failed"
        except TimeoutError:
            return f"no connection within {wait:g} s"
        except OSError as error:
            return f"[Errno {error.errno}] {error.strerror}" if error.errno else one_line(str(error), 120)

    def send(self, files: Sequence[Path]) -> list[str]:
        import pydicom

        datasets = [pydicom.dcmread(path) for path in files]
        needed = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        assoc = self._associate(needed)
        sent = []
        for dataset in datasets:
            try:
                status = assoc.send_c_store(dataset)
            except ValueError as error:  # no accepted presentation context for it
                raise SendError(f"{self.name}: the node takes no {dataset.SOPClassUID.name} here "
                                f"({one_line(str(error), 120)})") from None
            except RuntimeError as error:  # the association went away
                self.close()
                raise SendError(f"{self.name}: the association was lost ({one_line(str(error), 120)})", down=True) from None
            if not status:
                self.close()
                raise SendError(f"{self.name}: no answer to C-STORE within {timeout_s():g} s, or the association "
                                "was aborted", down=True)
            code = int(status.Status)
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success, or stored with a warning
                comment = status.get("ErrorComment")
                raise SendError(f"{self.name}: C-STORE of instance {dataset.SOPInstanceUID} failed with status "
                                f"0x{code:04X}" + (f": {one_line(str(comment), 120)}" if comment else ""))
            sent.append(str(dataset.SOPInstanceUID))
        return sent

    def close(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:  # noqa: BLE001 - closing what is gone: nothing to say
                pass
            self._assoc = None


def destination(text: str, *, ae_title: str = DEFAULT_AE_TITLE) -> StowDestination | DimseDestination:
    """Where ``--store-to`` sends, checked now (its form, the library it needs).

    Raises:
        UsageError: a URL of no known form (the forms listed), or the library not installed.
    """
    text = text.strip()
    if is_dicomweb(text):
        return StowDestination(text)
    if text.lower().startswith("dicom://"):
        return DimseDestination(text, ae_title)
    raise UsageError(f"--store-to {text!r}: give {_FORMS}")


# ----------------------------------------------------------------------------- the stage


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class StoreStage:
    """Send each study's DICOM objects to ``target`` (see the module), recording what was sent."""

    def __init__(self, context: Any, target: StowDestination | DimseDestination) -> None:
        self.context = context
        self.target = target
        self.waiting: StudyOutcome | None = None  # sent when the next study comes (the later stages done with it)
        self.journals: dict[Path, dict[str, Any]] = {}  # folder -> this destination's entries on disk
        self.pending: dict[Path, dict[str, Any]] = {}  # folder -> entries to record
        self.flushed = time.monotonic()
        self.down: str | None = None  # why the destination cannot be reached (no more tries this run)
        self.sent = self.before = self.unsent = 0

    def _say(self, line: str) -> None:
        if self.context is not None and getattr(self.context, "note", None) is not None:
            self.context.note(line)

    def study(self, outcome: StudyOutcome) -> None:
        previous, self.waiting = self.waiting, outcome
        if previous is not None:
            self._send(previous)
        if time.monotonic() - self.flushed > _FLUSH_EVERY_S:
            self._flush()

    def finish(self) -> list[Path]:
        try:
            if self.waiting is not None:
                waiting, self.waiting = self.waiting, None
                self._send(waiting)
        finally:
            self.target.close()
            self._flush()
        parts = [f"{self.sent} sent"] if self.sent or not (self.before or self.unsent) else []
        if self.before:
            parts.append(f"{self.before} sent before")
        if self.unsent:
            parts.append(f"{self.unsent} could not be sent (run again to retry them)")
        self._say(f"store: DICOM objects to {self.target.name}: {', '.join(parts)}")
        return []

    def _journal(self, folder: Path) -> dict[str, Any]:
        if folder not in self.journals:
            import json

            entries: dict[str, Any] = {}
            try:
                on_disk = json.loads((folder / JOURNAL).read_text(encoding="utf-8"))
                if isinstance(on_disk, dict) and isinstance(on_disk.get(self.target.name), dict):
                    entries = on_disk[self.target.name]
            except (OSError, ValueError):
                pass  # none yet, or unreadable: everything is sent (again), and recorded anew
            self.journals[folder] = entries
        return self.journals[folder]

    def _record(self, folder: Path, name: str, entry: dict[str, Any]) -> None:
        self._journal(folder)[name] = entry
        self.pending.setdefault(folder, {})[name] = entry

    def _flush(self) -> None:
        from cxrtool.io.outputs import update_json

        pending, self.pending = self.pending, {}
        for folder, entries in pending.items():
            def change(current: Any, entries: dict[str, Any] = entries) -> dict[str, Any]:
                journal = current if isinstance(current, dict) else {}
                mine = journal.get(self.target.name)
                journal[self.target.name] = {**(mine if isinstance(mine, dict) else {}), **entries}
                return journal

            update_json(folder / JOURNAL, change)
        self.flushed = time.monotonic()

    def _send(self, outcome: StudyOutcome) -> None:
        result = outcome.result
        if outcome.status == "failed" or result is None:
            return
        names = list(dict.fromkeys(name for files in result.outputs.values() for name in files
                                   if isinstance(name, str) and name.lower().endswith(".dcm")))
        if names:
            self.send_files(outcome.folder, outcome.path.name, names, where=str(outcome.path))

    def send_files(self, folder: Path, study: str, names: Sequence[str], *, where: str) -> None:
        """Send the DICOM objects ``names`` in ``folder`` (of the study named ``study``; a
        failure is said of ``where``), unless the journal says they were sent as they are."""
        journal = self._journal(folder)
        todo: list[tuple[str, Path, str, dict[str, Any] | None]] = []
        for name in names:
            path = folder / name
            try:
                digest = sha256_file(path)
            except OSError as error:
                self._fail(folder, study, where, [], f"{name} is listed in its result but cannot be read "
                                                     f"({error.strerror or type(error).__name__})")
                return
            entry = journal.get(name) if isinstance(journal.get(name), dict) else None
            if entry is not None and entry.get("status") == "sent" and entry.get("sha256") == digest:
                self.before += 1
                continue
            todo.append((name, path, digest, entry))
        if not todo:
            return
        if self.down is not None:
            self._fail(folder, study, where, todo, f"{self.down} (not tried again in this run)")
            return
        try:
            uids = self.target.send([path for _, path, _, _ in todo])
        except SendError as error:
            if error.down:
                self.down = str(error)
            self._fail(folder, study, where, todo, str(error))
            return
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:  # reading our own file back
            self._fail(folder, study, where, todo,
                       f"{self.target.name}: not sent: {type(error).__name__}: {one_line(str(error), 160)}")
            return
        retried = [entry for *_, entry in todo if entry is not None and entry.get("status") == "failed"]
        for (name, _, digest, _), uid in zip(todo, uids, strict=True):
            self._record(folder, name, {"study": study, "sha256": digest, "sop_instance_uid": uid,
                                        "status": "sent", "at": _now()})
        self.sent += len(todo)
        if retried:
            self._say(f"sent {where} to {self.target.name} (retried: the last run could not: "
                      f"{retried[0].get('error', 'no reason recorded')})")

    def _fail(self, folder: Path, study: str, where: str, todo: Sequence[tuple[str, Path, str, Any]],
              reason: str) -> None:
        for name, _, digest, _ in todo:
            self._record(folder, name, {"study": study, "sha256": digest, "status": "failed", "error": reason,
                                        "at": _now()})
        self.unsent += max(1, len(todo))
        line = f"not sent: {reason}"
        if self.context is not None and hasattr(self.context, "problems"):
            self.context.problems.append((where, line))
        self._say(f"{line}: {where}")


def store_to(url: str, *, ae_title: str = DEFAULT_AE_TITLE) -> OutputKind:
    """The store stage sending to ``url`` (checked now: see :func:`destination`), for
    ``predict(..., outputs=["sr", store_to(url)])``.

    Raises:
        UsageError: a URL of no known form, or a library it needs not installed.
    """
    target = destination(url, ae_title=ae_title)
    return OutputKind(NAME, f"send each study's DICOM objects to {target.name}",
                      lambda context: StoreStage(context, target))


def _from_environment(context: Any) -> StoreStage:
    url = os.environ.get(ENVIRONMENT, "").strip()
    if not url:
        raise UsageError(f"the store stage sends to a PACS: predict --store-to URL, {ENVIRONMENT}=URL, "
                         "or outputs=[store_to(URL)]")
    return StoreStage(context, destination(url, ae_title=os.environ.get("CXRTOOL_AE_TITLE") or DEFAULT_AE_TITLE))


STAGE = OutputKind(NAME, f"send each study's DICOM objects to a PACS ({ENVIRONMENT}: {_FORMS})", _from_environment)

__all__ = ["DEFAULT_AE_TITLE", "JOURNAL", "NAME", "STAGE", "DimseDestination", "SendError", "StoreStage",
           "StowDestination", "destination", "store_to"]
