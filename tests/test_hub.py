"""A Hub that never answers: the CLI says what it contacts, waits the stated timeout, and ends in
one line naming the model, dataset or file, the timeout and how to raise it, exit code 2.

The Hub here is a real TCP server on localhost that accepts every connection and never sends a
byte (what a proxy that swallows traffic looks like), reached through HF_ENDPOINT, with an empty
Hugging Face cache and 1 s timeouts set as a user would, through the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from conftest import EMBEDDED, ROOT

from mlx_grpo import hub

LIMIT_S = 60  # what "well within" means: the hang this guards against lasted over 300 s


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers; closed afterwards."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: List[socket.socket] = []  # kept open: a closed connection would be an answer

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for c in held:
            c.close()


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> Dict[str, str]:
    """The environment of a user with an empty cache, online, and 1 s timeouts of their own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                        "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, HF_HUB_ETAG_TIMEOUT="1",
               HF_HUB_DOWNLOAD_TIMEOUT="1", XDG_CACHE_HOME=str(tmp_path / "xdg"), **extra)
    return env


def train(tmp_path: Path, env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "train", *args, "--steps", "1", "--no-progress",
         "--output", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3 * LIMIT_S,
    )


CASES = {
    "model": (["--model", "someorg/somemodel"], "someorg/somemodel",
              "model.path: cannot load someorg/somemodel: "),
    "dataset": (["--data", "someorg/somedata"], "dataset someorg/somedata",
                "data.path: cannot load Hub dataset someorg/somedata: "),
    "gguf": (["--model", "someorg/somerepo", "--gguf-file", "some-Q8_0.gguf"], "some-Q8_0.gguf in someorg/somerepo",
             "model.gguf_file: cannot get some-Q8_0.gguf from someorg/somerepo: "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hub_that_never_answers_ends_in_one_line(tmp_path, silent_hub, case):
    args, name, prefix = CASES[case]
    start = time.monotonic()
    r = train(tmp_path, hub_env(tmp_path, silent_hub), *args)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    assert took < LIMIT_S, (took, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert f"contacting the Hub for {name}" in lines, r.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert errors[0] == (f"error: {prefix}no answer from the Hub ({silent_hub}) within 1 s (HF_HUB_ETAG_TIMEOUT); "
                         "raise HF_HUB_ETAG_TIMEOUT to wait longer, or set HF_HUB_OFFLINE=1 to use the local cache")
    assert "Traceback" not in r.stderr
    assert len(lines) == 2, r.stderr  # nothing else: no library warnings or retries


def test_a_refused_connection_names_the_endpoint(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = train(tmp_path, hub_env(tmp_path, endpoint), "--model", "someorg/somemodel")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: model.path: cannot load someorg/somemodel: cannot reach the Hub ({endpoint}): ")
    assert "HF_HUB_OFFLINE=1" in error


def test_offline_says_nothing_about_the_hub(tmp_path, silent_hub):
    start = time.monotonic()
    r = train(tmp_path, hub_env(tmp_path, silent_hub, HF_HUB_OFFLINE="1"), "--model", "someorg/somemodel")
    assert r.returncode == 2 and time.monotonic() - start < LIMIT_S, r.stderr
    assert "contacting" not in r.stderr and "model.path: cannot load someorg/somemodel" in r.stderr


def test_timeouts_the_user_set_are_kept():
    env = {"HF_HUB_ETAG_TIMEOUT": "3", "HF_HUB_DOWNLOAD_TIMEOUT": " 300 "}
    hub.set_timeout_defaults(env)
    assert env == {"HF_HUB_ETAG_TIMEOUT": "3", "HF_HUB_DOWNLOAD_TIMEOUT": " 300 "}
    env = {"HF_HUB_ETAG_TIMEOUT": ""}  # empty: an unset shell variable, as unset
    hub.set_timeout_defaults(env)
    assert env == {"HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}


@pytest.mark.parametrize("value", ["ten", "0", "-5", "1.5"])
def test_a_timeout_that_is_not_whole_seconds_is_refused(value):
    with pytest.raises(hub.HubSettingError, match=f"HF_HUB_DOWNLOAD_TIMEOUT: expected a whole number of seconds "
                                                  rf"\(at least 1\), got '{value}'"):
        hub.set_timeout_defaults({"HF_HUB_DOWNLOAD_TIMEOUT": value})


def test_a_bad_timeout_is_one_line_from_the_cli(tmp_path):
    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": "ten"}
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "train", "--steps", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=LIMIT_S)
    assert r.returncode == 2 and r.stderr == "error: HF_HUB_ETAG_TIMEOUT: expected a whole number of seconds " \
                                             "(at least 1), got 'ten'\n", r.stderr


def test_only_network_errors_are_explained():
    class Timeout(TimeoutError):  # filelock's Timeout (a cache lock) is no network error
        __module__ = "filelock._error"

    assert hub.unreachable(ValueError("bad config")) is None
    assert hub.unreachable(Timeout("lock")) is None
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        reason = hub.unreachable(wrapped)
    assert reason is not None and reason.startswith("cannot reach the Hub: ") and "HF_HUB_OFFLINE=1" in reason


def test_the_line_shows_only_when_the_hub_is_contacted(monkeypatch, capsys):
    from mlx_grpo.config import ModelConfig
    from mlx_grpo.models import load_model

    monkeypatch.setattr(hub, "_bound_requests", lambda: None)  # keeps this process's client as it is
    monkeypatch.setattr(hub, "offline", lambda: False)
    with hub.contacting("someorg/somemodel"):
        pass
    assert capsys.readouterr().err == "contacting the Hub for someorg/somemodel\n"
    load_model(ModelConfig(path=str(EMBEDDED)))  # a local directory: no Hub
    monkeypatch.setattr(hub, "offline", lambda: True)
    with hub.contacting("someorg/somemodel"):
        pass
    assert "contacting" not in capsys.readouterr().err
