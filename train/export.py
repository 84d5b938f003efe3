"""Export a checkpoint of a run: the trained model (or its EMA) as safetensors + its record.

    python -m train.export RUN_DIR [--step N] [--no-ema] [--out DIR]

The model is rebuilt from the run's config.yaml, read into the config of the stage whose engines
the checkpoint holds; train.run_exports writes the export, as the run itself does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from infd.config import ConfigError, from_mapping
from infd.utils.process_main import run_as_process
from train.autoencoder import AutoencoderTrainConfig
from train.diffusion import DiffusionTrainConfig
from train.run_exports import RUN_CONFIG, ExportError, checkpoint_stage, export_checkpoint, find_checkpoint

STAGE_CONFIGS = {"autoencoder": AutoencoderTrainConfig, "unet": DiffusionTrainConfig}  # by export kind


def run_config(run_dir: Path, kind: str):
    """The run's config.yaml as the config of the stage that exports `kind`."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        raise ExportError(f"{path} not found: the run's resolved config rebuilds the model")
    try:
        return from_mapping(STAGE_CONFIGS[kind], yaml.safe_load(path.read_text()))
    except ConfigError as err:
        raise ExportError(f"{path}: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (runs/<run.name>)")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--no-ema", action="store_true", help="the trained weights, not their EMA")
    parser.add_argument("--out", type=Path, help="export directory (default: RUN_DIR/export/step_XXXXXXX/<kind>)")
    args = parser.parse_args(argv)
    try:
        ckpt = find_checkpoint(args.run_dir, args.step)
        cfg = run_config(args.run_dir, checkpoint_stage(ckpt).kind)
        export_checkpoint(args.run_dir, ckpt, cfg, args.out, use_ema=not args.no_ema)
    except ExportError as err:
        parser.error(str(err))  # "train.export: error: ...", exit status 2
    return 0


if __name__ == "__main__":
    sys.exit(run_as_process(main))
