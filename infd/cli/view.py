"""`infd view`: look at latents at any resolution in a browser; every tile is rendered on request.

    infd view --ae AE --image photo.jpg                       # an encoded photograph
    infd view --unet UNET --prompt "a red barn" --seed 3      # a generated sample; the page can draw more
    infd view --ae AE --latents z.pt                          # saved latents: a tensor (N, C, h, w) or (C, h, w)

The server binds 127.0.0.1 (--host, --port to change) and prints the address; the page (infd/viewer/static)
pans and zooms from the whole canvas down to --canvas pixels (default 16384x16384).
"""
from __future__ import annotations

from argparse import Namespace

from infd.cli.common import add_render_flags, device, parse_size, read_image, render_options
from infd.config import ConfigError


def add_parser(sub, command, device_help: str) -> None:
    from infd.cli.sample import add_sampling_flags

    p = command(sub, "view", "look at latents at any resolution in a browser: a deep-zoom page, tiles rendered "
                "on request", cmd_view)
    p.add_argument("--ae", help="autoencoder export (default with --unet: the one the UNet export records)")
    p.add_argument("--image", nargs="+", default=[], help="photographs to encode and show")
    p.add_argument("--latents", nargs="+", default=[], help="saved latents (torch.save of (N, C, h, w) or (C, h, w))")
    p.add_argument("--unet", help="UNet export: show a generated sample (and draw more from the page)")
    p.add_argument("--prompt", default="", help="with --unet: the first sample's prompt (text-conditioned UNets)")
    p.add_argument("--seed", type=int, default=0, help="with --unet: the first sample's seed")
    p.add_argument("--latent-size", type=int, help="with --unet: side of the sampled latent (default: as infd sample)")
    add_sampling_flags(p)
    p.add_argument("--canvas", default="16384x16384", help="WIDTHxHEIGHT of the finest zoom level (a photograph's "
                   "canvas keeps its aspect, its long side this canvas's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on")
    p.add_argument("--cache-mb", type=int, default=256, help="memory for rendered tiles (LRU)")
    p.add_argument("--max-renders", type=int, default=2, help="tiles rendered at once (the rest wait)")
    add_render_flags(p)
    p.add_argument("--device", help=device_help)


def cmd_view(args) -> int:
    from infd.viewer.server import ViewerState, serve
    from infd.viewer.tiles import Pyramid, TileCache, TileRenderer

    try:
        canvas = parse_size(args.canvas)
    except ConfigError as err:
        raise ConfigError(str(err).replace("--size", "--canvas")) from None
    if not (args.image or args.latents or args.unet):
        raise ConfigError("nothing to show: give --image, --latents or --unet")
    if args.cache_mb < 1 or args.max_renders < 1 or not 0 < args.port < 65536:
        raise ConfigError(f"--cache-mb {args.cache_mb}, --max-renders {args.max_renders}, --port {args.port}: "
                          "expected positive sizes and a port in 1..65535")
    dev = device(args.device)
    ae, latents, generate, text = _sources(args, dev)
    if args.image and not (args.latents or args.unet):
        canvas = _aspect_canvas(canvas, read_image(args.image[0]))
    renderer = TileRenderer(ae, Pyramid(canvas), render_options(args), TileCache(args.cache_mb << 20),
                            args.max_renders)
    state = ViewerState(renderer, latents, generate, text)
    height, width = canvas
    print(f"{len(latents)} latent(s) on a {width}x{height} canvas, {renderer.pyramid.max_level + 1} zoom levels, "
          f"tiles of {renderer.pyramid.tile} px on {dev}", flush=True)
    serve(state, args.host, args.port, lambda url: print(f"infd view: open {url} (Ctrl-C stops)", flush=True))
    return 0


def _sources(args, dev):
    """(autoencoder, [Latent], generate(prompt, seed) -> z or None, whether generate takes the prompt)."""
    from infd.cli.common import open_export
    from infd.viewer.server import Latent

    latents, generate, ae, text = [], None, None, False
    if args.unet:
        ae, generate, text = _generator(args, dev)
        label = f"{args.prompt!r}, seed {args.seed}" if text else f"seed {args.seed}"
        latents.append(Latent(generate(args.prompt, args.seed), label))
    elif args.ae:
        ae, _ = open_export(args.ae, "autoencoder", "--ae", dev)
    else:
        raise ConfigError("--image and --latents need --ae (the autoencoder that decodes them)")
    for path in args.image:
        from infd.diffusion.superres import encode_images

        latents.append(Latent(encode_images(ae, [read_image(path)], dev).cpu(), path))
    for path in args.latents:
        latents += [Latent(z, f"{path} [{i}]") for i, z in enumerate(_load_latents(path, ae))]
    return ae, latents, generate, text


def _generator(args, dev):
    """(autoencoder, generate(prompt, seed) -> z (1, C, h, w), whether it takes the prompt) of --unet (and --ae)."""
    from infd.cli.sample import check_sampling, latent_diffusion, latent_size, load_unet, open_ae, resolve_sampling
    from infd.diffusion.generate import generate_latents
    from infd.diffusion.spec import Conditioning

    unet, record = load_unet(args.unet, dev)
    if unet.cfg.lowres_channels:
        raise ConfigError(f"--unet {args.unet} is a super-resolution UNet: upsample with infd upsample --unet, then "
                          "view the result with --image")
    spec, _ = resolve_sampling(args, record.sampling, record.schedule().objective == "rectified_flow")
    check_sampling(spec, record.schedule())
    ae, _, _ = open_ae(Namespace(ae=args.ae, unet=args.unet), record, dev)
    model = latent_diffusion(unet, record, dev)
    side = latent_size(args, unet, ae)
    if args.prompt and model.text is None:
        raise ConfigError(f"--prompt {args.prompt!r}: the UNet {args.unet} is not text-conditioned")

    def generate(prompt: str, seed: int):
        cond = Conditioning([prompt] if model.text is not None else None)
        return generate_latents(model, spec, cond, (1, unet.cfg.in_channels, side, side), [seed]).cpu()

    return ae, generate, model.text is not None


def _load_latents(path: str, ae) -> list:
    import torch

    from infd.cli.common import read_bytes

    read_bytes(path, "--latents")  # a missing file: a one-line error
    try:
        z = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"--latents {path}: not a saved tensor ({type(err).__name__}: {err})") from None
    if not isinstance(z, torch.Tensor) or z.dim() not in (3, 4):
        raise ConfigError(f"--latents {path}: expected a tensor (N, C, h, w) or (C, h, w)")
    z = z[None] if z.dim() == 3 else z
    if not len(z):
        raise ConfigError(f"--latents {path}: the tensor holds no latent (N = 0)")
    if z.shape[1] != ae.cfg.bottleneck.embed_dim:
        raise ConfigError(f"--latents {path}: {z.shape[1]} channels; the autoencoder's latents have "
                          f"{ae.cfg.bottleneck.embed_dim}")
    return [x[None].float() for x in z]


def _aspect_canvas(canvas: tuple[int, int], img) -> tuple[int, int]:
    """The canvas with the photograph's aspect, its long side the canvas's long side."""
    side = max(canvas)
    if img.width >= img.height:
        return max(1, round(side * img.height / img.width)), side
    return side, max(1, round(side * img.width / img.height))
