"""What every training entry point does: parse Hydra config into dataclasses, join the process
group, prepare the run directory, train, and shut down cleanly."""
from __future__ import annotations

import importlib
import logging
import signal
import sys
from pathlib import Path

import yaml

from infd.config import ConfigError, from_mapping, to_mapping
from infd.versions import untested_versions
from train.dist import init_distributed, on_main, shutdown, strip_local_rank_arg
from train.logger import Logger, redact
from train.preflight import PreflightError, run_preflight
from infd.utils.signals import PreemptionFlag
from train.stop_status import StopReport, clear_report, signal_exit_status, under_elastic_agent

log = logging.getLogger("train")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def hydra_main(config_name: str, cls, run) -> None:
    """Compose conf/<config_name>.yaml over the dataclass defaults, validate, call run(cfg, raw)."""
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cls, run = _importable(cls), _importable(run)
    ConfigStore.instance().store(name=f"{config_name}_schema", node=to_mapping(cls()))
    # Hydra parses sys.argv itself; the deepspeed launcher's --local_rank=N would stop it.
    sys.argv = strip_local_rank_arg(sys.argv)

    statuses = []

    @hydra.main(config_path=CONF_DIR, config_name=config_name, version_base=None)
    def _main(dcfg) -> None:
        raw = OmegaConf.to_container(dcfg, resolve=True)
        try:
            cfg = from_mapping(cls, raw)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        statuses.append(run(cfg, raw))

    _main()
    sys.exit(max(statuses, default=0))  # Hydra drops the task's return value


def _importable(obj):
    """The copy of `obj` in its importable module. Under `python -m train.x` the entry point's
    objects live in __main__, which a submitit job cannot import: cloudpickle would copy them by
    value, without the names their type hints use."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if obj.__module__ != "__main__" or spec is None:
        return obj
    return getattr(importlib.import_module(spec.name), obj.__qualname__)


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_location(cfg) -> tuple[Path, str, str | None]:
    """(directory, W&B name, W&B group) of this job. A job of a sweep (-m) gets its own directory
    <root>/<name>/<job number> and the sweep's name as its group; the job number comes from the
    launcher, so every rank of one job resolves the same directory."""
    from hydra.core.hydra_config import HydraConfig

    if in_sweep():
        job = HydraConfig.get().job
        return Path(HydraConfig.get().runtime.output_dir), f"{cfg.run.name}/{job.num}", cfg.run.name
    return Path(cfg.run.root) / cfg.run.name, cfg.run.name, None


def run_stage(cfg, raw: dict, make_task, make_data) -> int:
    from train.loop import train

    info = init_distributed()
    preempt, clean = PreemptionFlag(), False
    if info.local_rank == 0:
        clear_report(cfg.run.stop_report)
    try:
        run_dir, run_name, group = run_location(cfg)
        try:
            run_preflight(cfg, info, run_dir)
        except PreflightError as err:  # raised on every rank alike: a clean exit
            on_main(info, print, err, file=sys.stderr, flush=True)
            clean = True
            sys.exit(2)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(redact(to_mapping(cfg)), sort_keys=False))
        on_main(info, print, f"run directory: {run_dir.resolve()} ({info.world_size} ranks, {info.device})",
                flush=True)
        for message in untested_versions() if info.is_main else []:
            log.warning("%s", message)
        task = make_task(info)
        data = make_data(info)
        logger = Logger(cfg.logger, info, run_dir, run_name, to_mapping(cfg), group=group,
                        max_steps=cfg.trainer.max_steps)
        try:
            end = train(task, data, cfg.trainer, info, run_dir, logger, cfg.deepspeed.grad_accum, preempt)
        finally:
            logger.finish()
        status = report_end(end, cfg.run.stop_report, info)
        clean = True
    finally:
        shutdown(keep_group=in_sweep(), clean=clean)
    preempt.forward()  # e.g. submitit's requeue on its time-limit signal, now that the checkpoint is saved
    return status


def report_end(end, stop_report: str | None, info) -> int:
    """Print how the run ended; for a stop signal, write the node's stop report and return the exit
    status (train/stop_status.py): 128 + the signal, or 0 under an elastic agent or in a sweep."""
    if end.stop_signal is None:
        on_main(info, print, f"finished at step {end.step}", flush=True)
        return 0
    name = signal.Signals(end.stop_signal).name
    if end.checkpoint is None:
        on_main(info, print, f"stopped by {name} before the first step: nothing to save", flush=True)
    else:
        on_main(info, print, f"stopped at step {end.step} by {name}: checkpoint saved; the same command "
                "resumes from it", flush=True)
        if stop_report and info.local_rank == 0:
            StopReport(name, end.step, str(end.checkpoint.resolve())).write(stop_report)
    return 0 if under_elastic_agent() or in_sweep() else signal_exit_status(end.stop_signal)
