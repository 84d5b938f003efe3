"""Stable Diffusion as stage 2: our DDIM loop with diffusers' own UNet2DConditionModel and the
folder's CLIP text encoder must give StableDiffusionPipeline's latents. The SD folder is tiny
and random-init (train.tiny_sd), written once per module: no weights can be downloaded here."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from infd.config import ConfigError, from_mapping, to_mapping  # noqa: E402
from infd.convert.stable_diffusion import read_sd_settings  # noqa: E402
from infd.models.diffusers_unet import DiffusersUNet  # noqa: E402
from infd.diffusion.samplers import randn, vp_timesteps  # noqa: E402
from infd.diffusion.schedule import DiffusionConfig, build_schedule  # noqa: E402
from infd.models import UNetConfig, build_unet  # noqa: E402
from infd.diffusion.generate import LatentDiffusion, generate_latents  # noqa: E402
from infd.diffusion.spec import Conditioning, SamplingSpec  # noqa: E402
from infd.text import TextEncoderConfig, build_text_encoder  # noqa: E402
from train.tiny_sd import write_tiny_sd  # noqa: E402

PROMPTS = ["a red fox, 4k", "A castle on a hill at dawn"]


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0, sample_size=8)


@pytest.fixture(scope="module")
def v_root(sd_root, tmp_path_factory):
    """The same folder, its scheduler switched to v-prediction (as SD 2.x's 768 models)."""
    root = shutil.copytree(sd_root, tmp_path_factory.mktemp("sd-v") / "tiny-sd-v")
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    return root


def load_pipeline(root):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_latents_equal_stable_diffusion_pipeline_random_init(prediction, sd_root, v_root):
    root = sd_root if prediction == "epsilon" else v_root
    pipe = load_pipeline(root)
    settings = read_sd_settings(root)
    diffusion = from_mapping(DiffusionConfig, settings["diffusion"])
    assert (settings["spacing"], diffusion.set_alpha_to_one, diffusion.steps_offset) == ("leading", False, 1)
    assert diffusion.objective == {"epsilon": "epsilon", "v_prediction": "v"}[prediction]
    unet = build_unet(UNetConfig(kind="diffusers", pretrained=str(root)), load_pretrained=True)
    text = build_text_encoder(TextEncoderConfig(kind="hf_clip", pretrained=str(root)))
    shape, seed = (len(PROMPTS), 4, 8, 8), 7
    spec = SamplingSpec(sampler="ddim", steps=10, eta=0.0, spacing=settings["spacing"], cfg_scale=5.0)
    ours = generate_latents(LatentDiffusion(unet, diffusion, text), spec, Conditioning(PROMPTS), shape, seed)
    # generate_latents draws its noise as randn(shape, Generator().manual_seed(seed)): the same noise here
    noise = randn(shape, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = pipe(PROMPTS, height=16, width=16, guidance_scale=5.0, num_inference_steps=10, eta=0.0,
                      latents=noise, output_type="latent").images
    diff = (ours * diffusion.latent_scale - theirs).abs().max().item()  # the pipeline's latents are scaled
    print(f"{prediction}: max |ours - diffusers| = {diff:.3g} (latents up to {theirs.abs().max():.3g})")
    assert diff < 1e-4


@pytest.mark.slow
def test_text_tokens_equal_encode_prompt_with_and_without_clip_skip_random_init(sd_root):
    pipe = load_pipeline(sd_root)
    ours = build_text_encoder(TextEncoderConfig(kind="hf_clip", pretrained=str(sd_root)))
    assert ours.width == 32 and not ours.is_random_init and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    diffs = [(ours(PROMPTS) - cond).abs().max().item(), (ours([""] * 2) - uncond).abs().max().item()]
    # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers 5 flattened
    # away: point it at the same layer so the pipeline's own clip_skip code runs.
    if not hasattr(pipe.text_encoder, "text_model"):
        pipe.text_encoder.text_model = SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
    skip = build_text_encoder(TextEncoderConfig(kind="hf_clip", pretrained=str(sd_root / "text_encoder"), clip_skip=1))
    cond_skip, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=1)
    diffs.append((skip(PROMPTS) - cond_skip).abs().max().item())
    print(f"text tokens, max |ours - encode_prompt|: cond, uncond, clip_skip=1 = {diffs}")
    assert max(diffs) < 1e-5 and (skip(PROMPTS) - cond).abs().max() > 1e-3  # clip_skip changes the tokens
    with pytest.raises(ConfigError, match="text.pretrained"):
        build_text_encoder(TextEncoderConfig(kind="hf_clip", pretrained=str(sd_root / "nowhere")))


def test_tiny_tokenizer_ids_equal_open_clip_tokenizer(sd_root):
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd_root / "tokenizer", local_files_only=True)
    reference = open_clip.get_tokenizer("ViT-B-32")  # OpenAI CLIP's BPE: pads with 0, SD's with <|endoftext|>
    for prompt in PROMPTS + ["don't stop: 123 cafés!!", ""]:
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        ref = reference([prompt])[0].tolist()
        n = sum(1 for i in ref if i)
        assert ids[:n] == ref[:n] and set(ids[n:]) == {49407} and len(ids) == 77


@pytest.mark.parametrize("offset", [0, 1])
def test_scaled_linear_schedule_and_timesteps_equal_ddim_scheduler(offset):
    from diffusers import DDIMScheduler

    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=offset,
              set_alpha_to_one=False)
    theirs = DDIMScheduler(**kw)
    ours = build_schedule(DiffusionConfig(**kw))
    diff = (ours.alphas_cumprod - theirs.alphas_cumprod.double()).abs().max().item()
    print(f"alphas_cumprod: max |ours (float64) - diffusers (float32)| = {diff:.3g}")
    assert diff < 1e-6
    assert ours.final_alpha_cumprod == pytest.approx(float(theirs.final_alpha_cumprod), abs=1e-7)
    trailing = DDIMScheduler(**kw, timestep_spacing="trailing")
    for n in (1, 10, 20, 50, 100, 200, 250, 500):
        theirs.set_timesteps(n)
        assert vp_timesteps(ours, n, "leading") == theirs.timesteps.tolist(), n
        trailing.set_timesteps(n)
        assert vp_timesteps(ours, n, "trailing") == trailing.timesteps.tolist(), n
    paper = build_schedule(DiffusionConfig())  # the paper's linear schedule, unchanged
    ddim = DDIMScheduler(beta_start=0.0015, beta_end=0.0195)
    assert (paper.alphas_cumprod - ddim.alphas_cumprod.double()).abs().max() < 1e-6
    assert paper.final_alpha_cumprod == 1.0


def test_read_sd_settings_and_its_errors(sd_root, tmp_path):
    settings = read_sd_settings(sd_root)
    assert settings["diffusion"] == {"objective": "epsilon", "timesteps": 1000, "beta_start": 0.00085,
                                     "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                                     "set_alpha_to_one": False, "latent_scale": 0.18215}
    assert settings["spacing"] == "leading" and settings["unet_config"]["cross_attention_dim"] == 32
    assert read_sd_settings(sd_root / "unet") == settings  # the unet/ folder: its parent is the root
    broken = shutil.copytree(sd_root, tmp_path / "sd", ignore=shutil.ignore_patterns("*.safetensors", "*.txt"))
    sched = broken / "scheduler" / "scheduler_config.json"
    for key, value, match in [("beta_schedule", "squaredcos_cap_v2", "squaredcos_cap_v2"),
                              ("prediction_type", "sample", "prediction_type 'sample'")]:
        good = json.loads(sched.read_text())
        sched.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ConfigError, match=match):
            read_sd_settings(broken)
        sched.write_text(json.dumps(good))
    sched.unlink()
    with pytest.raises(ConfigError, match="scheduler/scheduler_config.json"):
        read_sd_settings(broken)
    with pytest.raises(ConfigError, match="unet/config.json"):
        read_sd_settings(tmp_path)


def test_build_unet_from_recorded_config_without_source_random_init(sd_root, tmp_path):
    model = build_unet(UNetConfig(kind="diffusers", pretrained=str(sd_root)), load_pretrained=True)
    assert isinstance(model, DiffusersUNet)
    assert (model.cfg.in_channels, model.cfg.context_dim) == (4, 32) and model.cfg.diffusers_config
    # An export records the config as JSON; it rebuilds with no source folder.
    recorded = json.loads(json.dumps(to_mapping(model.cfg)))
    cfg = from_mapping(UNetConfig, {**recorded, "pretrained": str(tmp_path / "gone")})
    rebuilt = build_unet(cfg)
    rebuilt.load_state_dict(model.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 901]), torch.randn(2, 77, 32)
    with torch.no_grad():
        a, b = model(x, t, ctx), rebuilt(x, t, ctx)
    assert torch.equal(a, b) and a.abs().max() > 0
    with pytest.raises(ValueError, match="labels"):
        model(x, t, ctx, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="pretrained"):
        from_mapping(UNetConfig, {"kind": "diffusers"})
    # Weights that do not fit the config: refused, naming the keys.
    from safetensors.torch import load_file, save_file

    unet_dir = shutil.copytree(sd_root / "unet", tmp_path / "unet")
    state = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    state["extra.weight"] = state.pop("conv_in.weight")
    save_file(state, unet_dir / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match=r"missing keys \['conv_in.weight'\].*unexpected keys \['extra.weight'\]"):
        build_unet(UNetConfig(kind="diffusers", pretrained=str(unet_dir)), load_pretrained=True)


def test_guided_sampling_runs_through_the_diffusers_unet_with_classifier_free_guidance(sd_root):
    """DPS (infd/solve/dps.py) with diffusers' UNet2DConditionModel, text prompts and classifier-free guidance:
    the gradient through the UNet (both guidance branches) and the one stopped at z0 both pull the latents
    towards a target on a corner of the latent (a stand-in for a region render, which tests/test_solve.py covers)."""
    settings = read_sd_settings(sd_root)
    diffusion = from_mapping(DiffusionConfig, settings["diffusion"])
    unet = build_unet(UNetConfig(kind="diffusers", pretrained=str(sd_root)), load_pretrained=True)
    model = LatentDiffusion(unet, diffusion, build_text_encoder(TextEncoderConfig(kind="hf_clip",
                                                                                  pretrained=str(sd_root))))
    target = torch.full((4, 4, 4), 0.5)

    def corner_loss(z):
        return (z[:, :, :4, :4] - target).pow(2).flatten(1).sum(1)

    shape, seeds = (2, 4, 8, 8), [1, 2]
    base = dict(sampler="ddim", steps=6, spacing=settings["spacing"], cfg_scale=3.0)
    plain = corner_loss(generate_latents(model, SamplingSpec(**base), Conditioning(PROMPTS), shape, seeds))
    for grad in ("unet", "z0"):
        spec = SamplingSpec(**base, guide_scale=0.1, guide_grad=grad)
        guided = corner_loss(generate_latents(model, spec, Conditioning(PROMPTS, guide=corner_loss), shape, seeds))
        assert (guided < 0.5 * plain).all(), (grad, plain, guided)
