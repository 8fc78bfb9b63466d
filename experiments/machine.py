"""Describe the machine a benchmark ran on, and name its result files."""

import os
import platform


def result_stem(benchmark: str, label: str | None, platform: str) -> str:
    """experiments/results/<benchmark>[_<label>]_<platform>, without an extension."""
    name = f"{benchmark}_{label}" if label else benchmark
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}_{platform}")


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import jax

        devices = [str(d) for d in jax.devices()]
    except Exception:  # the benchmark may not need jax at all
        devices = []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_devices": devices,
    }
