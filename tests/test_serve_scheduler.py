"""Schedulers: budget, admission, age bound, expert-aware batching, overload, and the simulation loop."""

import collections
import copy
import dataclasses

import numpy as np
import pytest

from readme_jax.errors import ConfigError, ReadmeError, RequestError
from readme_jax.serve.scheduling.requests import Kind, Request, Status, WorkItem
from readme_jax.serve.scheduling.scheduler import (SCHEDULER_POLICIES, Scheduler, SchedulerConfig, plan_step,
                                        select_expert_aware)
from readme_jax.serve.sim.simulate import CostModel, simulate
from readme_jax.serve.sim.transfer import StoreConfig
from readme_jax.config import WORKLOAD_PRESETS as PRESETS
from readme_jax.serve.sim.workload import generate_workload


def req(rid, routes, max_new=3, arrival=0.0):
    return Request(rid, arrival, np.asarray(routes, np.int32), max_new)


def drive(sched, route_of, max_steps=100_000):
    """Run until idle; ``route_of(request)`` is the expert of each newly sampled token."""
    batches = []
    t = 0.0
    while sched.has_work():
        b = sched.next_batch()
        assert b.items, "work pending but empty batch"
        t += 1.0
        sched.on_step_done(b, {it.rid: route_of(it.request) for it in b.items}, t)
        batches.append(b)
        assert len(batches) < max_steps
    return batches


# ----------------------------------------------------------------------------- validation


def test_config_and_request_errors():
    with pytest.raises(ConfigError, match="scheduler.policy must be one of expert_aware, decode_first"):
        SchedulerConfig(policy="sjf")
    with pytest.raises(ConfigError, match="scheduler.token_budget must be >= 1, got 0"):
        SchedulerConfig(token_budget=0)
    with pytest.raises(RequestError, match="non-empty 1-D array of expert ids"):
        req(0, [])
    with pytest.raises(RequestError, match="max_new_tokens must be an integer >= 1, got 0"):
        req(0, [1], max_new=0)
    s = Scheduler(SchedulerConfig(n_experts=4))
    with pytest.raises(RequestError, match=r"prompt route 4 out of range \[0, 4\)"):
        s.add(req(0, [1, 4]))
    assert s.add(req(1, [1]))
    with pytest.raises(RequestError, match="request id 1 was already added"):
        s.add(req(1, [2]))
    b = s.next_batch()
    with pytest.raises(ReadmeError, match="step 0 is still in flight"):
        s.next_batch()
    with pytest.raises(RequestError, match="no route given for request 1 of step 0"):
        s.on_step_done(b, {}, 1.0)
    s2 = Scheduler(SchedulerConfig(n_experts=4))
    s2.add(req(0, [1]))
    b2 = s2.next_batch()
    with pytest.raises(RequestError, match=r"route 9 of request 0 out of range \[0, 4\)"):
        s2.on_step_done(b2, {0: 9}, 1.0)


def test_rejections_carry_reasons():
    s = Scheduler(SchedulerConfig(token_budget=4, max_queue=1, n_slots=1))
    long = req(0, [0] * 5)
    assert not s.add(long)
    assert long.status is Status.REJECTED
    assert long.reject_reason == "prompt has 5 tokens > scheduler.token_budget=4 (a prefill is split only with scheduler.chunked_prefill)"
    assert s.add(req(1, [0]))  # takes the free slot at the next step: does not count as waiting
    assert s.add(req(2, [0]))  # waits
    full = req(3, [0])
    assert not s.add(full)
    assert full.reject_reason == "queue full: 1 requests waiting for a slot (scheduler.max_queue=1)"
    assert [r.rid for r in s.rejected] == [0, 3]


def test_a_burst_fills_free_slots_before_the_queue():
    """8 arrivals at once with 4 free slots and max_queue=2: 4 get slots, 2 wait, 2 are refused."""
    s = Scheduler(SchedulerConfig(token_budget=8, max_queue=2, n_slots=4))
    accepted = [s.add(req(i, [0])) for i in range(8)]
    assert accepted == [True] * 6 + [False] * 2
    s.next_batch()
    assert s.n_running == 4 and s.n_waiting == 2


# ----------------------------------------------------------------------------- policies by hand


def items(spec, step=0):
    """spec: list of (routes, is_prefill); decode items take routes[0]."""
    out = []
    for i, (routes, pre) in enumerate(spec):
        r = req(i, routes)
        out.append(WorkItem.prefill(r, step) if pre else WorkItem.decode(r, routes[0], step))
    return out


def rids(chosen):
    return [i.rid for i in chosen]


def test_expert_aware_takes_longest_queue_first():
    its = items([([1], False), ([0], False), ([2], False), ([0], False), ([1], False), ([0], False)])
    assert rids(select_expert_aware(its, 3)) == [1, 3, 5]  # expert 0 holds 3 tokens
    assert rids(select_expert_aware(its, 4)) == [1, 3, 5, 0]  # then expert 1 (2 tokens), first fit
    assert rids(select_expert_aware(its, 6)) == [1, 3, 5, 0, 4, 2]


def test_expert_aware_prefill_counts_under_majority_expert():
    # prefill (3 tokens, majority 2) vs two decodes on expert 1: expert 2's queue is longer
    its = items([([1], False), ([2, 1, 2], True), ([1], False)])
    assert its[1].queue_expert == 2 and its[1].experts == frozenset({1, 2})
    assert rids(select_expert_aware(its, 3)) == [1]  # decodes on 1 no longer fit
    assert rids(select_expert_aware(its, 5)) == [1, 0, 2]
    # tie between majority experts goes to the smallest id
    assert WorkItem.prefill(req(9, [3, 1, 1, 3]), 0).queue_expert == 1


def test_expert_aware_tie_prefers_expert_already_in_batch():
    # queues: 0 -> prefill [0,0,3] (3 tokens); 3 -> one decode; 4 -> one decode. After the
    # prefill, experts 3 and 4 tie at 1 token; 3 is already in the batch, so it goes first.
    its = items([([4], False), ([0, 0, 3], True), ([3], False)])
    assert rids(select_expert_aware(its, 4)) == [1, 2]


def test_baseline_orders():
    its = items([([0], False), ([1, 1], True), ([2], False), ([3, 3, 3], True)])
    assert rids(plan_step(its, 3, 0, "decode_first", None)) == [0, 2]
    assert rids(plan_step(its, 4, 0, "decode_first", None)) == [0, 2, 1]
    assert rids(plan_step(its, 3, 0, "prefill_first", None)) == [1, 0]
    assert rids(plan_step(its, 5, 0, "prefill_first", None)) == [1, 3]
    assert rids(plan_step(its, 3, 0, "fcfs", None)) == [0, 1]
    assert rids(plan_step(its, 7, 0, "fcfs", None)) == [0, 1, 2, 3]


def test_overdue_items_go_first_oldest_first():
    its = items([([0], False)] * 4 + [([5], False)])
    its = [dataclasses.replace(i, ready_step=s) for i, s in zip(its, [9, 9, 9, 9, 2])]
    assert rids(plan_step(its, 2, 10, "expert_aware", None)) == [0, 1]
    assert rids(plan_step(its, 2, 10, "expert_aware", 8)) == [4, 0]
    # more overdue work than budget: strictly oldest first
    late = dataclasses.replace(items([([6], False)])[0], request=req(7, [6]), ready_step=3)
    assert rids(plan_step(its + [late], 1, 10, "expert_aware", 5)) == [4]
    assert rids(plan_step(its + [late], 2, 10, "fcfs", 5)) == [4, 7]


# ----------------------------------------------------------------------------- age bound


def adversarial(max_wait, steps_cap=5000):
    """9 requests on expert 0 crowd out one on expert 1 (budget 4, 10 slots)."""
    s = Scheduler(SchedulerConfig(policy="expert_aware", token_budget=4, n_slots=10, max_wait_steps=max_wait,
                                  n_experts=2))
    for i in range(9):
        s.add(req(i, [0], max_new=200))
    s.add(req(9, [1], max_new=20))
    batches = drive(s, lambda r: int(r.prompt_routes[0]), steps_cap)
    waits = [it.wait_steps for b in batches for it in b.items if it.rid == 9]
    return batches, waits


def test_age_bound_stops_starvation():
    _, waits = adversarial(None)
    assert waits[0] > 100  # without the bound, expert 1 waits until expert 0's work drains
    batches, waits = adversarial(5)
    assert max(waits) == 5 and len(waits) == 20
    assert max(it.wait_steps for b in batches for it in b.items) <= 5
    assert all(b.n_tokens <= 4 for b in batches)


# ----------------------------------------------------------------------------- whole runs


def check_run(res, wl, cfg):
    """Budget, slots, token accounting and route plumbing of a finished simulation."""
    spec = {s.rid: s for s in wl}
    per = collections.defaultdict(list)  # rid -> [(step, kind, experts)]
    for b in res.batches:
        assert 0 < b.n_tokens <= cfg.token_budget
        assert len({it.rid for it in b.items}) == len(b.items)
        slots = [it.slot for it in b.items]
        assert len(set(slots)) == len(slots) and all(0 <= x < cfg.n_slots for x in slots)
        bound = (cfg.max_wait_steps + cfg.n_slots - 1) if cfg.max_wait_steps is not None else None
        for it in b.items:
            assert bound is None or it.wait_steps <= bound
            per[it.rid].append((b.step, it.kind, it.experts))
    for r in res.requests:
        s = spec[r.rid]
        if r.status is Status.REJECTED:
            assert r.reject_reason and r.rid not in per
            continue
        assert r.status is Status.FINISHED and r.n_generated == s.output_len
        work = sorted(per[r.rid], key=lambda x: x[0])
        assert work[0][1] is Kind.PREFILL and all(k is Kind.DECODE for _, k, _ in work[1:])
        assert len(work) == s.output_len  # one prefill + output_len - 1 decodes, none lost or repeated
        assert work[0][2] == frozenset(int(e) for e in s.prompt_routes)
        for k, (_, _, ex) in enumerate(work[1:], start=1):
            assert ex == {int(s.output_routes[k - 1])}  # decode k runs generated token k
        assert r.arrival_s <= r.first_token_s <= r.finish_s


@pytest.mark.parametrize("policy", SCHEDULER_POLICIES)
def test_simulate_completes_every_request(policy):
    wl = generate_workload(dataclasses.replace(PRESETS["cpu"], n_requests=60, rate_per_s=15.0, seed=4))
    cfg = SchedulerConfig(policy=policy, token_budget=24, n_slots=12, max_wait_steps=6, max_queue=1000)
    res = simulate(wl, Scheduler(cfg), CostModel(), store=StoreConfig(capacity=3, expert_bytes=10**7),
                   cache_probes=[("belady", 3), ("lru", 3)], keep_batches=True)
    check_run(res, wl, cfg)
    n_rej = sum(r.status is Status.REJECTED for r in res.requests)
    assert n_rej == sum(s.prompt_len > 24 for s in wl)  # only over-long prompts are rejected
    assert all(st.stall_s >= 0 for st in res.steps)
    accesses = sum(len(st.experts) for st in res.steps)
    assert all(cs.accesses == accesses for cs in res.probe_stats.values())


def test_expert_aware_batches_fewer_experts_than_baselines():
    wl = generate_workload(dataclasses.replace(PRESETS["cpu"], n_requests=200, rate_per_s=20.0, expert_zipf=1.5,
                                               prompt_max=256, seed=1))
    mean_unique = {}
    for policy in SCHEDULER_POLICIES:
        cfg = SchedulerConfig(policy=policy, token_budget=32, n_slots=64, max_wait_steps=16, max_queue=1000)
        res = simulate(wl, Scheduler(cfg), CostModel())
        mean_unique[policy] = np.mean([len(s.experts) for s in res.steps])
    for other in ("fcfs", "decode_first", "prefill_first"):
        assert mean_unique["expert_aware"] < mean_unique[other] - 0.5, mean_unique


def test_overload_2x_bounded_queue_loses_nothing():
    base = dataclasses.replace(PRESETS["cpu"], n_requests=500, prompt_max=128, seed=7)
    cfg = SchedulerConfig(policy="expert_aware", token_budget=32, n_slots=16, max_queue=24, max_wait_steps=8)
    # service rate: all 500 requests at once, no queue limit
    burst = generate_workload(dataclasses.replace(base, rate_per_s=1e6))
    sat = simulate(burst, Scheduler(dataclasses.replace(cfg, max_queue=10_000)), CostModel())
    capacity_rps = 500 / sat.makespan_s
    wl = generate_workload(dataclasses.replace(base, rate_per_s=2 * capacity_rps))
    res = simulate(wl, Scheduler(cfg), CostModel(), keep_batches=True)
    check_run(res, wl, cfg)
    fin = [r.rid for r in res.requests if r.status is Status.FINISHED]
    rej = [r for r in res.requests if r.status is Status.REJECTED]
    assert len(fin) + len(rej) == 500 and len(set(fin)) == len(fin)
    assert set(fin).isdisjoint(r.rid for r in rej)
    assert 50 < len(rej) < 450  # the overload really rejected some, and served many
    assert all(r.reject_reason.startswith("queue full") for r in rej)


def test_lookahead_is_a_dry_run_of_next_batch():
    rng = np.random.default_rng(0)
    for policy in SCHEDULER_POLICIES:
        s = Scheduler(SchedulerConfig(policy=policy, token_budget=6, n_slots=8, n_experts=5))
        for i in range(8):
            s.add(req(i, rng.integers(0, 5, size=int(rng.integers(1, 4))), max_new=6))
        b = s.next_batch()
        s.on_step_done(b, {it.rid: int(rng.integers(0, 5)) for it in b.items}, 1.0)
        plan = s.lookahead(4)
        assert s.lookahead(4) == plan  # no state change
        # replay on a copy, finishing every request so no new token is routed: the batches
        # then hold exactly the known work, as planned (all 8 requests hold a slot already)
        c = copy.deepcopy(s)
        seen = []
        while c.has_work():
            b = c.next_batch()
            seen.append(b.experts)
            c.on_step_done(b, {it.rid: None for it in b.items}, 2.0)
        assert plan == seen[:4], policy


def test_trailing_invalid_or_rejected_requests_do_not_lose_the_run():
    """The last arrivals are bad (a prompt over the token budget, a route out of range, no output):
    each is recorded with its reason and every other request's result comes back."""
    from readme_jax.serve.sim.workload import RequestSpec

    def spec(rid, arrival, prompt_routes, output_len):
        routes = np.asarray(prompt_routes, np.int32)
        return RequestSpec(rid, arrival, len(routes), output_len, routes, np.zeros(max(output_len, 0), np.int32))

    good = [spec(i, 0.01 * i, [i % 2] * 3, 2) for i in range(4)]
    too_long = spec(4, 5.0, [0] * 9, 2)  # > token_budget 8: the scheduler rejects it
    bad_route = spec(5, 6.0, [0, 7], 2)  # expert 7 of 4: invalid
    no_output = spec(6, 7.0, [1], 0)  # max_new_tokens 0: invalid
    cfg = SchedulerConfig(policy="expert_aware", token_budget=8, n_slots=2, max_queue=10, n_experts=4)
    for tail in ([too_long], [bad_route], [no_output], [too_long, bad_route, no_output]):
        res = simulate(good + tail, Scheduler(cfg), CostModel())
        assert [r.rid for r in res.requests if r.status is Status.FINISHED] == [0, 1, 2, 3]
        out = res.outcomes()
        assert sorted(out) == [s.rid for s in good + tail]
        assert all(out[i] == {"status": "finished", "reason": None} for i in range(4))
        for s in tail:
            assert out[s.rid]["status"] == "rejected", s.rid
        if too_long in tail:
            assert out[4]["reason"] == "prompt has 9 tokens > scheduler.token_budget=8 (a prefill is split only with scheduler.chunked_prefill)"
        if bad_route in tail:
            assert "prompt route 7 out of range [0, 4)" in res.invalid[5] == out[5]["reason"]
        if no_output in tail:
            assert "max_new_tokens must be an integer >= 1, got 0" in res.invalid[6]
        assert res.steps[-1].end_s < 5.0  # the served requests ran before the bad ones arrived


# ----------------------------------------------------------------------------- chunked prefill, expert-blind control


@pytest.mark.parametrize("policy", SCHEDULER_POLICIES)
def test_chunked_prefill_splits_to_the_budget_and_samples_once(policy):
    cfg = SchedulerConfig(policy=policy, token_budget=4, n_slots=2, max_wait_steps=None, n_experts=3,
                          chunked_prefill=True)
    s = Scheduler(cfg)
    long = req(0, [0, 0, 1, 1, 2, 2, 2, 0, 1, 1], max_new=2)  # 10 tokens > budget 4: accepted, chunked
    assert s.add(long) and s.add(req(1, [2], max_new=3))
    seen = []
    while s.has_work():
        b = s.next_batch()
        assert b.n_tokens <= 4
        seen += [(it.rid, it.n_tokens, it.experts) for it in b.items if it.kind is Kind.PREFILL and it.rid == 0]
        partial = {it.rid for it in b.items if it.kind is Kind.PREFILL and
                   it.request.prefilled + it.n_tokens < it.request.prompt_len}
        s.on_step_done(b, {it.rid: 1 for it in b.items if it.rid not in partial}, 0.0)
    assert sum(n for _, n, _ in seen) == 10 and len(seen) >= 3  # the whole prompt, in chunks
    assert seen[0][2] == frozenset({0, 1}) or seen[0][1] < 4  # a chunk's experts are its own tokens'
    assert long.n_generated == 2 and long.status is Status.FINISHED and long.prefilled == 10
    # without chunking the same prompt is rejected with the reason
    s2 = Scheduler(dataclasses.replace(cfg, chunked_prefill=False))
    assert not s2.add(req(0, [0] * 10)) and "chunked_prefill" in s2.rejected[0].reject_reason


def test_expert_aware_chunked_prefill_cuts_at_expert_boundaries():
    # queues with chunking: 0 -> A's leading run [0, 0, 0] (3); 1 -> one decode (1);
    # 2 -> one decode + B's leading run [2, 2] (3). Tie 0/2 at 3 tokens goes to the smaller id.
    its = items([([0, 0, 0, 1, 1], True), ([1], False), ([2], False), ([2, 2, 0], True)])
    assert [i.head_expert for i in its] == [0, 1, 2, 2] and its[0].run_length({0}) == 3
    got = select_expert_aware(its, 8, chunk=True)
    assert rids(got) == [0, 2, 3, 1]
    # A stops where expert 1 starts (1 was not in the batch yet); B runs whole, since its
    # trailing 0 is already in the batch
    assert [(i.n_tokens, i.experts) for i in got if i.kind is Kind.PREFILL] == [(3, {0}), (3, {0, 2})]
    small = select_expert_aware(its, 5, chunk=True)  # B gets the one token of room left
    assert rids(small) == [0, 2, 3] and small[-1].n_tokens == 1
    # without chunking a prefill stays whole under its majority expert (A: 5 tokens on 0), and
    # B (3 tokens) no longer fits after A and the decode on 2
    whole = select_expert_aware(its, 8)
    assert rids(whole) == [0, 2, 1] and whole[0].n_tokens == 5
    # the ablation: chunked, but only to the room left (A's chunk of 4 spans experts 0 and 1)
    uncut = select_expert_aware(its, 4, chunk=True, cut_at_experts=False)
    assert rids(uncut) == [0] and (uncut[0].n_tokens, uncut[0].experts) == (4, {0, 1})
    with pytest.raises(ConfigError, match="cut_at_experts must be true or false"):
        SchedulerConfig(cut_at_experts=1)


def test_expert_aware_chunked_cuts_only_when_work_exceeds_the_budget_and_fills_room_left():
    # A = [0, 0, 1, 1] and decodes on 1 and 2: 6 tokens. Budget 5: A's run on 0 first (2), then
    # queues 1 and 2 (tie: smaller id), 1 token of room is left, and A runs on over its token on
    # 1, which the step holds by then
    its = items([([0, 0, 1, 1], True), ([1], False), ([2], False)])
    got = select_expert_aware(its, 5, chunk=True)
    assert rids(got) == [0, 1, 2] and (got[0].n_tokens, got[0].experts) == (3, {0, 1})
    assert sum(i.n_tokens for i in got) == 5
    # budget 6: everything fits, so nothing is cut (A whole, with both its experts)
    got = select_expert_aware(its, 6, chunk=True)
    assert sorted(rids(got)) == [0, 1, 2] and got[rids(got).index(0)].n_tokens == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_aware_chunked_batches_open_no_expert_beyond_their_queues(seed):
    """With chunked prefill (and no overdue items), a batch whose ready work exceeded the budget
    holds exactly the experts its items were queued under: every prompt chunk stays within them
    (a chunk extended into room left stays within them too); and the chunks of every prompt add
    up to the prompt, in order."""
    rng = np.random.default_rng(seed)
    E = 5
    cfg = SchedulerConfig(policy="expert_aware", token_budget=12, n_slots=6, max_wait_steps=None, n_experts=E,
                          chunked_prefill=True)
    s = Scheduler(cfg)
    reqs = []
    for i in range(20):
        runs = [np.full(int(rng.integers(1, 6)), int(rng.integers(E))) for _ in range(int(rng.integers(1, 4)))]
        reqs.append(req(i, np.concatenate(runs), max_new=int(rng.integers(1, 5))))
        assert s.add(reqs[-1])
    done_tokens = collections.Counter()
    checked = 0
    while s.has_work():
        b = s.next_batch()
        cut = any(it.kind is Kind.PREFILL and it.request.prefilled + it.n_tokens < it.request.prompt_len
                  for it in b.items)
        exceeded = s.n_ready > 0 or cut  # the ready work did not fit (else everything runs whole)
        checked += exceeded
        heads = set()
        for it in b.items:
            q = it.request
            if it.kind is Kind.PREFILL:
                assert q.prefilled == done_tokens[it.rid]  # chunks run in prompt order
                heads.add(int(q.prompt_routes[q.prefilled]))
                done_tokens[it.rid] += it.n_tokens
            else:
                heads.add(q.next_route)
        assert b.n_tokens <= 12 and (b.experts == frozenset(heads) or not exceeded)
        s.on_step_done(b, {it.rid: int(rng.integers(E)) for it in b.items}, 0.0)
    assert all(done_tokens[r.rid] == r.prompt_len and r.status is Status.FINISHED for r in reqs)
    assert checked >= 5  # the invariant was checked on over-budget steps


def test_blind_labels_permute_each_requests_experts_and_keep_true_routes():
    cfg = SchedulerConfig(policy="expert_aware", token_budget=64, n_slots=8, n_experts=5, blind_labels_seed=7)
    s = Scheduler(cfg)
    rs = [req(i, [i % 5, i % 5, (i + 1) % 5]) for i in range(8)]
    for r in rs:
        s.add(r)
    b = s.next_batch()
    relabelled = 0
    for it in b.items:
        perm = s._labels(it.request)
        assert sorted(perm) == list(range(5))  # a permutation, fixed per request
        assert it.experts == frozenset(perm[e] for e in it.request.prompt_routes)
        relabelled += it.experts != frozenset(int(e) for e in it.request.prompt_routes)
    assert relabelled >= 4  # the labels really changed for most requests
    s.on_step_done(b, {it.rid: 3 for it in b.items}, 0.0)
    nxt = s.next_batch()
    for it in nxt.items:  # decodes: the true route stays on the request, the label is permuted
        assert it.request.next_route == 3 and it.experts == frozenset({s._labels(it.request)[3]})
