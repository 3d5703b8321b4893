import dataclasses

import pytest

from readme_jax import config
from readme_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: int = 3
    lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    tags: tuple[str, ...] = ()
    path: str | None = None


def test_load_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  steps: 5\ntags: [x, y]\n")
    cfg = config.load(Outer, p, ["inner.lr=0.5", "path=/tmp/q"])
    assert cfg == Outer(name="a", inner=Inner(steps=5, lr=0.5), tags=("x", "y"), path="/tmp/q")


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match=r"inner\.stepz.*c\.yaml"):
        config.load(Outer, p)


def test_bad_types_and_missing():
    with pytest.raises(ConfigError, match=r"inner\.steps: expected an integer"):
        config.load(Outer, None, ["name=a", "inner.steps=1.5"])
    with pytest.raises(ConfigError, match="missing required config key"):
        config.load(Outer, None, [])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.load(Outer, None, ["name"])
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(Outer, "/nonexistent/x.yaml")


def test_model_config_validation():
    with pytest.raises(ConfigError, match="multiple of model.n_kv_heads"):
        config.tiny_model_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="d_model must be > 0"):
        config.tiny_model_config(d_model=0)


def test_a_partial_section_keeps_the_fields_own_defaults(tmp_path):
    """``train.experts`` defaults to lr 5e-5 and batch 128 (not StageConfig's class defaults), and a
    partial ``serve.workload`` fills in from BENCH_WORKLOAD, in YAML and in overrides alike."""
    from readme_jax.config import BENCH_WORKLOAD, RunConfig, ServeBenchConfig, TrainConfig, load

    p = tmp_path / "c.yaml"
    p.write_text("train: {experts: {steps: 3}}\nserve: {workload: {n_requests: 5}}\n")
    cfg = load(RunConfig, p, ["train.router.steps=4"])
    assert cfg.train.experts.steps == 3 and cfg.train.experts.lr == TrainConfig().experts.lr == 5e-5
    assert cfg.train.experts.batch_size == 128 and cfg.train.router.steps == 4 and cfg.train.router.lr == 5e-4
    assert cfg.serve.workload.n_requests == 5 and cfg.serve.workload.prompt_max == BENCH_WORKLOAD.prompt_max
    assert isinstance(cfg.serve, ServeBenchConfig)
    with pytest.raises(ConfigError, match="unknown config key.*serve.nope"):
        load(RunConfig, None, ["serve.nope=1"])
    with pytest.raises(ConfigError, match=r"serve.policies\[0\] must be one of"):
        load(RunConfig, None, ["serve.policies=[sjf]"])
