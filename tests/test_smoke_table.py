"""benchmarks/smoke_table.py, the table `make gpu-smoke` prints, on a folder of logs as gpu_smoke.sh leaves it:
a finished training run, a benchmark's last JSON line, and a part that ran out of time."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_table_reads_each_part_and_names_the_one_that_failed(tmp_path):
    (tmp_path / "device.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB\ntorch 2.11.0 cuda 13.0\n")
    (tmp_path / "status.txt").write_text("stage1_train rc=0 41 s\nrender_throughput rc=0 30 s\n"
                                         "sample_throughput rc=124 45 s\n")
    (tmp_path / "stage1_train.log").write_text(
        "[rank0] INFO train: step 4/5 | 2.1 samples/s | 0.95 s/step | ETA 1s | l1=0.5\n"
        "[rank0] INFO train: step 5/5 | 2.2 samples/s | 0.91 s/step | ETA 0s | l1=0.4\nfinished at step 5\n")
    row = {"megapixels_per_s": 40.0, "mfu": 0.31, "peak_mem_mib": 2048.0}
    render = {"size": 4096, "rows": {"one_tile": {**row, "megapixels_per_s": 10.0}, "batched": row},
              "batched_max_abs_diff": 0.0, "bf16_psnr_db": 51.3}
    (tmp_path / "render_throughput.log").write_text("render tiles: 100%\n" + json.dumps(render) + "\n")
    (tmp_path / "sample_throughput.log").write_text("ddim:  40%|####      | 20/50\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "smoke_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "gpu-smoke on NVIDIA H100 80GB HBM3, 81559 MiB; torch 2.11.0 cuda 13.0"
    assert any(line.startswith("stage1_train: step 5/5") and "0.91 s/step" in line for line in lines)
    batched = next(line for line in lines if line.startswith("render 4096^2 batched "))
    assert batched.split()[3:] == ["40", "MP/s", "10", "(one_tile)", "4x", "0.31", "2048", "MiB"], batched
    assert any(line.startswith("sample_throughput: FAILED rc=124 45 s") and "20/50" in line for line in lines)
