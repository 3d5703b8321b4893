"""Continuous-batching schedulers: Read-ME expert-aware batching and three baselines.

The engine contract (see docs/SERVING.md)::

    sched.add(request)                  # route ids of the prompt already computed
    batch = sched.next_batch()          # one step: prefills + decodes within the token budget
    ... engine runs the batch, samples one token per item, routes each sampled token ...
    sched.on_step_done(batch, next_routes, now_s)   # rid -> expert of its new token (None: finished)

Shared by every policy (so they differ only in which ready work they pick):

* Chunked prefill (``chunked_prefill``, for the one-call engine): a prefill that does not fit
  the room left in a step runs its first tokens (a chunk; the step's budget is then full) and
  the rest is ready again next step; only the last chunk samples a token. Without it a prefill
  is never split and a prompt longer than the budget is rejected.
* Expert-blind control (``blind_labels_seed``): each request's experts are relabelled by a
  random permutation of its own, so expert-aware grouping sees labels that carry no expert
  information. The engine still runs the true routes.
* KV slots: at most ``n_slots`` requests hold a slot; waiting requests get free slots in
  arrival order (FCFS admission). At most ``max_queue`` requests wait; more are rejected
  with a reason. Without ``chunked_prefill`` a prompt longer than ``token_budget`` is
  rejected too, since the prefill must then fit in one step.
* Ready work: each slotted request has exactly one pending item, its whole prefill or the
  decode of its last sampled token (1 token). A step's items never exceed ``token_budget``.
* Age bound: an item that has waited ``max_wait_steps`` steps is overdue; overdue items go
  first, oldest first. The oldest overdue item always fits an empty step, and at most
  ``n_slots - 1`` items are older than any given one, so no ready item waits more than
  ``max_wait_steps + n_slots - 1`` steps (exactly ``max_wait_steps`` when the overdue items
  of every step fit the budget together).

Policies (``policy`` in :data:`SCHEDULER_POLICIES`), each filling the rest of the budget first-fit:

* ``fcfs``: oldest ready first.
* ``decode_first`` (DeepSpeed-FastGen-like): all decodes, oldest first, then prefills.
* ``prefill_first`` (vLLM/TGI-like): prefills, oldest first, then decodes.
* ``expert_aware`` (Read-ME Algorithm 1): queue work by expert; repeatedly take the expert
  whose queue holds the most tokens and add its items (oldest first) while they fit. Queue
  ties go to an expert already in the batch, then the smallest id. Without chunked prefill a
  prefill cannot be split, so it is queued under its MAJORITY expert (ties: smallest id) with
  all its tokens, and its other experts still count in the batch's expert set. With chunked
  prefill, when the ready work exceeds the budget, a prompt is cut at expert boundaries
  instead: it is queued under the expert of its next token with the length of that token's
  run, and its chunk stops at the first token whose expert is not yet in the batch, so prompts
  add no experts of their own (room left at the end extends a cut chunk over experts the step
  already holds). When everything fits, everything runs whole.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Callable, Mapping, Sequence

import numpy as np

from readme_jax.config import SCHEDULER_POLICIES
from readme_jax.errors import ConfigError, ReadmeError, RequestError
from readme_jax.serve.scheduling.requests import Batch, BatchItem, Kind, Request, Status, WorkItem



@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "expert_aware"
    token_budget: int = 256  # tokens per step, same for every policy
    n_slots: int = 64  # KV-cache slots = max requests in flight
    max_queue: int = 1024  # max waiting (unslotted) requests; more are rejected
    max_wait_steps: int | None = 16  # age bound; None disables it
    n_experts: int = 8  # route ids must be in [0, n_experts)
    chunked_prefill: bool = False  # a prefill that does not fit the rest of a step's budget runs a chunk of it
    blind_labels_seed: int | None = None  # expert-blind control: each request's experts relabelled at random
    # expert_aware with chunked prefill: cut prompt chunks at expert boundaries (False: an
    # ablation that cuts them only to the room left, the prompt queued under its majority expert)
    cut_at_experts: bool = True

    def __post_init__(self):
        if self.policy not in SCHEDULER_POLICIES:
            raise ConfigError(f"scheduler.policy must be one of {', '.join(SCHEDULER_POLICIES)}, got {self.policy!r}")
        for name in ("token_budget", "n_slots", "n_experts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"scheduler.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_queue < 0:
            raise ConfigError(f"scheduler.max_queue must be >= 0, got {self.max_queue!r}")
        if not isinstance(self.cut_at_experts, bool):
            raise ConfigError(f"scheduler.cut_at_experts must be true or false, got {self.cut_at_experts!r}")
        if self.max_wait_steps is not None and self.max_wait_steps < 0:
            raise ConfigError(f"scheduler.max_wait_steps must be >= 0 or null, got {self.max_wait_steps!r}")


# ----------------------------------------------------------------------------- policies
# Each takes the ready items sorted oldest first (ready_step, rid) and the remaining budget,
# and returns the items to run, in order. Pure: no scheduler state.


def _fit(it: WorkItem, room: int, chunk: bool) -> WorkItem | None:
    """``it`` if it fits ``room`` tokens; with ``chunk``, a prefill that does not fit runs its first ``room``."""
    if it.n_tokens <= room:
        return it
    if chunk and it.kind is Kind.PREFILL and room >= 1:
        return it.chunk(room)
    return None


def _first_fit(items, budget: int, chosen: list, chunk: bool = False) -> int:
    used = 0
    for it in items:
        took = _fit(it, budget - used, chunk)
        if took is not None:
            chosen.append(took)
            used += took.n_tokens
    return used


def select_fcfs(items: Sequence[WorkItem], budget: int, chunk: bool = False) -> list:
    chosen: list = []
    _first_fit(items, budget, chosen, chunk)
    return chosen


def select_decode_first(items: Sequence[WorkItem], budget: int, chunk: bool = False) -> list:
    chosen: list = []
    used = _first_fit([i for i in items if i.kind is Kind.DECODE], budget, chosen, chunk)
    _first_fit([i for i in items if i.kind is Kind.PREFILL], budget - used, chosen, chunk)
    return chosen


def select_prefill_first(items: Sequence[WorkItem], budget: int, chunk: bool = False) -> list:
    chosen: list = []
    used = _first_fit([i for i in items if i.kind is Kind.PREFILL], budget, chosen, chunk)
    _first_fit([i for i in items if i.kind is Kind.DECODE], budget - used, chosen, chunk)
    return chosen


def select_expert_aware(items: Sequence[WorkItem], budget: int, batch_experts: frozenset = frozenset(),
                        chunk: bool = False, cut_at_experts: bool = True) -> list:
    """Read-ME Algorithm 1: serve the longest per-expert queue (in tokens) first.

    Without ``chunk`` a prefill cannot be split: it is queued whole under its majority expert.
    With ``chunk``, when the ready work exceeds the budget, a prefill is queued under the expert of
    its next token and counts its leading run on that expert; taken, it runs up to the first
    token whose expert is not yet in the batch (or the room left), so a chunk adds no expert
    beyond the queue's own. If room is left once every queue is served, a cut chunk runs on over
    the tokens whose experts the step already holds. When all ready work fits, every item is
    taken whole (cutting would only delay a prompt). ``cut_at_experts=False`` (an ablation)
    chunks a prefill only to the room left, queued under its majority expert.
    """
    chunk_cut = chunk and cut_at_experts and sum(i.n_tokens for i in items) > budget
    queues: dict[int, list] = collections.defaultdict(list)
    for it in items:
        queues[it.head_expert if chunk_cut else it.queue_expert].append(it)

    size = {e: sum(i.run_length((e,)) if chunk_cut else i.n_tokens for i in q) for e, q in queues.items()}
    in_batch = set(batch_experts)
    chosen: list = []
    used = 0
    while queues and used < budget:
        e = max(queues, key=lambda k: (size[k], k in in_batch, -k))
        for it in queues.pop(e):
            room = budget - used
            if chunk_cut and it.kind is Kind.PREFILL and room >= 1:
                n = min(it.run_length(in_batch | {e}), room)
                took = it if n == it.n_tokens else it.chunk(n)
            else:
                took = _fit(it, room, chunk)
            if took is not None:
                chosen.append(took)
                used += took.n_tokens
                in_batch |= took.experts
    if chunk_cut and used < budget:  # room left: cut prompts run on over experts the step holds
        whole = {i.rid: i for i in items}
        for k, it in enumerate(chosen):
            if it.kind is Kind.PREFILL and used < budget:
                full = whole[it.rid]
                n = min(full.run_length(in_batch), it.n_tokens + budget - used)
                if n > it.n_tokens:
                    chosen[k] = full if n == full.n_tokens else full.chunk(n)
                    used += n - it.n_tokens
    return chosen


_SELECT: dict[str, Callable] = {
    "fcfs": select_fcfs,
    "decode_first": select_decode_first,
    "prefill_first": select_prefill_first,
    "expert_aware": select_expert_aware,
}


def plan_step(items: Sequence[WorkItem], budget: int, step: int, policy: str, max_wait_steps: int | None,
              chunk: bool = False, cut_at_experts: bool = True) -> list:
    """Items one step takes: overdue ones first (oldest first), then the policy's picks. With
    ``chunk``, a prefill may be cut to the room left (the returned item is then its chunk)."""
    items = sorted(items, key=lambda i: (i.ready_step, i.rid))
    chosen: list = []
    used = 0
    if max_wait_steps is not None:
        overdue = [i for i in items if step - i.ready_step >= max_wait_steps]
        used = _first_fit(overdue, budget, chosen, chunk)
    taken = {i.rid for i in chosen}
    rest = [i for i in items if i.rid not in taken]
    if policy == "expert_aware":
        picks = select_expert_aware(rest, budget - used, frozenset().union(*(i.experts for i in chosen)), chunk,
                                    cut_at_experts)
    else:
        picks = _SELECT[policy](rest, budget - used, chunk)
    return chosen + picks


# ----------------------------------------------------------------------------- scheduler


class Scheduler:
    """Admission, KV slots, ready work and one policy; drives an engine one step at a time."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.step = 0  # index of the next non-empty batch
        self._waiting: collections.deque[Request] = collections.deque()
        self._free_slots = list(range(cfg.n_slots))
        heapq.heapify(self._free_slots)
        self._pending: dict[int, WorkItem] = {}  # rid -> its one ready item
        self._running: dict[int, Request] = {}  # rid -> slotted request
        self._seen: set[int] = set()
        self._in_flight: Batch | None = None
        self.finished: list[Request] = []
        self.rejected: list[Request] = []
        self.cancelled: list[Request] = []

    def _labels(self, req: Request) -> tuple | None:
        """The expert-blind control's relabelling of ``req``'s experts (a random permutation per
        request, fixed for its life): grouping by label then carries no expert information, while
        queue lengths and ages behave as before. None unless ``blind_labels_seed`` is set."""
        if self.cfg.blind_labels_seed is None:
            return None
        rng = np.random.default_rng([self.cfg.blind_labels_seed, req.rid])
        return tuple(int(x) for x in rng.permutation(self.cfg.n_experts))

    # --- queries
    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._running)

    @property
    def n_ready(self) -> int:
        """Ready work items not in the batch in flight (after ``next_batch``: the ones it left out)."""
        return len(self._pending)

    def has_work(self) -> bool:
        """True while any accepted request is unfinished."""
        return bool(self._waiting or self._running)

    # --- engine-facing API
    def add(self, request: Request) -> bool:
        """Queue a request; returns False (status REJECTED, ``reject_reason`` set) if it cannot be served."""
        if request.rid in self._seen:
            raise RequestError(f"request id {request.rid} was already added to this scheduler")
        if request.status is not Status.WAITING:
            raise RequestError(f"request {request.rid} must be new (status waiting), got status {request.status.value}")
        top = int(request.prompt_routes.max())
        if top >= self.cfg.n_experts:
            raise RequestError(
                f"request {request.rid}: prompt route {top} out of range [0, {self.cfg.n_experts}) (scheduler.n_experts)"
            )
        self._seen.add(request.rid)
        reason = None
        if request.prompt_len > self.cfg.token_budget and not self.cfg.chunked_prefill:
            reason = (f"prompt has {request.prompt_len} tokens > scheduler.token_budget={self.cfg.token_budget} "
                      f"(a prefill is split only with scheduler.chunked_prefill)")
        elif len(self._waiting) - len(self._free_slots) >= self.cfg.max_queue:  # the free slots take some
            n = len(self._waiting) - len(self._free_slots)
            reason = f"queue full: {n} requests waiting for a slot (scheduler.max_queue={self.cfg.max_queue})"
        if reason is not None:
            request.status = Status.REJECTED
            request.reject_reason = reason
            self.rejected.append(request)
            return False
        self._waiting.append(request)
        return True

    def next_batch(self, budget: int | None = None, now_s: float | None = None) -> Batch:
        """Admit waiting requests into free slots, then pick this step's work.

        Returns an empty batch only when no work is ready. The batch is in flight until
        :meth:`on_step_done`; asking for another one before that is an error.
        """
        if self._in_flight is not None:
            raise ReadmeError(f"next_batch: step {self._in_flight.step} is still in flight; call on_step_done first")
        budget = self.cfg.token_budget if budget is None else int(budget)
        if not 1 <= budget <= self.cfg.token_budget:
            raise ConfigError(f"next_batch budget must be in [1, scheduler.token_budget={self.cfg.token_budget}], "
                              f"got {budget}")
        while self._waiting and self._free_slots:
            req = self._waiting.popleft()
            req.slot = heapq.heappop(self._free_slots)
            req.status = Status.ADMITTED
            req.admitted_s = now_s
            self._running[req.rid] = req
            self._pending[req.rid] = WorkItem.prefill(req, self.step, labels=self._labels(req))
        chosen = plan_step(list(self._pending.values()), budget, self.step, self.cfg.policy, self.cfg.max_wait_steps,
                           self.cfg.chunked_prefill, self.cfg.cut_at_experts)
        if self._pending and not chosen:
            # every item fits an empty step (prompts are checked at add), so a policy that
            # picks nothing while work is ready is a bug; fail loudly rather than spin
            raise ReadmeError(f"policy {self.cfg.policy} picked no work with {len(self._pending)} items ready "
                              f"and budget {budget}")
        items = []
        for it in chosen:
            del self._pending[it.rid]
            items.append(BatchItem(it.request, it.kind, it.n_tokens, it.request.slot,
                                   self.step - it.ready_step, it.experts))
        batch = Batch(self.step, tuple(items))
        if items:
            self._in_flight = batch
            self.step += 1
        return batch

    def on_step_done(self, batch: Batch, next_routes: Mapping[int, int | None], now_s: float) -> list[Request]:
        """Record one sampled token per item; ``next_routes[rid]`` routes it (None: request finished).

        A request also finishes when it reaches ``max_new_tokens`` (its route is then ignored).
        Returns the requests that finished in this step.
        """
        if self._in_flight is None or batch is not self._in_flight:
            raise ReadmeError(f"on_step_done: batch of step {batch.step} is not the batch in flight")
        self._in_flight = None
        done = []
        for it in batch.items:
            req = it.request
            if it.kind is Kind.PREFILL:
                req.prefilled += it.n_tokens
                if req.prefilled < req.prompt_len:  # a chunk: the rest of the prompt is ready again, no token yet
                    self._pending[req.rid] = WorkItem.prefill(req, self.step, labels=self._labels(req))
                    continue
            if req.rid not in next_routes:
                raise RequestError(f"on_step_done: no route given for request {req.rid} of step {batch.step}")
            req.n_generated += 1
            if it.kind is Kind.PREFILL:
                req.first_token_s = now_s
                req.status = Status.RUNNING
            route = next_routes[req.rid]
            if route is None or req.n_generated >= req.max_new_tokens:
                req.status = Status.FINISHED
                req.finish_s = now_s
                req.next_route = None
                del self._running[req.rid]
                heapq.heappush(self._free_slots, req.slot)
                self.finished.append(req)
                done.append(req)
                continue
            route = int(route)
            if not 0 <= route < self.cfg.n_experts:
                raise RequestError(f"on_step_done: route {route} of request {req.rid} out of range "
                                   f"[0, {self.cfg.n_experts}) (scheduler.n_experts)")
            req.next_route = route
            self._pending[req.rid] = WorkItem.decode(req, route, self.step, self._labels(req))
        return done

    def abort(self, rid: int) -> Request | None:
        """Cancel a waiting or running request between steps (its slot is freed); None if unknown or done."""
        if self._in_flight is not None and any(it.rid == rid for it in self._in_flight.items):
            raise ReadmeError(f"abort: request {rid} is in the batch in flight; abort between steps")
        req = self._running.pop(rid, None)
        if req is not None:
            self._pending.pop(rid, None)
            heapq.heappush(self._free_slots, req.slot)
        else:
            req = next((r for r in self._waiting if r.rid == rid), None)
            if req is None:
                return None
            self._waiting.remove(req)
        req.status = Status.CANCELLED
        req.next_route = None
        self.cancelled.append(req)
        return req

    def lookahead(self, n_steps: int, budget: int | None = None) -> list[frozenset]:
        """Expert sets of the next ``n_steps`` batches this policy would form from KNOWN work.

        A dry run over the pending items (nothing changes): tokens not yet sampled are unknown,
        so later planned steps hold only what is already queued. Stops when nothing is left.
        """
        budget = self.cfg.token_budget if budget is None else int(budget)
        items = list(self._pending.values())
        out = []
        step = self.step
        for _ in range(n_steps):
            if not items:
                break
            chosen = plan_step(items, budget, step, self.cfg.policy, self.cfg.max_wait_steps, self.cfg.chunked_prefill,
                               self.cfg.cut_at_experts)
            ids = {i.rid for i in chosen}
            items = [i for i in items if i.rid not in ids]  # a chunked prefill's rest is left out of the dry run
            out.append(frozenset().union(*(i.experts for i in chosen)))
            step += 1
        return out
