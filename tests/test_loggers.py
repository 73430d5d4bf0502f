"""report_to backends: jsonl always, tensorboard when asked, a clear error for unknown or missing ones."""

from __future__ import annotations

import json

import pytest

from omniopd.config import build_config
from omniopd.errors import ConfigError
from omniopd.training.loggers import MetricLoggers


def test_jsonl_and_tensorboard_receive_the_same_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricLoggers(tmp_path, ["jsonl", "tensorboard"], {}, "t")
    log.log(1, {"loss/total": 2.5, "audit/k_sem_mean": 0.75})
    log.log(2, {"loss/total": 1.5, "audit/k_sem_mean": 0.5})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/total"] for r in rows] == [2.5, 1.5]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("audit/k_sem_mean")] == [(1, 0.75), (2, 0.5)]


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to"):
        build_config({"report_to": ["mlflow"]})
