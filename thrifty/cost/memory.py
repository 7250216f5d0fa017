"""Memory probes: exact KV-cache bytes, and the measured resident-set peak of one call.

`PeakRSS` resets the kernel's high-water mark (`/proc/self/clear_refs`, value 5) before a call and reads
`VmHWM` after it, so `peak_bytes` is the process's real resident peak *during that call* (weights included)
and `delta_bytes` what the call added above the resident size it started from. Freed memory kept by the
allocator is still resident, so deltas are lower bounds on a warm process. Where /proc is not writable
(non-Linux), both read 0 and `available` is False.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def kv_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes held by a list of key/value tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _status_kb(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


class PeakRSS:
    """Context manager: `with PeakRSS() as p: ...; p.peak_bytes, p.delta_bytes`."""

    def __init__(self) -> None:
        self.available = _STATUS.exists()
        self.start_bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> "PeakRSS":
        if self.available:
            try:
                _CLEAR.write_text("5")
            except OSError:
                self.available = False
            self.start_bytes = _status_kb("VmRSS") if self.available else 0
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self.peak_bytes = _status_kb("VmHWM")

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)
