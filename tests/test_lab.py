"""``hipseg lab``: JupyterLab on loopback only, behind a token, on the next free port, no browser.

The server is started for real (as ``make lab`` does) and asked over HTTP; nothing is mocked.
"""
from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import start_lab, stop_lab

from hipseg_lib.lab import HOST, free_port


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel writes them) of sockets in LISTEN state on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: TCP_LISTEN
                found.add(address)
    return found


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_free_port_skips_a_taken_one():
    with socket.socket() as held:
        held.bind((HOST, 0))
        held.listen()
        taken = held.getsockname()[1]
        assert free_port(taken) != taken
        assert free_port(taken) > taken
    assert free_port(taken) == taken, "the port is used again once it is free"


@pytest.mark.slow
def test_lab_binds_loopback_with_a_token_on_the_next_free_port(tiny_synth, tmp_path):
    assert Path("/proc/net/tcp").exists(), "this test reads the kernel's socket table (Linux)"
    opened = tmp_path / "browser-was-opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\ntouch {opened}\n")
    browser.chmod(0o755)
    book = tmp_path / "book"
    book.mkdir()
    with socket.socket() as held:  # someone already listens on the port asked for
        held.bind((HOST, 0))
        held.listen()
        taken = held.getsockname()[1]
        proc, url, printed = start_lab(book, tiny_synth, taken, env={"BROWSER": str(browser)})
        try:
            assert f"port {taken} is in use" in "".join(printed)
            m = re.match(r"http://127\.0\.0\.1:(\d+)/lab/tree/\S+\?token=([0-9a-f]{48})$", url)
            assert m, url
            port, token = int(m.group(1)), m.group(2)
            assert port > taken
            assert _get(f"http://{HOST}:{port}/api/status?token={token}") == 200, "it answers the token"
            assert _get(f"http://{HOST}:{port}/api/status") == 403, "and refuses without it"
            assert _get(f"http://{HOST}:{port}/api/status?token={'0' * 48}") == 403
            assert _listening_addresses(port) == {"0100007F"}, "bound to 127.0.0.1 only"
            time.sleep(3)  # Jupyter would open the browser right after starting
            assert not opened.exists(), "no browser is opened (--no-browser)"
        finally:
            stop_lab(proc)
