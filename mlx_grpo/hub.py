"""Calls to the Hugging Face Hub: bounded waits, one line before them, one line when they fail.

A Hub endpoint that accepts the connection and never answers (a proxy that swallows traffic, a
captive portal, a firewall that drops replies) would otherwise hold a command for minutes without
a word: huggingface_hub's shared HTTP client (since its 1.0) has no timeout of its own, so the
metadata calls that pass none (``repo_info`` and ``list_repo_tree``, which every
``snapshot_download`` makes first) wait forever, and ``hf_hub_download`` retries an unanswered
metadata request six more times with 60 s each. Here:

- ``set_timeout_defaults`` gives ``HF_HUB_ETAG_TIMEOUT`` (metadata, and connecting) and
  ``HF_HUB_DOWNLOAD_TIMEOUT`` (each read of a file download) defaults, unless the user set them;
  huggingface_hub reads both once, when it is imported, so the CLI calls this first of all;
- ``contacting`` says which name it fetches before the wait, and gives every request of
  huggingface_hub that carries no timeout the metadata one;
- ``hub_file`` fetches one file, failing after one unanswered metadata request;
- ``unreachable`` turns the timeout or connection error at the root of a failed call into the
  reason a one-line error quotes: the timeout that passed, the variable that raises it, and
  ``HF_HUB_OFFLINE=1`` to use the local cache.

Nothing here imports huggingface_hub at module level: importing it reads the variables.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, MutableMapping, Optional
from urllib.parse import urlsplit

from .errors import UserError, first_line

ETAG_TIMEOUT = "HF_HUB_ETAG_TIMEOUT"
DOWNLOAD_TIMEOUT = "HF_HUB_DOWNLOAD_TIMEOUT"
# Seconds. Metadata answers are small, so 10 s (huggingface_hub's own default) is ample even far
# from the Hub; a file read gets 60 s (the library's default is 10) because a CDN may pause that
# long mid-file on a slow link, and this waits between reads, not for the whole file.
DEFAULT_TIMEOUTS = {ETAG_TIMEOUT: 10, DOWNLOAD_TIMEOUT: 60}


class HubSettingError(UserError, ValueError):
    """A Hub timeout variable that is not a whole number of seconds; the message names it."""


def set_timeout_defaults(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Set ``HF_HUB_ETAG_TIMEOUT`` and ``HF_HUB_DOWNLOAD_TIMEOUT`` in ``environ`` (default
    ``os.environ``) to ``DEFAULT_TIMEOUTS`` where they are unset or empty; a value the user set is
    kept, and checked: ``HubSettingError`` when it is not a whole number of seconds >= 1
    (huggingface_hub would stop with a traceback at its import on ``'ten'``, and take 0 as its
    own default). Call it before huggingface_hub is first imported, which reads them once."""
    env = os.environ if environ is None else environ
    for name, default in DEFAULT_TIMEOUTS.items():
        value = env.get(name, "").strip()
        if not value:
            env[name] = str(default)
            continue
        try:
            ok = int(value) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise HubSettingError(f"{name}: expected a whole number of seconds (at least 1), got {value!r}")


def offline() -> bool:
    """True when huggingface_hub will not contact the Hub (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)  # newer versions: a function
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


@contextmanager
def contacting(name: str) -> Iterator[None]:
    """Around a huggingface_hub call that fetches ``name`` (a model, dataset or file, as the
    user wrote it): says ``contacting the Hub for NAME`` on stderr before the wait, unless
    ``HF_HUB_OFFLINE=1``, and bounds each request of the call (``_bound_requests``). The line
    shows even when ``name`` is cached: huggingface_hub still asks the Hub for its newest
    revision, and waits for the answer."""
    if not offline():
        _bound_requests()
        print(f"contacting the Hub for {name}", file=sys.stderr, flush=True)
    yield


def hub_file(repo: str, filename: str, revision: Optional[str] = None) -> Path:
    """The local path of ``filename`` in Hub model repository ``repo``, downloaded into the
    Hugging Face cache (or found there), within ``contacting``. When the file is not cached yet,
    one metadata request comes first: ``hf_hub_download`` answers a first unanswered request with
    six more of 60 s each (about 6 minutes), this one fails after ``HF_HUB_ETAG_TIMEOUT``. A
    cached file needs no such request: the library then falls back to it after one timeout."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    with contacting(f"{filename} in {repo}"):
        if not offline() and not isinstance(try_to_load_from_cache(repo, filename, revision=revision), str):
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return Path(hf_hub_download(repo, filename, revision=revision))


def unreachable(e: BaseException) -> Optional[str]:
    """The reason to quote when ``e`` (or an exception it was raised from) is a timeout or a
    connection error of a Hub request, e.g. ``no answer from the Hub (https://huggingface.co)
    within 10 s (HF_HUB_ETAG_TIMEOUT); raise HF_HUB_ETAG_TIMEOUT to wait longer, or set
    HF_HUB_OFFLINE=1 to use the local cache``; None for any other failure."""
    cause = _network_cause(e)
    if cause is None:
        return None
    kinds = {k.__name__ for k in type(cause).__mro__}
    request = _request_of(cause)
    where = ""
    if request is not None:
        url = urlsplit(str(request.url))
        where = f" ({url.scheme}://{url.netloc})"
    cache = "set HF_HUB_OFFLINE=1 to use the local cache"
    if not kinds & {"TimeoutException", "Timeout", "TimeoutError"}:
        return f"cannot reach the Hub{where}: {first_line(cause)}; check the network (or HF_ENDPOINT), or {cache}"
    var = _timeout_variable(request)
    connect = "ConnectTimeout" in kinds
    seconds = _seconds(request, "connect" if connect else "read") or os.environ.get(var) or str(DEFAULT_TIMEOUTS[var])
    what = "could not connect to the Hub" if connect else "no answer from the Hub"
    return f"{what}{where} within {seconds} s ({var}); raise {var} to wait longer, or {cache}"


# The network errors of the HTTP libraries huggingface_hub has used (httpx, requests) and of the
# socket layer, by class and module name, so that neither library has to be imported to recognise
# them; the module keeps out look-alikes such as filelock's Timeout (a cache lock, not the network).
_NETWORK_ERRORS = {"TimeoutException", "NetworkError", "ConnectError", "ConnectionError", "Timeout",
                   "TimeoutError", "ProxyError", "RemoteProtocolError"}
_NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "builtins", "socket", "ssl"}


def _network_cause(e: BaseException) -> Optional[BaseException]:
    """The first timeout or connection error in ``e``'s chain of causes (huggingface_hub raises
    its own error, e.g. LocalEntryNotFoundError, from the HTTP library's)."""
    seen = set()
    link: Optional[BaseException] = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        network = {k.__name__ for k in type(link).__mro__} & _NETWORK_ERRORS
        if network and type(link).__module__.split(".")[0] in _NETWORK_MODULES:
            return link
        link = link.__cause__ or link.__context__
    return None


def _request_of(e: BaseException) -> Any:
    """The HTTP request ``e`` was raised for, or None (httpx raises when it has none)."""
    try:
        return getattr(e, "request", None)
    except Exception:
        return None


def _timeout_variable(request: Any) -> str:
    """Which variable set the timeout of ``request``: a file download (GET .../resolve/...) reads
    under HF_HUB_DOWNLOAD_TIMEOUT, every other request (metadata) waits HF_HUB_ETAG_TIMEOUT."""
    if request is not None and request.method == "GET" and "/resolve/" in str(request.url):
        return DOWNLOAD_TIMEOUT
    return ETAG_TIMEOUT


def _seconds(request: Any, which: str) -> Optional[str]:
    """The ``which`` timeout (connect or read) ``request`` was sent with, as text ("10", "1.5")."""
    try:
        value = request.extensions["timeout"][which]
    except Exception:
        return None
    return None if value is None else f"{value:g}"


_bounded = False


def _bound_requests() -> None:
    """Give every request of huggingface_hub's shared client that carries no timeout of its own
    (``repo_info``, ``list_repo_tree``: they would wait forever) ``HF_HUB_ETAG_TIMEOUT`` to
    connect and for each read. Installed once per process through ``set_client_factory``, around
    the factory in place, so that a client rebuilt later (after a fork or a connection error) has
    it too. Versions without ``set_client_factory`` (before 1.0) keep their own behaviour."""
    global _bounded
    if _bounded:
        return
    _bounded = True
    try:
        from huggingface_hub import constants, set_client_factory
        from huggingface_hub.utils import _http
    except ImportError:
        return
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or getattr(_http, "default_client_factory", None)
    if previous is None:
        return

    def bound(request: Any) -> None:
        timeout = request.extensions.get("timeout") or {}
        if all(v is None for v in timeout.values()):
            s = float(constants.HF_HUB_ETAG_TIMEOUT)
            request.extensions["timeout"] = {"connect": s, "read": s, "write": s, "pool": s}

    def factory() -> Any:
        client = previous()
        hooks = client.event_hooks
        hooks["request"] = [*hooks.get("request", []), bound]
        client.event_hooks = hooks
        return client

    set_client_factory(factory)
