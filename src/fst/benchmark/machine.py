"""What the benchmark ran on: CPU, memory, kernel, versions, file system."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from typing import Any, Optional, Union

from .units import format_size


def machine_info(path: Optional[Union[str, os.PathLike]] = None) -> dict[str, Any]:
    """CPU, cores, memory, kernel, library versions and the filesystem holding `path`."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_bytes"] = int(line.split()[1]) * 1024
                    info["ram"] = format_size(info["ram_bytes"])
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("fst", "numpy", "torch", "jax", "safetensors", "fastsafetensors", "instanttensor",
                 "runai-model-streamer"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    if path is not None:
        info["filesystem"] = filesystem_of(path)
    return info


def filesystem_of(path: Union[str, os.PathLike]) -> dict[str, str]:
    """Mount point, type and device of the filesystem holding `path` (from /proc/mounts)."""
    target = os.path.realpath(path)
    best = {"mount": "?", "type": "?", "device": "?"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                device, mount, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best["mount"] if best["mount"] != "?" else ""):
                    best = {"mount": mount, "type": fstype, "device": device}
    except OSError:
        pass
    return best



def describe_machine(info: dict[str, Any]) -> str:
    fs = info.get("filesystem") or {}
    lines = [
        f"cpu: {info.get('cpu')} ({info.get('usable_cores')} usable of {info.get('cores')} cores)",
        f"ram: {info.get('ram', '?')}   kernel: {info.get('kernel')}   python: {info.get('python')}",
    ]
    if info.get("loadavg"):
        lines.append("load average at start: " + " ".join(f"{x:.2f}" for x in info["loadavg"])
                     + " (1, 5, 15 min; other work on the machine skews timings)")
    if fs:
        lines.append(f"filesystem: {fs.get('type')} on {fs.get('device')} (mounted at {fs.get('mount')})")
    if info.get("versions"):
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    return "\n".join(lines)
