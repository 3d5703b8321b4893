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


@pytest.mark.parametrize("override, message", [
    ("serve.temperature=-1", "serve.temperature must be >= 0, got -1"),
    ("serve.temperature=.nan", "serve.temperature must be a finite number >= 0, got nan"),
    ("serve.token_budget=0", "serve.token_budget must be >= 1, got 0"),
    ("serve.n_slots=0", "serve.n_slots must be >= 1, got 0"),
    ("serve.max_queue=-1", "serve.max_queue must be >= 0, got -1"),
    ("serve.max_wait_steps=-2", "serve.max_wait_steps must be >= 0 or null, got -2"),
    ("serve.max_len=1", "serve.max_len must be >= 2, got 1"),
    ("serve.min_window=0", "serve.min_window must be >= 1, got 0"),
    ("serve.mixed_step=false", "unknown config key.*mixed_step"),
    ("serve.capacities=[2, 0]", r"serve.capacities must be integers >= 1, got \(2, 0\)"),
    ("serve.lookahead_steps=-1", "serve.lookahead_steps must be >= 0, got -1"),
    ("serve.link_bandwidth_bytes_per_s=0", "serve.link_bandwidth_bytes_per_s must be > 0, got 0.0"),
    ("serve.link_latency_s=-0.5", "serve.link_latency_s must be >= 0, got -0.5"),
    ("serve.latency_prompt_len=191", r"serve.latency_prompt_len must be an integer in \[1, 190\]"),
    ("serve.sweep_repeats=0", "serve.sweep_repeats must be >= 1, got 0"),
    ("serve.corpus_sep_id=-1", "serve.corpus_sep_id must be >= 0 or null, got -1"),
    ("serve.seed=-1", "serve.seed must be >= 0, got -1"),
    ("serve.token_buckets=[16]", "unknown config key.*token_buckets"),
    ("serve.workload.n_requests=0", "serve.workload.n_requests must be >= 1, got 0"),
    ("serve.workload.rate_per_s=-3", "serve.workload.rate_per_s must be > 0, got -3.0"),
    ("serve.workload.route_stay=1.5", r"serve.workload.route_stay must be in \[0, 1\], got 1.5"),
    ("serve.workload.prompt_sigma=0", "serve.workload.prompt_sigma must be > 0, got 0.0"),
    ("serve.workload.n_experts=0", "serve.workload.n_experts must be >= 1, got 0"),
    ("serve.workload.expert_zipf=-1", "serve.workload.expert_zipf must be >= 0, got -1.0"),
    ("serve.workload.seed=-4", "serve.workload.seed must be >= 0, got -4"),
])
def test_every_serve_key_is_validated_at_load(override, message):
    """A bad ``serve.*`` value fails ``config.load`` (before any work), one line naming the key."""
    from readme_jax.config import RunConfig, load

    with pytest.raises(ConfigError, match=message) as e:
        load(RunConfig, None, [override])
    assert "\n" not in str(e.value)


def test_engine_config_checks_its_keys():
    from readme_jax.config import EngineConfig

    assert EngineConfig(max_len=64, min_window=64).window(10) == 64  # one window: the full length
    with pytest.raises(ConfigError, match="engine.eos_id must be >= 0 or null, got -1"):
        EngineConfig(eos_id=-1)
    with pytest.raises(ConfigError, match=r"engine.max_len must be an integer >= 2, got 16.5"):
        EngineConfig(max_len=16.5)
    with pytest.raises(ConfigError, match=r"engine.token_budget must be an integer >= 1, got 2.5"):
        EngineConfig(token_budget=2.5)
