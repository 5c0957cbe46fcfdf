"""The device's state as a routing policy sees it: battery, charging, temperature, free memory.

Each reading is ``None`` when this machine cannot tell (no battery, no thermal zones, no psutil), and
a policy rule on an unknown reading does not fire. Readings come from psutil where it is installed,
else from Linux's /sys and /proc. Reading them costs a few file reads, so ``DeviceMonitor`` keeps a
reading for ``max_age`` seconds: routing a request must stay in microseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class DeviceState:
    battery_percent: float | None = None
    charging: bool | None = None
    temperature_c: float | None = None  #: the hottest thermal zone
    memory_available_mb: float | None = None


def read_device_state(sys_root: Path = Path("/sys"), proc_root: Path = Path("/proc")) -> DeviceState:
    """One reading now (``sys_root``/``proc_root`` are for tests)."""
    battery, charging = _battery(sys_root)
    return DeviceState(battery, charging, _temperature(sys_root), _memory_mb(proc_root))


def _battery(sys_root: Path) -> tuple[float | None, bool | None]:
    try:
        import psutil

        b = psutil.sensors_battery()
        if b is not None:
            return float(b.percent), bool(b.power_plugged)
    except (ImportError, AttributeError, OSError):
        pass
    for supply in sorted((sys_root / "class/power_supply").glob("*")):
        if _read(supply / "type") == "Battery" and (capacity := _read(supply / "capacity")) is not None:
            status = _read(supply / "status")
            return float(capacity), None if status is None else status in ("Charging", "Full")
    return None, None


def _temperature(sys_root: Path) -> float | None:
    readings = []
    for zone in (sys_root / "class/thermal").glob("thermal_zone*"):
        value = _read(zone / "temp")
        if value is not None and value.lstrip("-").isdigit():
            readings.append(int(value) / 1000)  # millidegrees
    return max(readings) if readings else None


def _memory_mb(proc_root: Path) -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        pass
    text = _read(proc_root / "meminfo")
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class DeviceMonitor:
    """``state()``: the last reading from ``read``, refreshed when older than ``max_age`` seconds."""

    def __init__(self, read: Callable[[], DeviceState] = read_device_state, max_age: float = 5.0) -> None:
        self.read, self.max_age = read, max_age
        self._state: DeviceState | None = None
        self._when = 0.0

    def state(self) -> DeviceState:
        now = time.monotonic()
        if self._state is None or now - self._when > self.max_age:
            self._state, self._when = self.read(), now
        return self._state
