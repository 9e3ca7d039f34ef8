"""``python -m msclip_fast.info``: what this installation can run, and why (xformers-style).

Reports package versions, CUDA/GPU availability, whether the compiled extension
``msclip_fast._C`` imports, and for each op every backend with the reasons it is off.
``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import sys

PACKAGES = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("triton", "triton"),
    ("deepspeed", "deepspeed"),
    ("open_clip", "open_clip"),
    ("DALI", "nvidia.dali"),
    ("webdataset", "webdataset"),
    ("xformers", "xformers"),
    ("numpy", "numpy"),
)


def _version(module: str) -> str:
    """Version string, or ``"not installed"`` / ``"import failed: ..."``."""
    try:
        # some packages (deepspeed) print on import: keep stdout clean for --json
        with contextlib.redirect_stdout(sys.stderr):
            mod = importlib.import_module(module)
    except ModuleNotFoundError:
        return "not installed"
    except Exception as e:  # a broken install should be reported, not crash the report
        return f"import failed: {type(e).__name__}: {e}"
    return str(getattr(mod, "__version__", "unknown version"))


def _cuda() -> dict:
    import torch

    info = {
        "torch_cuda_build": torch.version.cuda,
        "available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "devices": [],
    }
    for i in range(info["device_count"]):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append(
            {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        )
    if not info["available"]:
        info["reason"] = (
            "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device/driver found"
        )
    return info


def _extension() -> dict:
    try:
        mod = importlib.import_module("msclip_fast._C")
    except ImportError as e:
        return {"importable": False, "reason": f"{type(e).__name__}: {e}"}
    return {"importable": True, "file": getattr(mod, "__file__", None)}


def collect() -> dict:
    """Everything the report shows, as a JSON-able dict."""
    import torch

    from . import __version__, ops

    return {
        "msclip_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(mod) for name, mod in PACKAGES},
        "torch_threads": torch.get_num_threads(),
        "cuda": _cuda(),
        "extension": _extension(),
        "backends": ops.backend_status(),
    }


def format_report(info: dict) -> str:
    """Human-readable text of :func:`collect`'s dict."""
    lines = [f"msclip_fast {info['msclip_fast']}  python {info['python']}  ({info['platform']})", "", "versions:"]
    lines += [f"  {k:<12} {v}" for k, v in info["versions"].items()]
    c = info["cuda"]
    lines += ["", f"CUDA: torch built for {c['torch_cuda_build'] or 'CPU only'}; available: {c['available']}"]
    if not c["available"]:
        lines.append(f"  reason: {c['reason']}")
    for i, d in enumerate(c["devices"]):
        lines.append(f"  cuda:{i} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)")
    lines.append(f"torch CPU threads: {info['torch_threads']}")
    e = info["extension"]
    lines += ["", "extension msclip_fast._C: " + ("imports" if e["importable"] else f"unavailable ({e['reason']})")]
    lines += ["", "ops (backend: on, or off with reasons):"]
    for op, backends in info["backends"].items():
        lines.append(f"  {op}")
        for name, reasons in backends.items():
            lines.append(f"    {name:<10} " + ("on" if not reasons else "off: " + "; ".join(reasons)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msclip_fast.info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
