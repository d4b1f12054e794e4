"""``gkd env``: versions and devices, for bug reports."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform

import click


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gkd-core": _version("gkd-core"),
        "gkd-methods-builtin": _version("gkd-methods-builtin"),
        "gkd-methods-multiteacher": _version("gkd-methods-multiteacher"),
        "torch": torch.__version__,
        "megatron-core": _version("megatron-core"),
        "deepspeed": _version("deepspeed"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


@click.command()
@click.option("--json", "as_json", is_flag=True)
def env(as_json: bool) -> None:
    """Print versions of gkd, torch, megatron-core, DeepSpeed and whether CUDA is available."""
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            click.echo(f"{key:26} {value}")
