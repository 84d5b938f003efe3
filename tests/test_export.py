import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infd.compat import checkpoint_data_position, checkpoint_task_state
from infd.config import ConfigError, from_mapping
from infd.diffusion.schedule import DiffusionConfig
from infd.diffusion.spec import SamplingSpec
from infd.export import CONFIG, WEIGHTS, ExportRecord, load_export, read_record, save_export
from infd.models.unet import UNet, UNetConfig
from infd.text import TextEncoderConfig
from infd.geometry import crop_queries
from tests.test_models import tiny_cfg
from tests.training import env
from infd.models import NeuralFieldAutoencoder
from train.config import TrainerConfig
from train.dist import DistInfo
from train.diffusion import DiffusionTrainConfig
from train.export import main as export_main
from train.run_exports import export_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_export_round_trip_gives_identical_renders(tmp_path):
    model = NeuralFieldAutoencoder(tiny_cfg(bottleneck={"kind": "kl"}, renderer={"kind": "liif"})).eval()
    save_export(model, ExportRecord("autoencoder", model.cfg, step=7), tmp_path / "ae")
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["config.json", "model.safetensors"]
    loaded, record = load_export(tmp_path / "ae")
    assert record == ExportRecord("autoencoder", model.cfg, step=7)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    coords, cells = crop_queries((100, 80), (0, 0, 100, 80))
    with torch.no_grad():
        a = model.render(model.decode(model.encode(x)), coords, cells)
        b = loaded.render(loaded.decode(loaded.encode(x)), coords, cells)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_export_loads_without_training_code(tmp_path):
    model = NeuralFieldAutoencoder(tiny_cfg())
    save_export(model, ExportRecord("autoencoder", model.cfg), tmp_path / "ae")
    code = (
        "import sys; from infd.export import load_export; m, _ = load_export(sys.argv[1]);"
        "bad = [n for n in sys.modules if n.split('.')[0] in ('train', 'data_prep', 'hydra', 'deepspeed', 'wandb')];"
        "assert not bad, bad; print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ae")], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NeuralFieldAutoencoder"


def test_an_export_of_format_1_loads_with_its_metadata_in_the_record(tmp_path):
    """Exports written before the typed record kept an untyped "extra" mapping; the latent scale
    stood beside a schedule that may say "auto". infd.compat reads them, once, into the record."""
    unet = UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16))
    save_export(unet, ExportRecord("unet", unet.cfg), tmp_path / "old")
    meta = json.loads((tmp_path / "old" / CONFIG).read_text())
    extra = {"step": 3, "ema": True, "latent_scale": 0.5, "diffusion": {"objective": "v", "latent_scale": "auto"},
             "text": {"kind": "none"}, "autoencoder": "runs/ae/export/autoencoder",
             "sampling": {"sampler": "ddim", "steps": 10, "eta": 1.0, "spacing": "leading"}}
    old = {"format_version": 1, "kind": "unet", "config": meta["config"], "extra": extra}
    (tmp_path / "old" / CONFIG).write_text(json.dumps(old))
    loaded, record = load_export(tmp_path / "old")
    assert record == ExportRecord("unet", unet.cfg, step=3, ema=True,
                                  diffusion=DiffusionConfig(objective="v", latent_scale=0.5),
                                  text=TextEncoderConfig(kind="none"), autoencoder="runs/ae/export/autoencoder",
                                  sampling=SamplingSpec(steps=10, eta=1.0, spacing="leading"))
    assert record.latent_scale == 0.5 and torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    (tmp_path / "old" / CONFIG).write_text(json.dumps(old | {"format_version": 9}))
    with pytest.raises(ConfigError, match="export format 9 is not supported"):
        read_record(tmp_path / "old")


# Exports from checkpoints (train.export, trainer.export_every): equal to the run's own export.
# The training runs are the distributed-equivalence runs of tests/test_train_autoencoder.py and
# tests/test_train_diffusion.py, which export as they go; these check what they wrote.

def assert_same_export(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / WEIGHTS)), load_file(str(b / WEIGHTS))
    assert sorted(wa) == sorted(wb)
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and torch.equal(wa[key], wb[key]), key
    assert (a / CONFIG).read_text() == (b / CONFIG).read_text()


def check_autoencoder_exports(run_dir: Path, out: Path, capsys) -> None:
    """A 2-rank ZeRO-2 run with an EMA, 4 steps, checkpoints and exports every 2."""
    # The periodic export of step 2 beside its checkpoint; step 4's is the end of the run's.
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["autoencoder", "step_0000002"]
    cli = subprocess.run([sys.executable, "-m", "train.export", str(run_dir), "--step", "4"], cwd=ROOT, env=env(),
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert_same_export(run_dir / "export" / "step_0000004" / "autoencoder", run_dir / "export" / "autoencoder")
    record = read_record(run_dir / "export" / "autoencoder")
    assert (record.step, record.ema, record.diffusion, record.sampling) == (4, True, None, None)
    # The same code wrote step 2's during training: the command line rewrites it identically.
    export_main([str(run_dir), "--step", "2", "--out", str(out)])
    assert_same_export(out, run_dir / "export" / "step_0000002" / "autoencoder")
    with pytest.raises(SystemExit) as exc:
        export_main([str(run_dir), "--step", "7"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "train.export: error: no checkpoint of step 7" in err and "available steps: 2, 4" in err


def check_unet_exports(run_dir: Path, out: Path) -> None:
    """A 1-process run without EMA (the portable weights themselves), latent scale estimated at
    start, checkpoints and exports at every step."""
    export_main([str(run_dir), "--out", str(out / "last")])  # no --step: the latest checkpoint
    assert_same_export(out / "last", run_dir / "export" / "unet")
    record = read_record(out / "last")
    assert record.ema is False and record.latent_scale != 1.0 and record.sampling.steps == 10
    # A checkpoint saved before state.json recorded the latent scale: the run's metrics.jsonl has it
    # (infd.compat.logged_latent_scale).
    state_file = run_dir / "checkpoints" / "step_0000001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["task"] == {"latent_scale": record.latent_scale}
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "task"}))
    export_main([str(run_dir), "--step", "1", "--out", str(out / "first")])
    assert_same_export(out / "first", run_dir / "export" / "step_0000001" / "unet")


def test_a_stop_checkpoint_is_exported_only_when_the_grace_period_has_room(tmp_path, caplog):
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000005"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 5, "save_s": 16.0}))
    cfg, info = TrainerConfig(export_every=10, grace_s=30.0), DistInfo(0, 0, 1, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="train"):
        assert export_after_checkpoint(tmp_path / "run", ckpt, 5, DiffusionTrainConfig(trainer=cfg), info,
                                       stopping=True) is None
    assert f"python -m train.export {tmp_path / 'run'} --step 5" in caplog.text
    assert "16.0 s of trainer.grace_s=30" in caplog.text
    assert not (tmp_path / "run" / "export").exists()


def test_export_every_is_validated():
    with pytest.raises(ConfigError, match="'trainer.export_every' must be >= 0"):
        from_mapping(TrainerConfig, {"export_every": -1}, prefix="trainer.")


def test_older_checkpoint_states_are_read_in_the_compatibility_module():
    """state.json as older versions wrote it: the latent scale at the top level, the data position
    as an epoch and a count (resumed at the next epoch), or only an epoch number."""
    assert checkpoint_task_state({"step": 3, "task": {"latent_scale": 0.5}}) == {"latent_scale": 0.5}
    assert checkpoint_task_state({"step": 3, "latent_scale": 0.25}) == {"latent_scale": 0.25}
    assert checkpoint_task_state({"step": 3}) == {}
    now = {"epoch": 1, "slot": 96, "batches": 12}
    assert checkpoint_data_position({"step": 12, "data": now}, grad_accum=2) == now
    old = {"step": 12, "data": {"epoch": 1, "consumed": 24}}
    assert checkpoint_data_position(old, grad_accum=2) == {"epoch": 2, "slot": 0, "batches": 24}
    assert checkpoint_data_position({"step": 12, "data_epoch": 0}, grad_accum=2) == {"epoch": 1, "slot": 0,
                                                                                      "batches": 24}
