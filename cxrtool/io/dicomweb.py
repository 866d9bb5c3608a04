"""Studies on a DICOMweb server (a PACS): listed with QIDO-RS, fetched with WADO-RS into a
local cache, where every command then sees ordinary DICOM files; and the one place that
recognises the ``dicomweb://`` and ``dicomwebs://`` URLs (:func:`is_dicomweb`).

A source is a study, a series or a QIDO query of studies on a server::

    dicomweb://HOST:PORT/PATH/studies/STUDY_UID
    dicomweb://HOST:PORT/PATH/studies/STUDY_UID/series/SERIES_UID
    dicomweb://HOST:PORT/PATH/studies?PatientID=P123&StudyDate=20240101-20240131

``dicomweb://`` is the service at ``http://HOST:PORT/PATH``, ``dicomwebs://`` the same over
https; dicomweb-client (``pip install "cxrtool[pacs]"``) speaks to it.

The cache (``--cache DIR``, by default ``OUT/dicomweb`` under ``--out``) holds each image
instance as ``CACHE/<server>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, ``<server>`` being
``HOST_PORT_PATH`` with anything but letters, digits, ``.`` and ``-`` made ``_``. A cached
study's outputs go beside it (its sidecar, its DICOM SR, the study folder's table): the
cache is their output folder, whatever ``--out`` mirrors for local inputs. So the rules of
local files hold unchanged: a study whose cached instance is there and whose sidecar says
this model is done with it is skipped *without being fetched again* (the QIDO list is
fetched each run; WADO only for instances not done); any other instance is fetched again
(a file of the same content leaves the results of other models in place, a changed one
makes them stale), written atomically. Instances that are not images (an SR, a
presentation state, a key object selection: cxrtool's own SRs stored back among them) are
passed over, and counted.

What the server answers, when it fails, becomes one line naming it (:func:`describe`): the
listing of a source that fails fails that source, the fetch of an instance that fails fails
that study; the rest of the batch goes on.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cxrtool.errors import UsageError, env_seconds
from cxrtool.io.study import StudyReadError, one_line

# The URL schemes of DICOMweb sources and destinations, and the HTTP scheme each maps to.
SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
CACHE_FOLDER = "dicomweb"  # the cache's default place: OUT/dicomweb
PASSED_NOT_IMAGE = "not an image (on the DICOMweb server: SR, KO, PR...)"
_INSTALL = 'reading from or sending to a PACS needs dicomweb-client and pynetdicom: pip install "cxrtool[pacs]"'


def timeout_s() -> float:
    """Seconds to wait for a server (to connect, and for each answer): ``CXRTOOL_PACS_TIMEOUT``, default 30."""
    return env_seconds("CXRTOOL_PACS_TIMEOUT", 30.0)


def is_dicomweb(text: str | os.PathLike) -> bool:
    """Whether an input or destination is a DICOMweb URL (``dicomweb://`` or ``dicomwebs://``)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def http_url(text: str) -> str:
    """The http(s) URL dicomweb-client is given for a ``dicomweb(s)://`` one (``dicomweb://h:p/x`` -> ``http://h:p/x``).

    Raises:
        UsageError: not a DICOMweb URL, or one without a host.
    """
    if not is_dicomweb(text):
        raise UsageError(f"{text!r} is not a DICOMweb URL (dicomweb://HOST:PORT/PATH or dicomwebs://...)")
    scheme, _, rest = text.partition("://")
    parts = urlsplit(f"{SCHEMES[scheme.lower()]}://{rest}")
    if not parts.hostname:
        raise UsageError(f"{text}: no server named (dicomweb://HOST:PORT/PATH/studies/STUDY_UID)")
    try:
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise UsageError(f"{text}: the port is not a number") from None
    return parts.geturl()


@dataclass(frozen=True)
class Source:
    """A DICOMweb input: the service (as given and as http), and what of it to read."""

    text: str  # as given
    service: str  # dicomweb(s)://HOST:PORT/PATH, the server as messages name it
    http: str  # http(s)://HOST:PORT/PATH, what dicomweb-client is given
    study: str | None = None
    series: str | None = None
    filters: Mapping[str, str] = field(default_factory=dict)  # a QIDO query of studies

    @property
    def folder_name(self) -> str:
        """The server's folder in the cache: HOST_PORT_PATH, only letters, digits, ``.``, ``-`` and ``_``."""
        parts = urlsplit(self.http)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        name = "_".join(p for p in (parts.hostname or "", str(port), parts.path.strip("/")) if p)
        return re.sub(r"[^A-Za-z0-9.-]+", "_", name)[:120]


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def parse_source(text: str) -> Source:
    """A DICOMweb input as a :class:`Source`.

    Raises:
        UsageError: a URL that names no study, series or query of studies (its forms listed).
    """
    http = http_url(text)
    parts = urlsplit(http)
    segments = parts.path.rstrip("/").split("/")
    forms = ("give .../studies/STUDY_UID, .../studies/STUDY_UID/series/SERIES_UID or a query of studies, "
             ".../studies?PatientID=ID")
    if "studies" not in segments:
        raise UsageError(f"{text}: no studies named; {forms}")
    at = len(segments) - 1 - segments[::-1].index("studies")
    root, rest = "/".join(segments[:at]), segments[at + 1:]
    scheme = text.partition("://")[0].lower()
    service = f"{scheme}://{parts.netloc}{root}"
    base = f"{parts.scheme}://{parts.netloc}{root}"
    filters = dict(parse_qsl(parts.query, keep_blank_values=False))
    study = series = None
    if len(rest) == 1 and rest[0]:
        study = rest[0]
    elif len(rest) == 3 and rest[1] == "series":
        study, series = rest[0], rest[2]
    elif rest:
        raise UsageError(f"{text}: not a study, a series or a query; {forms}")
    if study is None and not filters:
        raise UsageError(f"{text}: every study on the server? Name one, or query them; {forms}")
    for uid in (study, series):
        if uid is not None and not _UID.match(uid):
            raise UsageError(f"{text}: {uid!r} is not a DICOM UID (digits and dots)")
    return Source(text, service, base, study, series, filters)


def require_client() -> Any:
    """dicomweb-client's client class.

    Raises:
        UsageError: it is not installed (what to install).
    """
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise UsageError(_INSTALL) from None
    return DICOMwebClient


def client(http: str) -> Any:
    """A dicomweb-client for a service (http(s)://HOST:PORT/PATH), with cxrtool's timeout
    and at most 3 tries of an answer that asks to retry (429, 503...)."""
    made = require_client()(http, timeout=timeout_s())
    made.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return made


def describe(service: str, error: BaseException) -> str:
    """What went wrong with a server, in one line that names it: unreachable, timed out,
    its HTTP status line (and what its body says), or an answer that is not DICOMweb."""
    import requests

    try:
        from retrying import RetryError
    except ImportError:  # (dicomweb-client's dependency)
        RetryError = ()
    response = getattr(error, "response", None)
    if isinstance(error, RetryError) and isinstance(getattr(error.last_attempt, "value", None), requests.Response):
        response = error.last_attempt.value  # still asking to retry after the last try
    if response is not None and isinstance(response, requests.Response) and response.status_code >= 400:
        return f"{service}: the server answered HTTP {response.status_code} {response.reason or ''}".rstrip() + \
            _body(response)
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return f"{service}: unreachable (no connection within {timeout_s():g} s)"
    if isinstance(error, requests.exceptions.Timeout):
        return f"{service}: no answer within {timeout_s():g} s (timed out)"
    if isinstance(error, requests.exceptions.ConnectionError):
        text = str(error)
        found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
        if found:
            return f"{service}: unreachable ({found.group(0).strip()})"
        if "RemoteDisconnected" in text or "Connection aborted" in text:
            return f"{service}: the server closed the connection without an answer"
        return f"{service}: unreachable ({one_line(text, 160)})"
    if isinstance(error, requests.exceptions.RequestException):
        return f"{service}: {one_line(str(error), 200)}"
    return f"{service}: an answer that is not DICOMweb ({type(error).__name__}: {one_line(str(error), 160)})"


def _body(response: Any) -> str:
    """What an error answer's body says (Orthanc: its JSON's Details or Message), on one line; '' when nothing."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        text = str(payload.get("Details") or payload.get("Message") or "")
    else:
        text = response.text if len(response.content or b"") < 4096 else ""
        text = "" if "<html" in text[:200].lower() else text
    text = one_line(text, 160)
    return f": {text}" if text else ""


class FetchError(StudyReadError):
    """An instance that could not be fetched; the message names the server and what it answered."""


# Classes of DICOM objects that are never images, by SOP Class UID prefix (SR and key
# objects, presentation states, raw data, registrations, SEG, documents, RT objects), and
# the modalities of such objects: passed over when a study is listed.
_NOT_IMAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.66",
                      "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.9.")
_NOT_IMAGE_MODALITIES = {"SR", "KO", "PR", "SEG", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "FID", "AU",
                         "ECG"}


def _value(item: Mapping[str, Any], tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class Instance:
    """An image instance on a server, and where the cache keeps it."""

    source: Source
    study: str
    series: str
    sop: str


class RemoteStudies:
    """The DICOMweb inputs of a run: :meth:`expand` lists a source's image instances (QIDO-RS)
    as the paths their cached copies have (present or not yet); :meth:`fetch` brings one
    over (WADO-RS): the run calls it for the studies it does, not for those it skips.

    ``cache`` is the folder the copies go in (None: a DICOMweb input is refused, saying
    how to give one). Picklable and fork-safe (each process makes its own connections),
    so decoding workers fetch in parallel.
    """

    def __init__(self, cache: str | os.PathLike | None) -> None:
        self.cache = Path(cache) if cache is not None else None
        self.instances: dict[Path, Instance] = {}  # cached path -> what it is a copy of
        self.unlisted: list[tuple[str, str]] = []  # sources whose listing failed: (URL, one line)
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __contains__(self, path: object) -> bool:
        return path in self.instances

    def __bool__(self) -> bool:
        return bool(self.instances)

    def _client(self, source: Source) -> Any:
        clients = self._local.__dict__.setdefault("clients", {})
        key = (os.getpid(), source.http)  # a forked worker makes its own connections
        if key not in clients:
            clients[key] = client(source.http)
        return clients[key]

    def expand(self, text: str, passed: dict[str, int] | None = None) -> Iterator[Path]:
        """The cached paths of a source's image instances (listed by QIDO-RS: a study's or a
        series' instances, a query's studies' instances), sorted by study, series and instance.
        A listing that fails is recorded in :attr:`unlisted` (the source yields nothing).

        Raises:
            UsageError: a malformed URL, no cache folder, dicomweb-client not installed.
        """
        source = parse_source(text)
        if self.cache is None:
            raise UsageError(f"{text}: a study from a DICOMweb server needs a folder to be cached in: "
                             f"--out DIR (it goes under DIR/{CACHE_FOLDER}) or --cache DIR")
        require_client()
        try:
            listed = self._list(source)
        except UsageError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the server or the client did: said in one line
            self.unlisted.append((text, describe(source.service, error)))
            return
        if not listed:
            what = f"study {source.study}" if source.series is None else f"series {source.series}"
            found = "no study matches the query" if source.study is None else f"no image instance of {what}"
            self.unlisted.append((text, f"{source.service}: {found}"))
            return
        server = self.cache / source.folder_name
        for instance, is_image in listed:
            if not is_image:
                if passed is not None:
                    passed[PASSED_NOT_IMAGE] = passed.get(PASSED_NOT_IMAGE, 0) + 1
                continue
            path = server / instance.study / f"{instance.sop}.dcm"
            self.instances[path] = instance
            yield path

    def _list(self, source: Source) -> list[tuple[Instance, bool]]:
        web = self._client(source)
        studies = [source.study] if source.study else []
        if source.study is None:
            found = web.search_for_studies(search_filters=dict(source.filters), get_remaining=True)
            studies = sorted({uid for uid in (_value(item, "0020000D") for item in found) if uid and _UID.match(uid)})
        listed = []
        for study in studies:
            items = web.search_for_instances(study_instance_uid=study, series_instance_uid=source.series,
                                             get_remaining=True)
            for item in items:
                series, sop = _value(item, "0020000E"), _value(item, "00080018")
                if not series or not sop or not _UID.match(series) or not _UID.match(sop):
                    continue  # nothing to fetch it by (or a name that would leave the cache)
                sop_class, modality = _value(item, "00080016") or "", (_value(item, "00080060") or "").upper()
                is_image = not (sop_class.startswith(_NOT_IMAGE_CLASSES) or modality in _NOT_IMAGE_MODALITIES)
                listed.append((Instance(source, study, series, sop), is_image))
        listed.sort(key=lambda entry: (entry[0].study, entry[0].series, entry[0].sop))
        return listed

    def fetch(self, path: Path) -> None:
        """Fetch an instance into its cached path (WADO-RS, in the transfer syntax the server
        has it in), written atomically; a path that is not from a server is left alone.

        Raises:
            FetchError: one line naming the server and what it answered.
        """
        instance = self.instances.get(path)
        if instance is None:
            return
        from cxrtool.errors import OutputError
        from cxrtool.io.outputs import atomic_path

        source = instance.source
        try:
            dataset = self._client(source).retrieve_instance(instance.study, instance.series, instance.sop,
                                                             media_types=(("application/dicom", "*"),))
        except Exception as error:  # noqa: BLE001 - whatever the server or the client did: this study's reason
            raise FetchError(f"could not be fetched: {describe(source.service, error)}") from None
        got = str(dataset.get("SOPInstanceUID", ""))
        if got != instance.sop:
            raise FetchError(f"could not be fetched: {source.service} sent instance {one_line(got, 80)!r} "
                             f"for {instance.sop}")
        try:
            with atomic_path(path) as tmp:
                dataset.save_as(tmp, enforce_file_format=True)
        except OutputError as error:
            raise FetchError(f"could not be cached: {error}") from None
        except (ValueError, TypeError, AttributeError, OSError) as error:
            raise FetchError(f"could not be cached: {type(error).__name__}: {one_line(str(error), 160)}") from None


__all__ = ["CACHE_FOLDER", "SCHEMES", "FetchError", "Instance", "RemoteStudies", "Source", "client", "describe",
           "http_url", "is_dicomweb", "parse_source", "require_client", "timeout_s"]
