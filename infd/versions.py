"""Versions of the libraries whose internals or layouts we rely on, as tested here.

setup.py pins the installable range of the PINNED ones from this table; torch only gets a
warning (the Makefile's TORCH chooses the build). `untested_versions()` is checked at the start
of training, so an environment assembled another way says what it runs on.
"""
from __future__ import annotations

TESTED = {
    "deepspeed": ">=0.19,<0.20",  # the portable checkpoint reads its ZeRO partitions (train/checkpoint.py)
    "open_clip_torch": ">=3.0,<4",  # the text tower relies on its module layout (infd/text.py)
    "hydra-core": ">=1.3,<1.4",  # the config composition and the submitit launcher plugin
    "torch": ">=2.14,<2.15",
    # Stable Diffusion folders: UNet2DConditionModel and the VAE/scheduler config keys (infd/convert/).
    "diffusers": ">=0.42,<0.43",
    "transformers": ">=5.0,<6",  # the SD text encoder (CLIPTextModel) and its tokenizer
}
PINNED = ("deepspeed", "open_clip_torch", "hydra-core", "diffusers", "transformers")


def untested_versions() -> list[str]:
    """One message per installed library outside its tested range."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    out = []
    for name, spec in TESTED.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if Version(Version(installed).base_version) not in SpecifierSet(spec):
            out.append(f"{name} {installed} is outside the tested range {spec}: it may work, but nothing here "
                       f"was tested with it (pip install '{name}{spec}' gives a tested one)")
    return out
