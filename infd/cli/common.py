"""What the `infd` subcommands (and data_prep's scripts) share: the help formatter, option
parsing, and turning unreadable inputs (images, exports, text files) into one-line usage errors.

Every user mistake raises ConfigError; `infd.cli.main` prints it as `infd <cmd>: error: <message>`
and exits 2. Heavy imports (torch, PIL) stay inside the functions: `infd --help` is fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from infd.config import ConfigError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help
    already names it or there is none to show (None, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if not shown or "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def add_render_flags(p) -> None:
    """How images are rendered from phi (infd.render.RenderOptions); the same flags on every command."""
    p.add_argument("--tile", type=int, default=256, help="render tile side in pixels (bounds the memory used)")
    p.add_argument("--render-batch-pixels", type=int, default=1 << 19, help="query pixels per renderer call: "
                   "several tiles at once (memory: about 7 KB each for the paper's CLIF in fp32)")
    p.add_argument("--render-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 renders under a bf16 autocast (faster where bf16 is; see docs/benchmarks.md)")


def render_options(args):
    """The RenderOptions of add_render_flags' flags; a bad value names its flag."""
    from infd.render import RenderOptions

    for flag, value in (("--tile", args.tile), ("--render-batch-pixels", args.render_batch_pixels)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected at least 1")
    return RenderOptions(tile=args.tile, batch_pixels=args.render_batch_pixels, precision=args.render_precision)


def device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W), both positive."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 4096x4096") from None
    if w < 1 or h < 1:
        raise ConfigError(f"--size {text!r}: width and height must be at least 1")
    return h, w


def parse_region(text: str | None, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """'x0,y0,x1,y1' (pixels of the output of `size` (H, W)) -> (top, left, bottom, right); None
    stays None. The box must be non-empty and lie inside the output."""
    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--region {text!r}: expected x0,y0,x1,y1 in output pixels") from None
    h, w = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ConfigError(f"--region {text}: the box must be non-empty and lie inside the {w}x{h} output "
                          f"(0 <= x0 < x1 <= {w}, 0 <= y0 < y1 <= {h})")
    return y0, x0, y1, x1


def read_bytes(path: str, what: str) -> bytes:
    """A local file's bytes; a missing or unreadable file is a ConfigError naming `what`."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, expected a file") from None
    except OSError as err:
        raise ConfigError(f"{what} {path}: cannot read it ({err.strerror or err})") from None


_SKIP_REASONS = {"empty_file": "the file is empty", "not_an_image": "not an image format PIL can read",
                 "too_many_pixels": "too many pixels", "corrupt_image": "the image is corrupt"}


def read_image(path: str):
    """An upright RGB PIL image through the loader's decode path (EXIF orientation applied, the
    loader's pixel limit); an unreadable file is a ConfigError."""
    from infd.data.decode import SkipSample, decode_rgb, open_image

    data = read_bytes(path, "image")
    try:
        return decode_rgb(open_image(data))
    except SkipSample as err:
        detail = str(err)[len(err.reason) + 2:] if err.reason != "not_an_image" else ""  # PIL names a BytesIO
        reason = _SKIP_REASONS.get(err.reason, err.reason)
        raise ConfigError(f"image {path}: {reason}" + (f" ({detail})" if detail else "")) from None


def check_image_out(path: str, what: str = "--out") -> None:
    """An output path whose suffix names a format PIL writes."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if suffix not in {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}:
        raise ConfigError(f"{what} {path}: {'a suffix ' + repr(suffix) if suffix else 'no suffix'} names no image "
                          "format to write; use e.g. .png or .jpg")


def read_lines(path: str, what: str) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file (at least one)."""
    try:
        text = read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{what} {path}: the file has no non-empty line")
    return lines


def open_export(path: str, kind: str, what: str, dev=None):
    """(model, ExportRecord) of export directory `path`, checked to be of `kind` ("autoencoder" or
    "unet"); `what` names it in errors (e.g. "--ae")."""
    from infd.export import CONFIG, WEIGHTS, load_export, read_record

    expected = f"an export directory holding {WEIGHTS} and {CONFIG}"
    if not Path(path).is_dir():
        raise ConfigError(f"{what} {path}: {'not a directory' if Path(path).exists() else 'no such directory'}; "
                          f"expected {expected}")
    try:
        record = read_record(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no {CONFIG}; expected {expected}") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} {path}: {CONFIG} cannot be read ({err})") from None
    if record.kind != kind:
        raise ConfigError(f"{what} {path} holds a {record.kind!r} model; expected {kind!r}")
    try:
        return load_export(path, dev or "cpu")
    except Exception as err:  # a truncated or mismatched safetensors file: say which
        raise ConfigError(f"{what} {path}: cannot load the export ({type(err).__name__}: {err})") from None
