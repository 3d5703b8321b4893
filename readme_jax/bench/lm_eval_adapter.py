"""lm-evaluation-harness model ``readme-jax``: a Read-ME run (or export), its dense source or its pruned twin.

    python -m readme_jax.bench.lm_eval_adapter --model readme-jax \\
        --model_args path=runs/main,model=readme,batch_size=8,max_length=512 \\
        --include_path TASK_DIR --tasks readme_mc
    readme-jax lm-eval ...same arguments...

lm_eval (0.4) finds models only in its own registry (no entry points), so the stock ``lm_eval``
command does not know ``readme-jax``: both commands above import this module (which registers the
model) and then run lm_eval's own command line with the arguments given.

model_args: ``path`` (a run folder, its ``train/final`` or an export); ``model``: ``readme`` (the
Read-ME model; routes from its own router), ``dense`` (the run's dense source model) or ``pruned``
(the run's tuned pruned dense baseline, ``baseline/pruned_tuned``); ``batch_size`` (default 8);
``max_length`` (tokens per scored row, default min(2048, the model's context)); ``max_gen_toks``
(default 256). The tokenizer is the model's own (``load_tokenizer_for``). Generation is greedy,
through the project's engine (:class:`readme_jax.serve.api.llm.LLM`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm_eval's own models stay registered beside ours)
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from readme_jax import config as config_mod
from readme_jax.checkpoints import load_model, restore_params
from readme_jax.checkpoints.readme_io import dense_source, load_readme, load_tokenizer_for, run_source
from readme_jax.config import EngineConfig, ModelConfig
from readme_jax.errors import CheckpointError, ConfigError
from readme_jax.eval.loglik import score_rows
from readme_jax.eval.mc_task import separator_id
from readme_jax.model.readme_model import DenseModel
from readme_jax.serve.api.llm import LLM

MODEL_NAME = "readme-jax"
MODEL_TARGET = "readme_jax.bench.lm_eval_adapter:ReadmeJaxLM"  # the registry imports it by name (also under -m)
KINDS = ("readme", "dense", "pruned")


def open_eval_model(path, kind: str = "readme"):
    """``(model, tokenizer)``: the Read-ME model at ``path``, the run's dense source or its tuned pruned twin."""
    if kind not in KINDS:
        raise ConfigError(f"model_args model must be one of {KINDS}, got {kind!r}")
    if not Path(path).exists():
        raise CheckpointError(f"no model at {path}: the path does not exist")
    tok = load_tokenizer_for(path)
    if kind == "readme":
        return load_readme(path), tok
    if kind == "dense":
        llama, _ = load_model(dense_source(path))
        return DenseModel.from_module(llama), tok
    run = run_source(path)
    pruned = None if run is None else run[0] / "baseline" / "pruned_tuned"
    if pruned is None or not pruned.is_dir():
        raise CheckpointError(f"{path}: model=pruned needs a run folder whose baseline stage wrote "
                              f"baseline/pruned_tuned ({pruned} not found)")
    params, meta = restore_params(pruned)
    cfg = config_mod.from_dict(ModelConfig, meta["model_config"], prefix="model_config.")
    return DenseModel(params, cfg).validate(str(pruned)), tok


class ReadmeJaxLM(TemplateLM):
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm_eval's own options (it always passes ``batch_size``, default 1)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(self, path: str, model: str = "readme", batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, **_ignored):  # device, max_batch_size: lm_eval passes them to every model
        super().__init__()
        self.model, self.tok = open_eval_model(path, model)
        self.kind = model
        ctx = (self.model.backbone_cfg if self.model.is_moe else self.model.cfg).max_seq_len
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else min(2048, ctx)
        self.max_gen_toks = int(max_gen_toks)
        if not 2 <= self.max_length <= ctx or self.batch_size < 1:
            raise ConfigError(f"need 2 <= max_length <= {ctx} and batch_size >= 1, got {self.max_length}, "
                              f"{self.batch_size}")
        self._llm = None

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return separator_id(self.tok)  # the document separator of the project's token streams

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_bos=add_special_tokens)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special=True)

    @property
    def tokenizer_name(self) -> str:
        return f"readme-jax:{self.tok.source}"

    # ------------------------------------------------------------------ scoring

    def _score(self, rows, disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
        with tqdm(total=len(rows), desc=f"readme-jax {desc}", disable=disable_tqdm) as bar:
            return score_rows(self.model, rows, batch_size=self.batch_size, max_length=self.max_length,
                              pad_id=self.eot_token_id, progress=bar.update)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = self._score([(list(ctx) + list(cont), len(cont)) for _, ctx, cont in requests], disable_tqdm,
                          "loglikelihood")
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood over disjoint windows of ``max_length`` tokens (each window
        conditions on the tokens before it inside the window; the first on the end-of-text token)."""
        rows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.tok_encode(text), self.eot_token_id, self.max_length, 1))
            for ctx, cont in windows:
                rows.append((ctx + cont, len(cont)))
                owner.append(i)
        scores = self._score(rows, disable_tqdm, "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def _engine(self) -> LLM:
        if self._llm is None:
            cfg = EngineConfig(n_slots=self.batch_size, max_len=self.max_length, eos_id=self.tok.eos_id)
            self._llm = LLM(self.model, self.tok, cfg, policy="fcfs", max_queue=max(64, self.batch_size))
        return self._llm

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first ``until`` string (default: the end-of-text token's
        text); requests with the same options go through the engine ``batch_size`` at a time."""
        jobs = {}
        for i, req in enumerate(requests):
            context, kw = req.args[0], dict(req.args[1])
            until = kw.get("until") or [self.tok.decode([self.eot_token_id])]
            until = (until,) if isinstance(until, str) else tuple(until)
            n_new = max(1, min(int(kw.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            ids = self.tok_encode(context)[-(self.max_length - n_new):] or [self.eot_token_id]
            jobs.setdefault((until, n_new), []).append((i, ids))
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="readme-jax generate_until", disable=disable_tqdm) as bar:
            for (until, n_new), items in jobs.items():
                for s in range(0, len(items), self.batch_size):
                    chunk = items[s:s + self.batch_size]
                    done = self._engine().generate([ids for _, ids in chunk], max_tokens=n_new, stop=list(until))
                    for (i, _), c in zip(chunk, done):
                        out[i] = c.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
                    bar.update(len(chunk))
        return out


def register() -> None:
    """Make ``readme-jax`` known to lm_eval's model registry (idempotent; done on import)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


register()


def main(argv=None) -> None:
    """lm_eval's command line with ``readme-jax`` registered (same arguments as ``lm_eval``)."""
    register()
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
