import subprocess
import sys
from pathlib import Path

import torch

from infd.export import load_model, save_model
from infd.geometry import crop_queries
from tests.test_models import tiny_cfg
from infd.models import NeuralFieldAutoencoder

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
