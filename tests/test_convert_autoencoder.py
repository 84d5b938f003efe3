"""Converting Stable Diffusion / LDM first-stage autoencoders (random-init, tiny) into ours.

References are the sources' own code, never our key map: diffusers' AutoencoderKL (and its
single-file converter), and the CompVis modules of taming-transformers (the code LDM's first
stage was copied from; `pip install --no-deps taming-transformers==0.0.1`). Every parameter,
GroupNorm affine included, is re-randomised so an identity init cannot hide a mapping mistake.
Comparisons run in float64: in float32 the deeper decoders amplify the sources' different
rounding (taming's x * sigmoid(x) against F.silu, bmm against SDPA attention) through their
GroupNorms to about 1e-5, so only float64 leaves a 1e-5 tolerance testing the mapping alone.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from infd.cli import main as infd_main
from infd.config import from_mapping
from infd.convert.autoencoder import ConversionError, build_autoencoder, converted_config
from infd.export import load_export
from tests.exports import save_ae
from infd.geometry import crop_queries
from infd.models import AutoencoderConfig

TOL = 1e-5
RENDERER = {"kind": "clif", "hidden": 16, "n_blocks": 1, "norm": "pixel"}


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random: weights N(0, 1/fan_in), biases and norm shifts N(0, 0.1^2),
    norm scales 1 + N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if isinstance(sub, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1 + 0.2 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / p[0].numel() ** 0.5)


def config(path, resolution: int, fmt: str = "auto", **extra) -> AutoencoderConfig:
    raw = {"net": {"resolution": resolution}, "renderer": RENDERER, "init": {"autoencoder": str(path), "format": fmt}}
    return from_mapping(AutoencoderConfig, {**raw, **extra})


def images(size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def converted(cfg: AutoencoderConfig):
    """build_autoencoder, in float64 for the comparisons."""
    model, report = build_autoencoder(cfg)
    return model.double(), report


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- diffusers folders

@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """A tiny SD root (vae/ only) of a random AutoencoderKL with attention at level 1 as well."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")).eval()
    randomise(vae, 0)
    root = tmp_path_factory.mktemp("sd")
    vae.save_pretrained(root / "vae")
    return root, vae.double()


def diffusers_phi(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' decoder activations just before conv_norm_out: what our decoder must output."""
    seen = []
    hook = vae.decoder.conv_norm_out.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
    try:
        vae.decoder(vae.post_quant_conv(z))
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["sd_root", "vae_folder"])
def test_diffusers_autoencoderkl_random_init_encodes_and_decodes_like_diffusers(diffusers_vae, where):
    root, vae = diffusers_vae
    model, report = converted(config(root if where == "sd_root" else root / "vae", 32))
    net = model.cfg.net
    assert (net.ch, net.ch_mult, net.num_res_blocks, net.norm_groups, net.attn_resolutions) == (8, (1, 2), 2, 4, (16,))
    assert model.cfg.bottleneck.kind == "kl" and model.cfg.bottleneck.embed_dim == 4
    assert report["format"] == "diffusers" and report["renderer"] == "new (random init)"
    assert report["dropped_tail"] == ["decoder.conv_norm_out.bias", "decoder.conv_norm_out.weight",
                                      "decoder.conv_out.bias", "decoder.conv_out.weight"]
    x = images(32)
    with torch.no_grad():
        z_ref = vae.encode(x).latent_dist.mean
        assert max_err(model.encode(x), z_ref) < TOL
        assert max_err(model.decode(z_ref), diffusers_phi(vae, z_ref)) < TOL


def test_diffusers_deprecated_attention_names_load_the_same(diffusers_vae, tmp_path):
    root, vae = diffusers_vae
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    for new, name in old.items():  # pre-0.14 diffusers names of the mid attention
        state = {k.replace(f"attentions.0.{new}.", f"attentions.0.{name}."): v for k, v in state.items()}
    (tmp_path / "vae").mkdir()
    shutil.copy(root / "vae" / "config.json", tmp_path / "vae" / "config.json")
    save_file(state, tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    model, _ = build_autoencoder(config(tmp_path, 32))
    reference, _ = build_autoencoder(config(root, 32))
    for key, value in reference.state_dict().items():
        if not key.startswith("renderer."):
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("field,value", [("mid_block_add_attention", False), ("use_quant_conv", False),
                                         ("act_fn", "gelu"), ("_class_name", "AutoencoderTiny")])
def test_diffusers_config_fields_we_cannot_represent_are_named(diffusers_vae, tmp_path, field, value):
    root, _ = diffusers_vae
    shutil.copytree(root / "vae", tmp_path / "vae")
    raw = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(ConversionError, match=field):
        converted_config(config(tmp_path, 32))


def test_a_config_json_that_does_not_fit_its_weights_is_named(diffusers_vae, tmp_path):
    root, _ = diffusers_vae
    shutil.copytree(root / "vae", tmp_path / "vae")
    raw = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**raw, "latent_channels": 3}))
    with pytest.raises(ConversionError, match=r"(?s)shape mismatches.*quant_conv.weight.*latent_channels"):
        build_autoencoder(config(tmp_path, 32))


def test_converted_export_rebuilds_without_the_source(diffusers_vae, tmp_path):
    _, vae = diffusers_vae
    vae.save_pretrained(tmp_path / "src" / "vae")
    model, _ = converted(config(tmp_path / "src", 32, freeze_encoder=True))
    save_ae(model, tmp_path / "export")
    shutil.rmtree(tmp_path / "src")  # load_export rebuilds from the recorded (converted) config alone
    loaded = load_export(tmp_path / "export")[0].double()
    assert loaded.cfg == model.cfg and loaded.cfg.freeze_encoder
    x = images(32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))


# ---------------------------------------------------------------- LDM / CompVis checkpoints

def taming(**net):
    """The CompVis encoder and the decoder without its tail (give_pre_end) for `net` (taming's kwargs)."""
    model = pytest.importorskip("taming.modules.diffusionmodules.model",
                                reason="pip install --no-deps taming-transformers==0.0.1")
    kwargs = {"out_ch": 3, "in_channels": 3, "dropout": 0.0, **net}
    return model.Encoder(**kwargs).eval(), model.Decoder(give_pre_end=True, **kwargs).eval()


@pytest.fixture(scope="module")
def sd_single_file(tmp_path_factory):
    """A whole-SD-checkpoint layout: first_stage_model.* (KL, z 4) beside UNet and text-encoder keys."""
    # No attention in the levels, as in SD, so diffusers' own single-file converter applies too.
    encoder, decoder = taming(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                              z_channels=4, double_z=True)
    quant_conv, post_quant_conv = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(4, 4, 1)
    parts = {"encoder": encoder, "decoder": decoder, "quant_conv": quant_conv, "post_quant_conv": post_quant_conv}
    for seed, module in enumerate(parts.values()):
        randomise(module, 10 + seed)
    state = {f"first_stage_model.{name}.{k}": v.contiguous()
             for name, m in parts.items() for k, v in m.state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    path = tmp_path_factory.mktemp("sd1") / "v1-tiny.safetensors"
    save_file(state, path)
    return path, {name: m.double() for name, m in parts.items()}, state


def test_sd_single_file_matches_the_compvis_modules(sd_single_file):
    path, parts, _ = sd_single_file
    model, report = converted(config(path, 32))
    assert model.cfg.bottleneck.kind == "kl" and model.cfg.net.z_channels == 4 and model.cfg.net.ch_mult == (1, 2)
    assert report["format"] == "ldm" and report["ignored"] == {"model": 1, "cond_stage_model": 1}
    assert report["dropped_tail"] == ["decoder.conv_out.bias", "decoder.conv_out.weight",
                                      "decoder.norm_out.bias", "decoder.norm_out.weight"]
    x = images(32)
    with torch.no_grad():
        z_ref = parts["quant_conv"](parts["encoder"](x)).chunk(2, dim=1)[0]
        assert max_err(model.encode(x), z_ref) < TOL
        assert max_err(model.decode(z_ref), parts["decoder"](parts["post_quant_conv"](z_ref))) < TOL


def test_sd_single_file_agrees_with_diffusers_single_file_converter(sd_single_file):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path, _, state = sd_single_file
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state), vae.config), strict=True)
    vae.double()
    model, _ = converted(config(path, 32))
    x = images(32, seed=2)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert max_err(model.encode(x), z) < TOL
        assert max_err(model.decode(z), diffusers_phi(vae, z)) < TOL


def test_ckpt_with_a_state_dict_loads_through_weights_only(sd_single_file, tmp_path):
    path, _, state = sd_single_file
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "v1-tiny.ckpt")
    from_ckpt, report = build_autoencoder(config(tmp_path / "v1-tiny.ckpt", 32))
    from_safetensors, _ = build_autoencoder(config(path, 32))
    assert report["loaded"] == sum(1 for k in from_ckpt.state_dict() if not k.startswith("renderer."))
    for key, value in from_safetensors.state_dict().items():
        if not key.startswith("renderer."):
            assert torch.equal(from_ckpt.state_dict()[key], value), key


@pytest.fixture(scope="module")
def vq_f4(tmp_path_factory):
    """An LDM VQ-f4 first stage (bare keys, codebook, the training loss's discriminator), scaled down."""
    quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    encoder, decoder = taming(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                              z_channels=3, double_z=False)
    quant_conv, post_quant_conv = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
    vq = quantize.VectorQuantizer(64, 3, beta=0.25)
    parts = {"encoder": encoder, "decoder": decoder, "quant_conv": quant_conv, "post_quant_conv": post_quant_conv,
             "quantize": vq}
    for seed, module in enumerate(parts.values()):
        randomise(module, 20 + seed)
    state = {f"{name}.{k}": v for name, m in parts.items() for k, v in m.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 8, 1, 1)
    path = tmp_path_factory.mktemp("vq") / "model.ckpt"
    torch.save({"state_dict": state}, path)
    return path, {name: m.double() for name, m in parts.items()}, state


def test_ldm_vq_f4_matches_the_compvis_modules(vq_f4):
    path, parts, _ = vq_f4
    model, report = converted(config(path, 32))
    bott = model.cfg.bottleneck
    assert (bott.kind, bott.n_codes, bott.embed_dim) == ("vq", 64, 3)
    assert model.cfg.net.ch_mult == (1, 2, 4) and model.cfg.net.attn_resolutions == (16,)
    assert report["ignored"] == {"loss": 2}
    x = images(32, seed=3)
    with torch.no_grad():
        z_ref = parts["quant_conv"](parts["encoder"](x))
        assert max_err(model.encode(x), z_ref) < TOL
        idx = parts["quantize"](z_ref)[2][2].view(-1)  # taming's nearest codes
        zq = parts["quantize"].embedding(idx).view(2, 8, 8, 3).permute(0, 3, 1, 2)
        assert torch.equal(model.bottleneck.quantizer.codes(z_ref).view(-1), idx)
        assert max_err(model.decode(z_ref), parts["decoder"](parts["post_quant_conv"](zq))) < TOL


def test_unexpected_and_missing_keys_are_listed(vq_f4, tmp_path):
    path, _, state = vq_f4
    extra = {**state, "encoder.extra_block.weight": torch.zeros(1)}
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(ConversionError, match=r"unexpected source keys \(1\): encoder\.extra_block\.weight"):
        build_autoencoder(config(tmp_path / "extra.ckpt", 32))
    short = {k: v for k, v in state.items() if k != "decoder.mid.block_1.conv1.bias"}
    torch.save(short, tmp_path / "short.ckpt")  # a bare state dict works too
    with pytest.raises(ConversionError, match=r"missing source keys \(1\): decoder\.mid\.block_1\.conv1\.bias"):
        build_autoencoder(config(tmp_path / "short.ckpt", 32))


def test_a_missing_source_names_the_config_key(tmp_path):
    with pytest.raises(ConversionError, match="model.init.autoencoder"):
        build_autoencoder(config(tmp_path / "nowhere", 32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="model.init.autoencoder.*config.json"):
        build_autoencoder(config(tmp_path / "empty", 32))


# ---------------------------------------------------------------- freeze_encoder, describe

@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_freeze_encoder_fixes_the_encoder_side_and_trains_the_rest(kind):
    from tests.test_models import tiny_cfg

    cfg = tiny_cfg(bottleneck={"kind": kind})
    cfg.freeze_encoder = True
    from infd.models import NeuralFieldAutoencoder

    model = NeuralFieldAutoencoder(cfg).train()
    assert not model.encoder.training  # a frozen encoder stays in eval mode
    frozen = [*model.encoder.parameters(), *model.bottleneck.quant_conv.parameters()]
    frozen += list(model.bottleneck.quantizer.parameters()) if kind == "vq" else []
    assert frozen and not any(p.requires_grad for p in frozen)
    coords, cells = crop_queries((64, 64), (0, 0, 32, 32), batch=2)
    out = model(images(64).float(), coords, cells)
    (out.rgb.mean() + out.bottleneck.loss).backward()
    assert all(p.grad is None for p in frozen)
    for part in (model.bottleneck.post_quant_conv, model.decoder, model.renderer):
        assert all(p.grad is not None for p in part.parameters())


@pytest.fixture(scope="module")
def sd_f8(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                  latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)
    root = tmp_path_factory.mktemp("sd_f8")
    vae.save_pretrained(root / "vae")
    return root


def test_describe_a_converted_autoencoder(sd_f8, tmp_path, capsys):
    assert infd_main(["describe", "--init", str(sd_f8), "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert f"converted from {sd_f8} (diffusers, AutoencoderKL" in out
    assert "latent 4x8x8 (f8)" in out and "phi 8x64x64" in out and "decoder.conv_norm_out.weight" in out
    yaml_cfg = tmp_path / "model.yaml"
    yaml_cfg.write_text(f"init:\n  autoencoder: {sd_f8}\nfreeze_encoder: true\nrenderer:\n  kind: liif\n")
    assert infd_main(["describe", str(yaml_cfg), "--input-size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["latent_shape"] == [4, 8, 8] and info["renderer"] == "liif" and info["source"]["format"] == "diffusers"
    frozen = info["params"]["encoder"] + 8 * 8 + 8  # encoder and quant_conv (8 -> 8, 1x1)
    assert info["trainable_params"] == info["params"]["total"] - frozen
    assert infd_main(["describe"]) == 2  # neither a config nor --init
    assert infd_main(["describe", "--init", str(tmp_path / "nowhere")]) == 2
    assert "model.init.autoencoder" in capsys.readouterr().err
