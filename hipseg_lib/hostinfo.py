"""Facts about the host that need no PyTorch: how much memory is free. One probe, used by training
(where the volumes live), prediction (whether a scan fits whole) and the ONNX path alike."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory"]


def available_memory() -> int:
    """Free host memory in bytes (Linux's MemAvailable; else free pages; else 4 GiB)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30
