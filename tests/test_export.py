import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infd.config import ConfigError, from_mapping
from infd.export import WEIGHTS, load_model, read_export_config, save_model
from infd.geometry import crop_queries
from tests.test_models import tiny_cfg
from tests.training import env, run
from infd.models import NeuralFieldAutoencoder
from train.config import TrainerConfig
from train.dist import DistInfo
from train.export import export_after_checkpoint, main as export_main

ROOT = Path(__file__).resolve().parents[1]


def test_export_round_trip_gives_identical_renders(tmp_path):
    model = NeuralFieldAutoencoder(tiny_cfg(bottleneck={"kind": "kl"}, renderer={"kind": "liif"})).eval()
    save_model(model, tmp_path / "ae", extra={"step": 7})
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ae")
    assert loaded.export_extra == {"step": 7}
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    coords, cells = crop_queries((100, 80), (0, 0, 100, 80))
    with torch.no_grad():
        a = model.render(model.decode(model.encode(x)), coords, cells)
        b = loaded.render(loaded.decode(loaded.encode(x)), coords, cells)
    assert torch.equal(a, b)


def test_export_loads_without_training_code(tmp_path):
    save_model(NeuralFieldAutoencoder(tiny_cfg()), tmp_path / "ae")
    code = (
        "import sys; from infd.export import load_model; m = load_model(sys.argv[1]);"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('train', 'data_prep', 'hydra', 'deepspeed', 'wandb')];"
        "assert not bad, bad; print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ae")], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NeuralFieldAutoencoder"


# Exports from checkpoints (train.export, trainer.export_every): equal to the run's own export.
AE_RUN = ("experiment=ae_cpu_tiny", "trainer.image_every=1000", "trainer.max_steps=2", "trainer.ckpt_every=1",
          "trainer.export_every=1", "deepspeed=zero2", "trainer.ema=true")


def assert_same_export(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert sorted(wa) == sorted(wb)
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and torch.equal(wa[key], wb[key]), key
    assert read_export_config(a) == read_export_config(b)


def test_export_of_a_two_rank_zero2_checkpoint_equals_the_runs_own(tmp_path, capsys):
    run("train.autoencoder", tmp_path, "r", *AE_RUN, nproc=2)
    run_dir = tmp_path / "r"
    # The periodic export of step 1 beside its checkpoint; step 2's is the end of the run's.
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["autoencoder", "step_0000001"]
    cli = subprocess.run([sys.executable, "-m", "train.export", str(run_dir), "--step", "2"], cwd=ROOT, env=env(),
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert_same_export(run_dir / "export" / "step_0000002" / "autoencoder", run_dir / "export" / "autoencoder")
    assert read_export_config(run_dir / "export" / "autoencoder")["extra"] == {"step": 2, "ema": True}
    # The same code wrote step 1's during training: the command line rewrites it identically.
    export_main([str(run_dir), "--step", "1", "--out", str(tmp_path / "one")])
    assert_same_export(tmp_path / "one", run_dir / "export" / "step_0000001" / "autoencoder")
    with pytest.raises(SystemExit) as exc:
        export_main([str(run_dir), "--step", "7"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "train.export: error: no checkpoint of step 7" in err and "available steps: 1, 2" in err


def test_diffusion_export_from_a_checkpoint_carries_the_runs_metadata(tmp_path):
    """One process, no EMA (the portable weights themselves), latent scale estimated at start."""
    run("train.diffusion", tmp_path, "d", "experiment=diffusion_cpu_tiny", "data=synthetic", "text.kind=none",
        "unet.context_dim=0", "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.export_every=1",
        "trainer.ema=false", "diffusion.latent_scale_samples=16", "trainer.image_every=1000")
    run_dir = tmp_path / "d"
    export_main([str(run_dir), "--out", str(tmp_path / "last")])  # no --step: the latest checkpoint
    assert_same_export(tmp_path / "last", run_dir / "export" / "unet")
    extra = read_export_config(tmp_path / "last")["extra"]
    assert extra["ema"] is False and extra["latent_scale"] != 1.0 and extra["sampling"]["steps"] == 10
    # A checkpoint saved before state.json recorded the latent scale: the run's metrics.jsonl has it.
    state_file = run_dir / "checkpoints" / "step_0000001" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "latent_scale"}))
    export_main([str(run_dir), "--step", "1", "--out", str(tmp_path / "first")])
    assert_same_export(tmp_path / "first", run_dir / "export" / "step_0000001" / "unet")


def test_a_stop_checkpoint_is_exported_only_when_the_grace_period_has_room(tmp_path, caplog):
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000005"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "save_s": 16.0}))
    cfg, info = TrainerConfig(export_every=10, grace_s=30.0), DistInfo(0, 0, 1, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="train"):
        assert export_after_checkpoint(tmp_path / "run", ckpt, 5, cfg, info, stopping=True) is None
    assert f"python -m train.export {tmp_path / 'run'} --step 5" in caplog.text
    assert "16.0 s of trainer.grace_s=30" in caplog.text
    assert not (tmp_path / "run" / "export").exists()


def test_export_every_is_validated():
    with pytest.raises(ConfigError, match="'trainer.export_every' must be >= 0"):
        from_mapping(TrainerConfig, {"export_every": -1}, prefix="trainer.")
