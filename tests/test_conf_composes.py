"""Every option in conf/ composes into the typed dataclasses of its stage: each group option over
the stage's defaults, and each of the stage's experiments (as lightning-hydra-template checks)."""
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from infd.config import ConfigError, from_mapping, to_mapping
from train.autoencoder import AutoencoderTrainConfig
from train.diffusion import DiffusionTrainConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
STAGES = {"autoencoder": (AutoencoderTrainConfig, ("ae_",)), "diffusion": (DiffusionTrainConfig, ("diffusion_", "sr_"))}
# Options a stage refuses on purpose, with the message that names the fix.
REFUSED = {("autoencoder", "data=latents"): "stage 1 trains on images",
           ("autoencoder", "deepspeed=zero3"): "not supported for the autoencoder"}
# What an option needs from the command line to be complete.
NEEDS = {("diffusion", "data=shards"): ["data.autoencoder=/exports/ae"],
         ("autoencoder", "experiment=ae_from_sd"): ["model.init.autoencoder=/models/sd"],
         ("diffusion", "experiment=diffusion_from_sd"): ["unet.pretrained=/models/sd"],
         ("diffusion", "experiment=sr_cpu_tiny"): ["data.autoencoder=/exports/ae"],
         ("diffusion", "experiment=sr_paper"): ["data.autoencoder=/exports/ae"]}


def groups(stage: str) -> list[str]:
    """The config groups the stage's primary config selects (not hydra's own)."""
    defaults = yaml.safe_load((CONF / f"{stage}.yaml").read_text())["defaults"]
    names = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    return [n for n in names if not n.startswith("override") and (CONF / n).is_dir()]


def options(stage: str) -> list[tuple[str, str]]:
    out = []
    for group in groups(stage):
        for path in sorted((CONF / group).glob("*.yaml")):
            if group == "experiment" and not path.stem.startswith(STAGES[stage][1]):
                continue
            out.append((stage, f"{group}={path.stem}"))
    return out


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    """One Hydra initialisation for the module: composing is cheap, initialising is not."""
    for stage, (cls, _) in STAGES.items():
        ConfigStore.instance().store(name=f"{stage}_schema", node=to_mapping(cls()))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        yield
    GlobalHydra.instance().clear()


def compose_stage(stage: str, overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose(stage, overrides=overrides), resolve=True)


@pytest.mark.parametrize("stage, option", options("autoencoder") + options("diffusion"))
def test_every_option_composes_into_the_dataclasses(stage, option):
    raw = compose_stage(stage, [option, *NEEDS.get((stage, option), [])])
    cls, _ = STAGES[stage]
    if (stage, option) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[(stage, option)]):
            from_mapping(cls, raw)
        return
    cfg = from_mapping(cls, raw)
    group, name = option.split("=")
    if group == "experiment":  # an experiment names its run after itself
        assert cfg.run.name


def test_every_group_and_experiment_is_covered():
    covered = {o for _, o in options("autoencoder") + options("diffusion")}
    on_disk = {f"{p.parent.name}={p.stem}" for p in CONF.glob("*/*.yaml")}
    assert on_disk == covered, on_disk ^ covered


def test_another_stages_experiment_fails_at_composition():
    with pytest.raises(Exception, match="unet|model"):
        raw = compose_stage("autoencoder", ["experiment=diffusion_cpu_tiny"])
        from_mapping(AutoencoderTrainConfig, raw)


def test_paper_configs_use_the_papers_values():
    ae = from_mapping(AutoencoderTrainConfig, compose_stage("autoencoder", ["experiment=ae_ffhq_paper"]))
    assert ae.model.bottleneck.legacy and ae.disc.norm == "sync_batch"
    assert ae.data.loader.patch.gt_decode_oversample == 4.0
    hr = from_mapping(AutoencoderTrainConfig, compose_stage("autoencoder", ["experiment=ae_laion_hr"]))
    assert (hr.data.loader.p_hr, hr.data.loader.patch.p_keep_late, hr.data.loader.patch.p_keep_late_step) == \
        (0.5, 0.5, 600000)
    dm = from_mapping(DiffusionTrainConfig, compose_stage("diffusion", ["experiment=diffusion_ffhq_paper"]))
    assert dm.diffusion.latent_scale == 1.0
    assert (dm.samples.sampler, dm.samples.steps, dm.samples.eta, dm.samples.spacing) == ("ddim", 200, 1.0, "leading")
