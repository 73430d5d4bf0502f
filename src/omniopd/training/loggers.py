"""Where step metrics go besides the progress bar: ``report_to: [jsonl, tensorboard, wandb, trackio]``.

``metrics.jsonl`` in the run directory is always written (the report and ``compare`` read it); the
others are optional extras, imported only when named, and a missing package is a one-line config
error naming what to install. wandb and trackio get the resolved config at init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from omniopd.errors import ConfigError

BACKENDS = ("jsonl", "tensorboard", "wandb", "trackio")


class MetricLoggers:
    def __init__(self, out_dir: Path, report_to: Sequence[str], config: dict, run_name: str):
        unknown = [b for b in report_to if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"report_to: unknown backend {unknown[0]!r}; use any of {', '.join(BACKENDS)}")
        self.out_dir = out_dir
        self._tb = self._wandb = self._trackio = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "report_to: tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to: wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project="omniopd", name=run_name, config=config, dir=str(out_dir), resume="allow")
        if "trackio" in report_to:
            try:
                import trackio
            except ImportError:
                raise ConfigError("report_to: trackio needs the trackio package: pip install trackio") from None
            self._trackio = trackio
            trackio.init(project="omniopd", name=run_name, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._trackio is not None:
            self._trackio.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()
