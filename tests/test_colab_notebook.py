"""colab/readme_jax_tpu.ipynb and its preset, checked on the CPU without running anything heavy: the code
cells compile, the run cell's preset loads (impl pallas, step checkpoints) with output on Google Drive,
no cell installs jax unpinned, the install cell stops clearly without a package source, and the time
estimate quotes the preset's token counts. Executing the cells on the tiny run: tests/test_workflow.py."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from readme_jax import cli

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "readme_jax_tpu.ipynb"
JAX_DISTS = {"jax", "jaxlib", "libtpu", "libtpu-nightly"}


def _cells() -> list[dict]:
    try:
        import nbformat
    except ImportError:
        nb = json.loads(NOTEBOOK.read_text())
    else:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        nbformat.validate(nb)
    out = []
    for c in nb["cells"]:
        src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        out.append({"type": c["cell_type"], "tags": c.get("metadata", {}).get("tags", []), "source": src})
    return out


def _code(tag: str | None = None) -> list[str]:
    return [c["source"] for c in _cells() if c["type"] == "code" and (tag is None or tag in c["tags"])]


def _as_python(src: str) -> str:
    """IPython's ``!cmd`` / ``%magic`` lines replaced by ``pass`` at the same indentation."""
    return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", line) for line in src.splitlines())


def _shell_lines() -> list[str]:
    return [line.strip()[1:] for src in _code() for line in src.splitlines() if line.strip().startswith("!")]


def _params() -> dict:
    (src,) = _code("parameters")
    ns: dict = {}
    exec(compile(src, "<parameters cell>", "exec"), ns)
    return ns


def _run_argv() -> list[str]:
    """The run cell's ``!readme-jax run ...`` as argv, ``{NAME}``s filled from the parameters cell."""
    (line,) = [s for s in _shell_lines() if s.startswith("readme-jax run")]
    return shlex.split(line.split(" || ")[0].format_map(_params()))[1:]


def test_every_code_cell_compiles():
    code = _code()
    assert len(code) >= 6
    for i, src in enumerate(code):
        compile(_as_python(src), f"<code cell {i}>", "exec")


def test_run_cell_preset_loads_with_pallas_checkpoints_and_output_on_drive():
    argv = _run_argv()
    name = argv[argv.index("--config") + 1]
    assert name == "colab_tpu" and (ROOT / "configs" / f"{name}.yaml").is_file()
    cfg = cli.load_run_config(cli.build_parser().parse_args(argv))  # validation only: nothing runs
    assert cfg.impl == "pallas" and cfg.dtype == "bfloat16" and cfg.model == "embedded"
    assert 0 < cfg.train.checkpoint_every < max(cfg.train.experts.steps, cfg.train.router.steps)
    assert cfg.output_dir.startswith("/content/drive/MyDrive/"), cfg.output_dir


def test_colab_preset_validates_through_the_command_line():
    """`readme-jax run --config colab_tpu` as typed, loaded (not run)."""
    cfg = cli.load_run_config(cli.build_parser().parse_args(["run", "--config", "colab_tpu"]))
    assert cfg.impl == "pallas" and cfg.train.checkpoint_every == 50


def test_no_cell_installs_jax_unpinned():
    pip_lines = [s for s in _shell_lines() if re.search(r"\bpip3? install\b", s)]
    assert pip_lines
    for line in pip_lines:
        args = shlex.split(line.replace("{", "").replace("}", ""))
        reqs = [a for a in args[args.index("install") + 1:] if not a.startswith("-")]
        for r in reqs:
            dist = re.split(r"[\[<>=!~ ;@]", r, maxsplit=1)[0].lower()
            assert dist not in JAX_DISTS or "==" in r, f"unpinned {r!r} in: !{line}"
        if "--no-deps" not in args:  # its dependencies could pull a jax: the constraints file pins it
            assert "-c" in args or "--constraint" in args, line
            path = args[args.index("-c" if "-c" in args else "--constraint") + 1]
            (install,) = [s for s in _code("colab-only") if path in s and "write_text" in s]
            assert 'f"{d}=={v}" for d in ("jax", "jaxlib"' in install


def test_install_cell_stops_clearly_without_a_repo_url():
    (src,) = [s for s in _code("colab-only") if "REPO_URL" in s]
    src = re.sub(r'^INSTALL_FROM = .*$', 'INSTALL_FROM = "git"', src, flags=re.M)
    src = re.sub(r'^REPO_URL = .*$', 'REPO_URL = "  "', src, flags=re.M)
    with pytest.raises(ValueError, match="REPO_URL is empty: set REPO_URL to a git URL"):
        exec(compile(_as_python(src), "<install cell>", "exec"), {})


def test_time_estimate_quotes_the_preset():
    cfg = cli.load_run_config(cli.build_parser().parse_args(["run", "--config", "colab_tpu"]))
    (text,) = [c["source"] for c in _cells() if c["type"] == "markdown" and "How long" in c["source"]]
    t = cfg.train
    for s in (t.experts, t.router):
        assert f"{t.rounds} rounds x {s.steps} steps x {s.batch_size} x {s.seq_len}" in text
        assert f"{t.rounds * s.steps * s.batch_size * s.seq_len:,}" in text
    assert "not a measurement" in text and "TFLOP/s sustained" in text


def test_wheel_ships_the_presets_and_the_cli_finds_them(tmp_path):
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert data_files == {"share/readme-jax/configs": ["configs/*.yaml"]}
    site = tmp_path / "lib" / "site-packages"
    (tmp_path / "share" / "readme-jax" / "configs").mkdir(parents=True)

    class Dist:
        def locate_file(self, p):
            return site / p

    files = []
    for rel in ("readme_jax/cli.py", "../../share/readme-jax/configs/colab_tpu.yaml"):
        p = importlib.metadata.PackagePath(rel)
        p.dist = Dist()
        files.append(p)
    assert cli.installed_config_dir(files) == tmp_path / "share" / "readme-jax" / "configs"
    assert cli.installed_config_dir(files[:1]) is None and cli.installed_config_dir(None) is None
