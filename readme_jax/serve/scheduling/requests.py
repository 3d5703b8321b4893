"""Serving requests, units of pending work, and the batches a scheduler hands to an engine.

A :class:`Request` carries its prompt's routes (one expert id per prompt token, computed by
the decoupled router when the request arrives). After every step the engine reports the
route of each newly sampled token, so every queued token's expert is known before the
backbone runs it. Read-ME routes a token to ONE expert for all layers, so one id per token.

Only the scheduler mutates a request's state fields; engines and simulators read them.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple, Sequence

import numpy as np

from readme_jax.errors import RequestError


class Kind(str, enum.Enum):
    """What a batch item asks the engine to do."""

    PREFILL = "prefill"  # run prompt tokens (a chunk, or all) into the request's KV slot; the last chunk samples token 1
    DECODE = "decode"  # run the last sampled token (1 token), sample the next one


class Status(str, enum.Enum):
    WAITING = "waiting"  # queued, no KV slot yet
    ADMITTED = "admitted"  # has a slot; its prefill is pending
    RUNNING = "running"  # prefilled; decoding
    FINISHED = "finished"
    REJECTED = "rejected"  # never served; ``reject_reason`` says why
    CANCELLED = "cancelled"  # aborted by its client (slot freed, nothing more generated)


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request.

    ``prompt_routes`` holds the expert of every prompt token; ``max_new_tokens`` bounds the
    output (the engine may finish earlier, e.g. on EOS). ``prompt_ids`` is optional: the
    scheduler never reads it, the engine does.
    """

    rid: int
    arrival_s: float
    prompt_routes: np.ndarray
    max_new_tokens: int
    prompt_ids: np.ndarray | None = None
    # --- state, written by the scheduler
    status: Status = Status.WAITING
    slot: int | None = None
    n_generated: int = 0
    prefilled: int = 0  # prompt tokens already run (chunked prefill)
    next_route: int | None = None  # expert of the sampled token the next decode will run
    admitted_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    reject_reason: str | None = None

    def __post_init__(self):
        routes = np.asarray(self.prompt_routes)
        if routes.ndim != 1 or routes.size == 0:
            raise RequestError(
                f"request {self.rid}: prompt_routes must be a non-empty 1-D array of expert ids, "
                f"got shape {routes.shape}"
            )
        if not np.issubdtype(routes.dtype, np.integer):
            raise RequestError(f"request {self.rid}: prompt_routes must be integers, got dtype {routes.dtype}")
        if routes.min() < 0:
            raise RequestError(f"request {self.rid}: prompt_routes has a negative expert id {int(routes.min())}")
        self.prompt_routes = routes.astype(np.int32)
        if isinstance(self.max_new_tokens, bool) or int(self.max_new_tokens) != self.max_new_tokens \
                or self.max_new_tokens < 1:
            raise RequestError(f"request {self.rid}: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not np.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise RequestError(f"request {self.rid}: arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        if self.prompt_ids is not None and len(self.prompt_ids) != len(routes):
            raise RequestError(
                f"request {self.rid}: prompt_ids has {len(self.prompt_ids)} tokens but prompt_routes has {len(routes)}"
            )

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_routes.shape[0])


def majority_expert(routes: np.ndarray) -> int:
    """The most frequent expert id in ``routes``; ties go to the smallest id."""
    counts = np.bincount(np.asarray(routes))
    return int(np.argmax(counts))  # argmax returns the first (smallest) maximum


@dataclasses.dataclass(frozen=True, eq=False)
class WorkItem:
    """Pending work of one request: its whole prefill, or the decode of one token.

    ``ready_step`` is the scheduler step from which the item could run; a batch at step s
    that takes it makes it wait ``s - ready_step`` steps. ``queue_expert`` is the expert it
    is queued under by expert-aware batching (a prefill: its majority expert).
    """

    request: Request
    kind: Kind
    n_tokens: int
    ready_step: int
    experts: frozenset
    queue_expert: int
    labels: tuple | None = None  # expert-blind control: the scheduler sees expert e as labels[e]

    @property
    def rid(self) -> int:
        return self.request.rid

    @staticmethod
    def prefill(request: Request, ready_step: int, n_tokens: int | None = None,
                labels: tuple | None = None) -> "WorkItem":
        """The prompt's remaining tokens (from ``request.prefilled``), or their first ``n_tokens`` (a chunk)."""
        r = request.prompt_routes[request.prefilled:]
        if n_tokens is not None:
            r = r[:n_tokens]
        if labels is not None:
            r = np.asarray(labels, np.int32)[r]
        return WorkItem(request, Kind.PREFILL, int(r.shape[0]), ready_step,
                        frozenset(int(e) for e in np.unique(r)), majority_expert(r), labels)

    def chunk(self, n_tokens: int) -> "WorkItem":
        """The first ``n_tokens`` of this prefill (chunked prefill)."""
        return WorkItem.prefill(self.request, self.ready_step, n_tokens, self.labels)

    def prefill_routes(self) -> np.ndarray:
        """A prefill's token experts, as the scheduler sees them (the blind control's labels applied)."""
        if self.kind is not Kind.PREFILL:
            raise RequestError(f"request {self.rid}: prefill_routes of a {self.kind.value} item")
        q = self.request
        r = q.prompt_routes[q.prefilled:q.prefilled + self.n_tokens]
        return r if self.labels is None else np.asarray(self.labels, np.int32)[r]

    @property
    def head_expert(self) -> int:
        """The expert of the item's first token (a decode: its one token's)."""
        return int(self.prefill_routes()[0]) if self.kind is Kind.PREFILL else self.queue_expert

    def run_length(self, experts) -> int:
        """How many leading tokens of this item have their expert in ``experts`` (0: not even the first)."""
        r = self.prefill_routes() if self.kind is Kind.PREFILL else np.array([self.queue_expert])
        out = ~np.isin(r, np.fromiter(experts, np.int64))
        return int(np.argmax(out)) if out.any() else int(r.shape[0])

    @staticmethod
    def decode(request: Request, route: int, ready_step: int, labels: tuple | None = None) -> "WorkItem":
        e = int(route) if labels is None else int(labels[int(route)])
        return WorkItem(request, Kind.DECODE, 1, ready_step, frozenset((e,)), e, labels)


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One entry of a batch: run ``n_tokens`` of ``kind`` for ``request`` in KV slot ``slot``."""

    request: Request
    kind: Kind
    n_tokens: int
    slot: int
    wait_steps: int  # steps this work waited after it became ready
    experts: frozenset

    @property
    def rid(self) -> int:
        return self.request.rid


@dataclasses.dataclass(frozen=True)
class Batch:
    """The work of one engine step (prefills and decodes together)."""

    step: int
    items: tuple[BatchItem, ...]

    @property
    def n_tokens(self) -> int:
        return sum(it.n_tokens for it in self.items)

    @property
    def experts(self) -> frozenset:
        """Unique experts the step needs (every token of every item)."""
        out: set = set()
        for it in self.items:
            out |= it.experts
        return frozenset(out)

    @property
    def prefills(self) -> list[BatchItem]:
        return [it for it in self.items if it.kind is Kind.PREFILL]

    @property
    def decodes(self) -> list[BatchItem]:
        return [it for it in self.items if it.kind is Kind.DECODE]

    def __len__(self) -> int:
        return len(self.items)


def unique_experts(items: Sequence[WorkItem | BatchItem]) -> frozenset:
    out: set = set()
    for it in items:
        out |= it.experts
    return frozenset(out)


class StepOutput(NamedTuple):
    """What one engine step returns (serve/engine/)."""

    next_routes: dict  # rid -> expert of the token just sampled, None when the request finished
    tokens: dict  # rid -> the token just sampled
    compute_s: float  # measured: the step's call(s), host layout + device + reading back the tokens
    stall_s: float = 0.0  # measured: waiting for expert copies (expert store only)
    experts: frozenset = frozenset()  # the true experts the step's calls ran (union over calls)
