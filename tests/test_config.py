"""latentcast.config: defaults < YAML < environment, precise errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from latentcast.config import ConfigError, describe_config, load_config


@dataclass
class Server:
    address: str = "127.0.0.1:50051"  # where to connect
    keepalive_s: float = 20.0  # keepalive ping interval


@dataclass
class Demo:
    source: str = "vtest.avi"  # video
    labels: list[str] = field(default_factory=lambda: ["person"])  # task labels
    rate_point: int = 2  # codec rate point
    tls: bool = False  # use TLS
    token: str | None = None  # bearer token
    server: Server = field(default_factory=Server)  # connection


def test_precedence_defaults_file_env(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rate_point: 1\nlabels: [person, car]\nserver:\n  address: host:1\n")
    env = {"DEMO__RATE_POINT": "3", "DEMO__SERVER__KEEPALIVE_S": "5", "DEMO__TLS": "yes", "DEMO__LABELS": "bus, car"}
    cfg = load_config(Demo, p, env_prefix="DEMO", env=env)
    assert cfg.rate_point == 3 and cfg.tls is True and cfg.labels == ["bus", "car"]
    assert cfg.server.address == "host:1" and cfg.server.keepalive_s == 5.0
    assert cfg.source == "vtest.avi" and cfg.token is None
    assert load_config(Demo, None, env_prefix="DEMO", env={}) == Demo()


def test_errors_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rate_pont: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'rate_pont' \(valid: source, labels, rate_point"):
        load_config(Demo, p, env_prefix="DEMO", env={})
    p.write_text("server: {adress: x}\n")
    with pytest.raises(ConfigError, match="in server"):
        load_config(Demo, p, env_prefix="DEMO", env={})
    with pytest.raises(ConfigError, match="DEMO__RATE_POINT: 'x' is not an integer"):
        load_config(Demo, None, env_prefix="DEMO", env={"DEMO__RATE_POINT": "x"})
    with pytest.raises(ConfigError, match="DEMO__TLS: 'maybe' is not a boolean"):
        load_config(Demo, None, env_prefix="DEMO", env={"DEMO__TLS": "maybe"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, tmp_path / "missing.yaml", env_prefix="DEMO", env={})


def test_describe_lists_every_leaf_with_its_comment():
    rows = describe_config(Demo, "DEMO")
    assert ("server.address", "DEMO__SERVER__ADDRESS", "127.0.0.1:50051", "where to connect") in rows
    assert len(rows) == 7 and all(r[3] for r in rows)


@pytest.mark.parametrize("side", ["edge", "cloud", "cloud/dashboard"])
def test_example_configs_are_complete_and_load_to_the_defaults(side):
    """edge/edge.yaml, cloud/cloud.yaml and cloud/dashboard.yaml document every option (regenerate them with
    latentcast.config.example_yaml when a field changes) and load to the defaults."""
    import importlib
    from pathlib import Path

    from latentcast.config import example_yaml

    mod = importlib.import_module(f"latentcast.{side.replace('/', '.')}.config")
    cls = {"edge": "EdgeConfig", "cloud": "CloudConfig", "cloud/dashboard": "DashboardConfig"}[side]
    path = Path(__file__).resolve().parent.parent / {"edge": "edge/edge.yaml", "cloud": "cloud/cloud.yaml",
                                                     "cloud/dashboard": "cloud/dashboard.yaml"}[side]
    text = path.read_text()
    title = text.splitlines()[0].removeprefix("# ")
    assert text == example_yaml(getattr(mod, cls), mod.ENV_PREFIX, title=title), f"regenerate {path.name}"
    assert all(r[3] for r in describe_config(getattr(mod, cls), mod.ENV_PREFIX)), "a field has no comment"
    assert load_config(getattr(mod, cls), path, env_prefix=mod.ENV_PREFIX, env={}) == getattr(mod, cls)()


def test_portable_path_hides_the_machine_layout(tmp_path, monkeypatch):
    from latentcast.shared import portable_path

    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "v.avi").write_bytes(b"")
    monkeypatch.setenv("LATENTCAST_SHARED", str(shared))
    monkeypatch.chdir(tmp_path)
    assert portable_path(shared / "data" / "v.avi") == "$LATENTCAST_SHARED/data/v.avi"
    assert portable_path(tmp_path / "out" / "s.json") == "out/s.json"
    assert portable_path("rtsp://cam/1") == "rtsp://cam/1"


def test_cloud_config_loads_without_torch():
    """`latentcast cloud --help` and config checks stay light: the composer kinds come from a numpy-only module."""
    import subprocess
    import sys

    code = "import sys, latentcast.cloud.config as c; print('torch' in sys.modules, c.COMPOSER_KINDS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False"), out


def test_cloud_workers_auto_follow_the_threads_per_frame(monkeypatch):
    """pipeline.workers 0 (the default): one worker per torch_threads cores, one when the libraries take every
    core (torch_threads 0); a number is taken as given; a negative one is an error naming the key."""
    import os

    from latentcast.cloud.config import PipelineConfig

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert PipelineConfig().worker_count == 1
    assert PipelineConfig(torch_threads=1).worker_count == 8
    assert PipelineConfig(torch_threads=3).worker_count == 2
    assert PipelineConfig(torch_threads=16).worker_count == 1
    assert PipelineConfig(workers=3, torch_threads=1).worker_count == 3
    with pytest.raises(ValueError, match="pipeline.workers must be >= 0"):
        PipelineConfig(workers=-1)


def test_edge_analysis_precision_is_checked():
    from latentcast.edge.config import CodecConfig

    assert CodecConfig().analysis == "int8"
    assert CodecConfig(analysis="float32").analysis == "float32"
    with pytest.raises(ValueError, match="codec.analysis 'fp16' is not one of int8, float32"):
        CodecConfig(analysis="fp16")


@pytest.mark.parametrize("value,message", [
    ("-1", r"codec.rdoq -1.0 out of range: a number >= 0"),
    ("nan", r"codec.rdoq nan out of range"),
    ("1e400", r"codec.rdoq inf out of range"),
    ("abc", r"LATENTCAST_EDGE__CODEC__RDOQ: 'abc' is not a number"),
])
def test_edge_rdoq_is_checked_wherever_it_comes_from(value, message, tmp_path):
    """codec.rdoq from the environment or a file: a clear error for anything but a finite number >= 0 or unset."""
    from latentcast.edge.config import ENV_PREFIX, CodecConfig, EdgeConfig

    assert CodecConfig().rdoq is None and CodecConfig(rdoq=0).rdoq == 0.0  # unset: the codec's own λ
    unset = load_config(EdgeConfig, None, env_prefix=ENV_PREFIX, env={"LATENTCAST_EDGE__CODEC__RDOQ": ""})
    assert unset.codec.rdoq is None
    with pytest.raises(ConfigError, match=message):
        load_config(EdgeConfig, None, env_prefix=ENV_PREFIX, env={"LATENTCAST_EDGE__CODEC__RDOQ": value})
    f = tmp_path / "edge.yaml"
    f.write_text("codec:\n  rdoq: -0.5\n")
    with pytest.raises(ConfigError, match=r"codec.rdoq -0.5 out of range"):
        load_config(EdgeConfig, f, env_prefix=ENV_PREFIX, env={})
