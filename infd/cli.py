"""The `infd` command: inspect models and render with them.

    infd describe MODEL_CONFIG [--json] [--input-size 256]
"""
from __future__ import annotations

import argparse
import json
import sys

from infd.config import ConfigError, from_mapping, load_mapping


def cmd_describe(args) -> int:
    from infd.describe import describe_autoencoder
    from infd.models import AutoencoderConfig

    info = describe_autoencoder(from_mapping(AutoencoderConfig, load_mapping(args.config)), args.input_size)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.config}: {info['bottleneck']} bottleneck, {info['renderer']} renderer")
    for name, count in info["params"].items():
        print(f"  {name:<11s}{count / 1e6:10.3f} M")
    size = args.input_size
    print(f"  input {size}x{size} -> latent {'x'.join(map(str, info['latent_shape']))}"
          f" -> phi {'x'.join(map(str, info['phi_shape']))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infd", description="Image neural field diffusion tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("describe", help="parameter counts and latent/feature shapes of a model config")
    p.add_argument("config", help="model config (YAML or JSON), e.g. conf/model/infd_paper.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--input-size", type=int, default=256)
    p.set_defaults(func=cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"infd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
