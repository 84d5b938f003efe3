"""The speed switches (train/speed.py, optim.impl) against the default step, in real training runs of
the tiny configurations: the same losses within each switch's tolerance.

- bf16 autocast: 5 steps within 2% relative of fp32 (stage 1's loss terms; stage 2's loss);
- channels_last, and fused or foreach Adam: 3 steps within 1e-5 relative;
- torch.compile: 3 steps within 1e-4 relative (marker `compile`, out of make test: minutes of compiling).

Stage 1 runs without the GAN for these steps (loss.disc_start past them): its adaptive weight is a ratio
of two gradient norms that turns rounding into percent-level changes of loss_g, and compares nothing
about the switch. The 1e-5 comparisons run at lr 1e-5: Adam's first updates are about lr x sign(grad),
so at the tiny configuration's lr 5e-4 a rounding-level gradient change near 0 moves a weight by the
whole lr (measured: channels_last 5e-4 relative by step 3 at lr 5e-4, 7e-6 at 1e-5). Every stage-1 run uses
lr 1e-5, so one 5-step run of the default step serves every comparison (its first 3 steps for the 3-step ones:
the steps of a shorter run are the same steps).
"""
import pytest

from tests.test_train_autoencoder import AE, TINY
from tests.training import assert_close, metrics, run

pytestmark = pytest.mark.slow
STAGE1 = ("loss_g", "l1", "lpips_randinit", "bottleneck")
NO_GAN = ("loss.disc_start=100",)
SMALL_LR = ("optim.lr=1e-5", "disc_optim.lr=1e-5")
DIFF = "train.diffusion"
STAGE2 = ("experiment=diffusion_cpu_tiny", "data=synthetic", "trainer.ckpt_every=100", "trainer.image_every=1000",
          "diffusion.latent_scale_samples=8", "text.kind=none", "unet.context_dim=0", "data.loader.batch_size=4")


def _stage1(tmp_path, name: str, steps: int, *switches: str) -> dict[int, dict]:
    run(AE, tmp_path, name, *TINY, f"trainer.max_steps={steps}", "trainer.ckpt_every=100", *NO_GAN, *SMALL_LR,
        *switches)
    return metrics(tmp_path, name)


def _close_over(a: dict[int, dict], b: dict[int, dict], keys, rtol: float) -> None:
    assert sorted(b) and set(b) <= set(a)
    for step in b:
        assert_close(a[step], b[step], keys, rtol)


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> dict[int, dict]:
    """The default step's 5 steps, which every switch is compared with (its first 3 for the 3-step ones)."""
    return _stage1(tmp_path_factory.mktemp("speed"), "default", 5)


def test_bf16_autocast_stays_within_2_percent_of_fp32_over_5_steps(tmp_path, default):
    _close_over(default, _stage1(tmp_path, "bf16", 5, "trainer.autocast=bf16"), STAGE1, rtol=0.02)
    run(DIFF, tmp_path, "unet_fp32", *STAGE2, "trainer.max_steps=5")
    run(DIFF, tmp_path, "unet_bf16", *STAGE2, "trainer.max_steps=5", "trainer.autocast=bf16")
    _close_over(metrics(tmp_path, "unet_fp32"), metrics(tmp_path, "unet_bf16"), ("loss",), rtol=0.02)


def test_channels_last_and_fused_or_foreach_adam_match_the_default_over_3_steps(tmp_path, default):
    _close_over(default, _stage1(tmp_path, "nhwc_fused", 3, "trainer.channels_last=true", "optim.impl=fused",
                                 "disc_optim.impl=fused"), STAGE1, rtol=1e-5)
    _close_over(default, _stage1(tmp_path, "foreach", 3, "optim.impl=foreach", "disc_optim.impl=foreach"),
                STAGE1, rtol=1e-5)


@pytest.mark.compile
def test_compile_matches_the_default_over_3_steps(tmp_path, default):
    _close_over(default, _stage1(tmp_path, "compiled", 3, "trainer.compile=true"), STAGE1, rtol=1e-4)
