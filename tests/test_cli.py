"""infd upsample, infd eval-ae and infd sample on small exported models; their usage errors."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.exports import save_ae, save_unet
from infd.models import NeuralFieldAutoencoder
from tests.images import bomb_png, build, exif_rotated_jpeg, noise_image, write_folder
from tests.test_models import tiny_cfg


def infd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "infd.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_upsample_by_scale_size_and_region(tmp_path, capsys):
    """The installed command once (a subprocess), then its main() in this process: same code path,
    without paying the interpreter's start and imports for every case."""
    model = NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64}))
    save_ae(model, tmp_path / "ae")
    noise_image(120, 80, 0).save(tmp_path / "in.png")
    res = infd("upsample", str(tmp_path / "in.png"), "--ckpt", str(tmp_path / "ae"), "--scale", "2.5",
               "--out", str(tmp_path / "x.png"))
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "x.png").size == (300, 200)
    code, _, err = run(capsys, "upsample", tmp_path / "in.png", "--ckpt", tmp_path / "ae", "--size", "700x500",
                       "--out", tmp_path / "full.png")
    assert code == 0, err
    code, _, err = run(capsys, "upsample", tmp_path / "in.png", "--ckpt", tmp_path / "ae", "--size", "700x500",
                       "--region", "100,50,400,300", "--out", tmp_path / "crop.png")
    assert code == 0, err
    full, crop = np.asarray(Image.open(tmp_path / "full.png")), np.asarray(Image.open(tmp_path / "crop.png"))
    assert crop.shape == (250, 300, 3)
    assert np.array_equal(crop, full[50:300, 100:400])  # strictly local renderer: a region is a crop
    code, _, err = run(capsys, "upsample", tmp_path / "in.png", "--ckpt", tmp_path / "ae", "--size", "7x",
                       "--out", tmp_path / "bad.png")
    assert code == 2 and "WIDTHxHEIGHT" in err


@pytest.mark.slow
def test_eval_ae_reports_scales_lpips_label_and_skips(tmp_path):
    model = NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64}))
    save_ae(model, tmp_path / "ae")
    write_folder(tmp_path / "src", [(300, 260), (140, 150), (100, 90)])
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64")
    res = infd("eval-ae", "--ckpt", str(tmp_path / "ae"), "--data", str(tmp_path / "shards"), "--lpips", "random")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["images"] == 3
    assert {"psnr_1x", "psnr_2x", "psnr_4x", "lpips_1x_randinit", "scale_consistency_psnr_1x"} <= set(out)
    assert "lpips_1x" not in out  # a random-init LPIPS is never reported under the real name
    assert out["skipped_4x_too_small"] == 2  # 256 px needed: only the 300x260 image has it
    assert 0 < out["psnr_1x"] < 60


@pytest.mark.slow
def test_sample_uses_the_exports_sampling_defaults_and_refuses_bad_options(tmp_path, capsys):
    from infd.diffusion.spec import SamplingSpec
    from infd.models.unet import UNet, UNetConfig

    save_ae(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), tmp_path / "ae")
    recorded = SamplingSpec(sampler="ddim", steps=4, eta=1.0, spacing="leading")  # leading: t = 751, 501, 251, 1
    save_unet(UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)), tmp_path / "unet",
              sampling=recorded)
    common = ["sample", "--ae", str(tmp_path / "ae"), "--unet", str(tmp_path / "unet"), "--size", "48x32"]
    res = infd(*common, "--out", str(tmp_path / "s.png"))
    assert res.returncode == 0, res.stderr
    assert "sampler ddim, 4 steps, eta 1.0, spacing leading (unset options: the UNet export's defaults)" in res.stdout
    assert Image.open(tmp_path / "s.png").size == (48, 32)
    # Another sampler drops the recorded bundle; options it does not have end as one-line usage errors.
    # In this process from here (the same main(), without a new interpreter's imports).
    code, _, err = run(capsys, *common, "--sampler", "dpmpp", "--spacing", "leading", "--out", tmp_path / "x.png")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("infd sample: error: timestep spacing 'leading' applies to ddim and ddpm only")
    code, _, err = run(capsys, *common, "--spacing", "bogus", "--out", tmp_path / "x.png")
    assert code == 2 and "invalid choice: 'bogus'" in err


# ---- In-process: user mistakes end as `infd <cmd>: error: ...`, exit 2, no traceback. ----

def run(capsys, *args):
    """infd.cli.main in-process -> (exit code, stdout, stderr); argparse's exits included."""
    from infd.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_of(capsys, command, *args) -> str:
    code, _, err = run(capsys, *args)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"infd {command}: error: "), err
    return line


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny autoencoder, an epsilon UNet that records it, a rectified-flow UNet that does not."""
    from infd.models.unet import UNet, UNetConfig

    root = tmp_path_factory.mktemp("exports")
    save_ae(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), root / "ae")
    unet = UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)
    save_unet(UNet(unet), root / "unet", autoencoder=str(root / "ae"))
    save_unet(UNet(unet), root / "flow", diffusion={"objective": "rectified_flow"})
    return root


def test_version(capsys):
    from importlib.metadata import version

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"infd {version('infd')}"


def walk(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def test_every_option_has_help_and_shows_its_default():
    from data_prep import build_shards, encode_latents, index_shards
    from infd.cli import build_parser

    parsers = [*walk(build_parser()), build_shards.build_parser(), index_shards.build_parser(),
               encode_latents.build_parser()]
    assert {p.prog for p in parsers} >= {"infd sample", "infd upsample", "infd data stats"}
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{parser.prog} {name} has no help"
            if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
                assert "default" in formatter._get_help_string(action), f"{parser.prog} {name} hides its default"


def test_upsample_applies_exif_orientation(tmp_path, exports, capsys):
    # Stored 240x130, orientation 8 (displayed 130x240): --scale 2 renders the upright 260x480.
    (tmp_path / "rot.jpg").write_bytes(exif_rotated_jpeg(240, 130, orientation=8))
    code, out, err = run(capsys, "upsample", tmp_path / "rot.jpg", "--ckpt", exports / "ae", "--scale", 2,
                         "--out", tmp_path / "x.png")
    assert code == 0, err
    assert Image.open(tmp_path / "x.png").size == (260, 480)
    assert "(130x240)" in out


def test_upsample_refuses_unreadable_images(tmp_path, exports, capsys):
    (tmp_path / "text.jpg").write_text("not a JPEG\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    cases = {"text.jpg": "not an image format PIL can read", "empty.png": "the file is empty",
             "bomb.png": "too many pixels", "missing.png": "no such file"}
    for name, message in cases.items():
        line = error_of(capsys, "upsample", "upsample", tmp_path / name, "--ckpt", exports / "ae", "--scale", 2,
                        "--out", tmp_path / "x.png")
        assert f"image {tmp_path / name}: {message}" in line, line
    # A folder is a folder of inputs (images by suffix): its results go to a folder.
    line = error_of(capsys, "upsample", "upsample", tmp_path, "--ckpt", exports / "ae", "--scale", 2,
                    "--out", tmp_path / "x.png")
    assert "writes a folder of images; give a folder path" in line, line
    assert not (tmp_path / "x.png").exists()


def test_unreadable_exports(tmp_path, exports, capsys):
    noise_image(32, 32, 0).save(tmp_path / "in.png")
    common = ["upsample", tmp_path / "in.png", "--scale", 1, "--out", tmp_path / "x.png", "--ckpt"]
    assert "no such directory" in error_of(capsys, "upsample", *common, tmp_path / "nope")
    assert "no config.json" in error_of(capsys, "upsample", *common, tmp_path)
    assert "holds a 'unet' model; expected 'autoencoder'" in error_of(capsys, "upsample", *common, exports / "unet")


def test_region_outside_the_canvas(tmp_path, exports, capsys):
    noise_image(32, 24, 0).save(tmp_path / "in.png")
    line = error_of(capsys, "upsample", "upsample", tmp_path / "in.png", "--ckpt", exports / "ae", "--size",
                    "64x48", "--region", "0,0,100,10", "--out", tmp_path / "x.png")
    assert "--region 0,0,100,10: the box must be non-empty and lie inside the 64x48 output" in line
    line = error_of(capsys, "sample", "sample", "--unet", exports / "unet", "--size", "48x32", "--region",
                    "10,10,10,20", "--out", tmp_path / "s.png")
    assert "lie inside the 48x32 output" in line
    line = error_of(capsys, "upsample", "upsample", tmp_path / "in.png", "--ckpt", exports / "ae", "--scale", 1,
                    "--out", tmp_path / "x.unknown")
    assert "suffix '.unknown' names no image format" in line


def test_sampler_that_does_not_fit_the_objective(tmp_path, exports, capsys):
    common = ["sample", "--ae", exports / "ae", "--size", "32x32", "--steps", 2, "--out", tmp_path / "s.png"]
    line = error_of(capsys, "sample", *common, "--unet", exports / "flow", "--sampler", "ddim")
    assert "sampler 'ddim' does not fit rectified flow; choose from ['euler', 'heun']" in line
    line = error_of(capsys, "sample", *common, "--unet", exports / "unet", "--sampler", "heun")
    assert "sampler 'heun' does not fit a VP (epsilon/v) objective" in line
    code, out, err = run(capsys, *common, "--unet", exports / "flow")  # unset: euler for rectified flow
    assert code == 0 and "sampler euler, 2 steps" in out, err


def test_prompt_options(tmp_path, exports, capsys):
    (tmp_path / "p.txt").write_text("a\n")
    common = ["sample", "--unet", exports / "unet", "--size", "32x32", "--out", tmp_path / "s.png"]
    line = error_of(capsys, "sample", *common, "--prompt", "a", "--prompts", tmp_path / "p.txt")
    assert "argument --prompts: not allowed with argument --prompt" in line
    assert f"--prompts {tmp_path / 'no.txt'}: no such file" in error_of(
        capsys, "sample", *common, "--prompts", tmp_path / "no.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no non-empty line" in error_of(capsys, "sample", *common, "--prompts", tmp_path / "blank.txt")
    assert "at least 1" in error_of(capsys, "sample", *common, "--num-images", 0)


def test_sample_takes_the_autoencoder_from_the_unet_export(tmp_path, exports, capsys):
    common = ["sample", "--size", "40x24", "--steps", 2, "--out", tmp_path / "s.png"]
    code, out, err = run(capsys, *common, "--unet", exports / "unet")
    assert code == 0, err
    assert f"autoencoder {exports / 'ae'} (the autoencoder recorded in the UNet export)" in out
    assert Image.open(tmp_path / "s.png").size == (40, 24)
    line = error_of(capsys, "sample", *common, "--unet", exports / "flow")
    assert "records no autoencoder" in line and "pass --ae" in line


def test_num_images_do_not_depend_on_the_batch_size(tmp_path, exports, capsys):
    # eta 1: fresh noise at every step too, drawn per image.
    common = ["sample", "--unet", exports / "unet", "--size", "40x24", "--steps", 3, "--eta", 1, "--seed", 5,
              "--num-images", 3]
    for batch in (1, 2):
        code, out, err = run(capsys, *common, "--batch-size", batch, "--out", tmp_path / f"b{batch}")
        assert code == 0, err
        assert "seed 7" in out
    images = [[np.asarray(Image.open(tmp_path / f"b{b}" / f"{k:04d}.png")) for k in range(3)] for b in (1, 2)]
    for k in range(3):
        assert np.array_equal(images[0][k], images[1][k]), k
    assert not np.array_equal(images[0][0], images[0][1])  # each image its own seed
    code, _, err = run(capsys, *common, "--batch-size", 2, "--out", tmp_path / "grid.png")
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * (24 + 2), 2 + 2 * (40 + 2), 3)  # 2 per row, 2 px white borders
    assert np.array_equal(grid[2:26, 44:84], images[0][1])


@pytest.mark.slow
def test_errors_leave_no_traceback_in_a_subprocess(tmp_path, exports):
    (tmp_path / "text.jpg").write_text("not a JPEG\n")
    res = infd("upsample", str(tmp_path / "text.jpg"), "--ckpt", str(exports / "ae"), "--scale", "2",
               "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"infd upsample: error: image {tmp_path / 'text.jpg'}: not an image"), res.stderr
