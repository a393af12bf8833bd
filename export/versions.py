"""Installed versions of the stack, without importing it."""
from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("probattn", "tensorflow", "tf-keras", "tf2onnx", "onnx", "onnxruntime",
            "ai-edge-litert", "tokenizers", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "machine": platform.machine()}
