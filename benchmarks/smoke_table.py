"""The one table of `make gpu-smoke` (benchmarks/gpu_smoke.sh), read from the folder of its logs.

Columns: figure, value, baseline, ratio (baseline over value for times, value over baseline for rates:
> 1 means the figure beats its baseline), MFU (a fraction of the device's measured peak) and peak memory.
A part that failed or ran out of time shows its status and the last line of its log instead of figures.

    python benchmarks/smoke_table.py LOG_FOLDER
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

Row = tuple[str, str, str, str, str, str]


def last_json(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines() if log.exists() else []):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def fmt(x, unit: str = "") -> str:
    return "" if x is None else f"{x:.4g}{unit}"


def ratio(baseline, value, time: bool = True) -> str:
    if not baseline or not value:
        return ""
    return f"{(baseline / value if time else value / baseline):.3g}x"


def training(name: str, log: Path) -> list[Row]:
    """The last `N s/step` a training run logged (its steps include the first, compiling ones)."""
    steps = re.findall(r"step (\d+)/(\d+) \| [\d.]+ samples/s \| ([\d.]+) s/step", log.read_text(errors="replace"))
    if not steps:
        return []
    step, total, seconds = steps[-1]
    return [(f"{name}: step {step}/{total} (bf16, ZeRO-2)", f"{float(seconds):.3g} s/step", "", "", "", "")]


def train_step(result: dict) -> list[Row]:
    """Each row against its stage's plain row of the same network (ours; paper_unet; sd_unet)."""
    rows = []
    for stage, rows_of_stage in (("stage1", result["stage1"]), ("stage2", result["stage2"])):
        for name, r in rows_of_stage.items():
            base = "ours" if stage == "stage1" else name.split("+")[0]
            ref = rows_of_stage[base]["s_per_step"]
            rows.append((f"train_step {stage} {name}", f"{r['s_per_step']:.4g} s/step",
                         f"{ref:.4g} s ({base})", ratio(ref, r["s_per_step"]), fmt(r["mfu"]),
                         fmt(r.get("peak_mem_mib"), " MiB")))
    return rows


def render(result: dict) -> list[Row]:
    base = result["rows"]["one_tile"]["megapixels_per_s"]
    rows = [(f"render {result['size']}^2 {name}", f"{r['megapixels_per_s']:.4g} MP/s", f"{base:.4g} (one_tile)",
             ratio(base, r["megapixels_per_s"], time=False), fmt(r["mfu"]), fmt(r["peak_mem_mib"], " MiB"))
            for name, r in result["rows"].items()]
    rows.append(("render batched vs one tile: max abs diff", f"{result['batched_max_abs_diff']:.3g}", "<= 1e-5",
                 "", "", ""))
    rows.append(("render bf16 vs fp32: PSNR (peak 2)", f"{result['bf16_psnr_db']:.4g} dB", ">= 40 dB", "", "", ""))
    return rows


def sample(result: dict) -> list[Row]:
    rows = [(f"sample: DDIM step (cfg {result['cfg_scale']})", f"{result['s_per_step']:.4g} s", "", "",
             fmt(result["sampler_mfu"]), ""),
            ("sample: decode", f"{result['decode_s']:.4g} s", "", "", fmt(result["decode_mfu"]), "")]
    for size, r in result["render"].items():
        rows.append((f"sample: render {size}^2", f"{r['megapixels_per_s']:.4g} MP/s", "", "", fmt(r["mfu"]), ""))
    for size, seconds in result["end_to_end_s_at_50_steps"].items():
        rows.append((f"sample: end to end {size}^2, 50 steps", f"{seconds:.4g} s", "", "", "", ""))
    return rows


def checkpoint(result: dict) -> list[Row]:
    rows = []
    for name, r in result["results"].items():
        rows.append((f"checkpoint {name}: stop save ({r['bytes_per_param']:.3g} B/param)",
                     f"{r['stop_save_s']:.4g} s", f"{r['disk_s']:.4g} s (disk)",
                     f"{r['stop_vs_disk_ratio']:.3g} (<= 1.3)", "", ""))
        rows.append((f"checkpoint {name}: periodic slowdown", f"{r['periodic_slowdown_ratio']:.3g}",
                     f"{r['disk_writer_slowdown_ratio']:.3g} (disk writer)" if "disk_writer_slowdown_ratio" in r
                     else "", "(<= 0.2)", "", ""))
    return rows


READERS = {"train_step": train_step, "render_throughput": render, "sample_throughput": sample,
           "checkpoint_save": checkpoint}


def table(logs: Path) -> list[Row]:
    status = dict(line.split(" ", 1) for line in (logs / "status.txt").read_text().splitlines() if " " in line)
    rows: list[Row] = []
    for name, state in status.items():
        log = logs / f"{name}.log"
        if not state.startswith("rc=0"):
            tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1] if log.exists() else ""
            rows.append((f"{name}: FAILED {state}", tail[:80], "", "", "", ""))
        elif name.endswith("_train"):
            rows += training(name, log)
        elif name in READERS and (result := last_json(log)) is not None:
            rows += READERS[name](result)
    return rows


def main() -> None:
    logs = Path(sys.argv[1])
    device = (logs / "device.txt").read_text().strip().replace("\n", "; ") if (logs / "device.txt").exists() else ""
    header: Row = ("figure", "value", "baseline", "ratio", "MFU", "peak memory")
    rows = [header, *table(logs)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(f"gpu-smoke on {device}")
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    main()
