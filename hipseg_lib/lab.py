"""Stepping through the book interactively: JupyterLab on ``book/`` from one command.

``make lab`` (``hipseg lab``) makes the default data if needed, picks a free loopback port,
and starts JupyterLab bound to 127.0.0.1 with a token (Jupyter's authentication is never
turned off), the project's ``hipseg`` kernel as the default, and prints the URL to open.
"""
from __future__ import annotations

import errno
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from . import HipsegError

__all__ = ["free_port", "lab_command", "lab_url", "run_lab"]

HOST = "127.0.0.1"


def free_port(start: int = 8888, host: str = HOST, tries: int = 100) -> int:
    """The first port from ``start`` on that nothing listens on (``start`` itself when free)."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return port
    raise HipsegError(f"no free port on {host} between {start} and {start + tries - 1}")


def lab_command(notebook_dir: Path, port: int, token: str) -> list[str]:
    """The ``jupyter lab`` command line: loopback only, token authentication, hipseg kernel."""
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
            f"--ServerApp.ip={HOST}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebook_dir}",
            "--MultiKernelManager.default_kernel_name=hipseg", "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly"]  # nothing is looked up on the network
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; Jupyter refuses it otherwise
    return cmd


def lab_url(port: int, token: str, notebook: str = "01_data_exploration.ipynb") -> str:
    return f"http://{HOST}:{port}/lab/tree/{notebook}?token={token}"


def run_lab(port: int = 8888, data_dir: str | None = None, notebook_dir: str | None = None) -> int:
    """Start JupyterLab on the book (blocks until it stops); returns its exit status."""
    from .locations import ensure_default_dataset, project_root

    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        raise HipsegError("JupyterLab is not installed in this environment; run `make setup` "
                          "(requirements.txt pins it)") from None
    folder = Path(notebook_dir).resolve() if notebook_dir else project_root() / "book"
    if not folder.is_dir():
        raise HipsegError(f"{folder}: no such notebook folder")
    data = ensure_default_dataset(data_dir)  # made on first use, with a message
    chosen = free_port(port)
    if chosen != port:
        print(f"port {port} is in use: using {chosen}")
    token = secrets.token_hex(24)
    env = {**os.environ, "HIPSEG_DATA": str(data)}
    print(f"data: {data}")
    print(f"JupyterLab on {folder}: open {lab_url(chosen, token)}", flush=True)
    print("(Ctrl-C stops it.)", flush=True)
    try:
        return subprocess.call(lab_command(folder, chosen, token), env=env)
    except KeyboardInterrupt:
        return 0
