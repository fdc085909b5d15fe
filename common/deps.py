"""The PyTorch stack as installed: a torchvision built for another torch (a CPU torch beside a CUDA
torchvision, say) fails at import with a message that names neither the cause nor the fix. Here it
becomes one line with the install command that fixes it."""
from __future__ import annotations

from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def matching_install_command() -> str:
    """The pip line that installs the torchvision of the installed torch, from the index of its
    build."""
    torch_v = (_version("torch") or "?").split("+")
    local = torch_v[1] if len(torch_v) > 1 else ""
    parts = torch_v[0].split(".")
    vision = (f"0.{int(parts[1]) + 15}.*"
              if len(parts) > 1 and parts[0] == "2" and parts[1].isdigit() else None)
    index = (f" --index-url https://download.pytorch.org/whl/{local}"
             if local.startswith(("cpu", "cu", "rocm")) else "")
    pin = f'"torchvision=={vision}"' if vision else "torchvision"
    return f"pip install --force-reinstall --no-deps {pin}{index}"


def explain_import_error(e: BaseException) -> str | None:
    """A one-line explanation of a broken torch / torchvision / timm install, or None for other
    errors."""
    text = str(e)
    if "torchvision::" in text or ("torchvision" in text and "operator" in text):
        return (f"torchvision {_version('torchvision') or '?'} does not match torch "
                f"{_version('torch') or '?'} (built for another torch: "
                f"{text.splitlines()[0][:80]}); torchvision 0.N goes with torch 2.(N-15), from the "
                f"same index as torch (its +cpu / +cuNNN tag; no tag: PyPI): "
                f"{matching_install_command()} (env_setup.md: other CUDA versions, offline "
                "machines)")
    missing = getattr(e, "name", None)
    if isinstance(e, ImportError) and missing in ("torch", "torchvision", "timm", "pandas",
                                                  "matplotlib", "tensorboard", "tqdm", "filelock",
                                                  "submitit"):
        return (f"{missing} is not installed in this Python ({e}); run: pip install -r "
                "requirements.txt")
    return None
