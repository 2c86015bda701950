"""GRPO's rollouts: G completions of each prompt from the engine pool, scored by the reward tasks.

``Rollouts`` is what one learner worker asks of the pool in a step: ``take`` the step's groups (generated now,
or started during the previous step with ``grpo.async_rollouts`` and collected here), ``refill`` zero-variance
groups (DAPO's dynamic sampling), ``launch_following`` the next step's rollouts while this one learns, and the
in-flight rollouts as a checkpoint keeps them (``pending_state`` / ``load_pending``). Rollouts are a pure
function of (weights version, problems, seeds): sample ``k`` of problem ``i`` at step ``s`` is seeded by
``sampling_seed(seed, s, i, k)``, and one pool unit is generated alone, so a restarted run regenerates exactly
the same completions.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r1ray.observe.log import get_logger
from r1ray.seeds import hashed_seed
from r1ray.train.stage import Metrics

log = get_logger(__name__)

__all__ = ["Group", "Rollouts", "refill_index", "sampling_seed"]


def sampling_seed(seed: int, step: int, problem_index: int, sample: int) -> int:
    """The sampling seed of completion ``sample`` of problem ``problem_index`` at ``step``: a restarted run
    regenerates exactly the same rollouts."""
    return hashed_seed("grpo", seed, step, problem_index, sample)


@dataclass
class Group:
    """One prompt's G rollouts."""

    problem: Any
    index: int
    prompt_ids: list[int]
    completions: list[Any] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    per_reward: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0
    reward_seconds: float = 0.0

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) == min(self.rewards)

    def state(self) -> dict[str, Any]:
        """JSON for a checkpoint's in-flight rollouts."""
        return {"index": self.index, "problem": self.problem.to_dict(), "prompt_ids": list(self.prompt_ids),
                "completions": [{"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                                 **({"logprobs": [e.logprob for e in c.logprobs]} if c.logprobs else {})}
                                for c in self.completions],
                "rewards": list(self.rewards), "per_reward": self.per_reward, "failures": self.failures,
                "reward_seconds": self.reward_seconds}

    @staticmethod
    def from_state(d: dict[str, Any]) -> Group:
        from r1ray.infer.types import Completion, TokenLogprob
        from r1ray.tasks.base import Problem

        prompt = [int(t) for t in d["prompt_ids"]]
        comps = [Completion(text=c["text"], token_ids=[int(t) for t in c["token_ids"]], prompt_token_ids=prompt,
                            finish_reason=c["finish_reason"],
                            logprobs=[TokenLogprob(int(t), "", float(v)) for t, v in
                                      zip(c["token_ids"], c.get("logprobs", []), strict=False)],
                            prompt_logprobs=None, ttft_s=0.0, latency_s=0.0) for c in d["completions"]]
        return Group(problem=Problem.from_dict(d["problem"]), index=int(d["index"]), prompt_ids=prompt,
                     completions=comps, rewards=[float(r) for r in d["rewards"]],
                     per_reward={k: [float(x) for x in v] for k, v in d["per_reward"].items()},
                     failures=int(d["failures"]), reward_seconds=float(d["reward_seconds"]))


def new_times() -> dict[str, float]:
    """Seconds spent generating and scoring, and tokens generated, in one step."""
    return {"generate": 0.0, "score": 0.0, "gen_tokens": 0.0}


def refill_index(epoch: int, position: int, rounds: int, r: int) -> int:
    """The problem index of dynamic sampling's candidate ``r`` for the slot at global cursor ``position``: past the
    cursor's ``[0, epoch)``, one per (slot of the epoch, round), the same in every epoch and on any worker count."""
    return epoch + (position % epoch) * rounds + r


class Rollouts:
    """One learner worker's rollouts (see the module doc). ``problem_at(step, index)`` is the stage's problem
    ``index`` at ``step``'s difficulty."""

    def __init__(self, cfg: Any, pool: Any, tokenizer: Any, worker: Any,
                 problem_at: Callable[[int, int], Any], *, epoch: int) -> None:
        self.cfg, self.g, self.pool, self.tokenizer, self.worker = cfg, cfg.grpo, pool, tokenizer, worker
        self.problem_at = problem_at
        self.epoch = epoch
        """``T``: problem indices of one epoch of the cursor (``epoch_problems``)."""
        self.version: int | None = None
        """The weights version that generated the current step's rollouts."""
        self._next_rows: tuple[int, list[list[int]]] | None = None  # prefetch(): the following step's rows
        self._pending: dict[str, Any] | None = None  # async: the following step's, in flight or restored
        self._executor = None

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, problem: Any) -> list[int]:
        text = self.tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True, tokenize=False)
        if self.g.prefill_think:
            from r1ray.model.tokenizer import THINK

            text += THINK + "\n"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def group(self, step: int, index: int) -> Group:
        p = self.problem_at(step, index)
        return Group(problem=p, index=int(index), prompt_ids=self.prompt_ids(p))

    def score_options(self, completions: Sequence[Any]) -> dict[str, Any]:
        """``score_remote``'s options for these completions (the ``length`` reward needs their token counts)."""
        g = self.g
        kw: dict[str, Any] = dict(timeout_s=g.reward_timeout_s, prefilled_think=g.prefill_think)
        if "length" in g.rewards:
            kw.update(max_completion_tokens=g.max_completion_tokens, overlong_buffer=g.overlong_buffer,
                      completion_tokens=[len(c.token_ids) for c in completions])
        return kw

    # ------------------------------------------------------------------ generate and score
    def take(self, step: int, rows: list[np.ndarray], version: int | None, times: dict[str, float],
             m: Metrics) -> list[list[Group]]:
        """Step ``step``'s groups, one list per micro-batch: started during the previous step (async) or
        generated and scored now on the weights ``version`` the pool holds."""
        micro = self._take_prefetched(step, rows, times, m) if self.g.async_rollouts else None
        if micro is None:
            micro = [[self.group(step, i) for i in r] for r in rows]
            self.version = version
            self.rollout(step, micro, version, times)
        return micro

    def rollout(self, step: int, units: list[list[Group]], version: int | None, times: dict[str, float]) -> None:
        """Generate and score every group of ``units`` (one pool unit each), in place."""
        self._collect(*self._submit(step, units, version), times)

    def refill(self, step: int, micro: list[list[Group]], positions: list[np.ndarray], version: int | None,
               times: dict[str, float]) -> tuple[int, int]:
        """Dynamic sampling: replace zero-variance groups, up to ``grpo.max_refill_rounds`` rounds. Slot = the
        prompt's global cursor position (world-size independent); candidate ``r`` of slot ``p`` is problem
        ``refill_index(T, p, max_refill_rounds, r)``, outside the cursor's range ``[0, T)``, so exactly-once
        still holds (for a finite task too: ``epoch_problems`` sizes ``T`` so refills never reach a row twice).
        Returns (groups still zero-variance, groups replaced)."""
        g = self.g
        refilled = 0
        for r in range(g.max_refill_rounds):
            want = [[(j, k) for k, grp in enumerate(unit) if grp.zero_variance] for j, unit in enumerate(micro)]
            if not any(want):
                break
            cands = [[self.group(step, refill_index(self.epoch, int(positions[j][k]), g.max_refill_rounds, r))
                      for j, k in unit] for unit in want]
            self.rollout(step, cands, version, times)
            for unit, cunit in zip(want, cands, strict=True):
                for (j, k), cand in zip(unit, cunit, strict=True):
                    if not cand.zero_variance:
                        micro[j][k] = cand
                        refilled += 1
        return sum(grp.zero_variance for unit in micro for grp in unit), refilled

    def _submit(self, step: int, units: list[list[Group]], version: int | None
                ) -> tuple[list[list[Group]], Any, float]:
        """Put ``units`` in flight on the pool (on the weights it holds now); ``_collect`` finishes them."""
        from r1ray.infer.types import SamplingParams

        g = self.g
        units = [u for u in units if u]
        if not units:
            return units, None, 0.0
        prompts, params = [], []
        for unit in units:
            prompts.append([grp.prompt_ids for grp in unit for _ in range(g.group_size)])
            params.append([SamplingParams(max_tokens=g.max_completion_tokens, temperature=g.temperature, top_p=g.top_p,
                                          seed=sampling_seed(self.cfg.seed, step, grp.index, k),
                                          logprobs=0 if g.tis_cap is not None else None,
                                          processed_logprobs=g.tis_cap is not None)
                           for grp in unit for k in range(g.group_size)])
        t0 = time.perf_counter()
        return units, self.pool.submit_units(prompts, params, version=version), t0

    def _collect(self, units: list[list[Group]], ref: Any, t0: float, times: dict[str, float]) -> None:
        """Wait for ``_submit``'s completions and score them (reward tasks), into the groups."""
        import ray

        from r1ray.tasks.remote import score_remote

        if ref is None:
            return
        g = self.g
        outs = self.pool.collect(ref)  # survives a controller restart (generated again, the same completions)
        times["generate"] += time.perf_counter() - t0
        times["gen_tokens"] += sum(len(c.token_ids) for unit in outs for c in unit)
        t0 = time.perf_counter()
        refs = []
        for unit, comps in zip(units, outs, strict=True):
            for i, grp in enumerate(unit):
                grp.completions = comps[i * g.group_size:(i + 1) * g.group_size]
            texts = [c.text for c in comps]
            probs = [grp.problem for grp in unit for _ in range(g.group_size)]
            refs.append(score_remote(texts, probs, g.rewards, **self.score_options(comps)))
        for unit, res in zip(units, ray.get(refs), strict=True):
            for i, grp in enumerate(unit):
                sl = slice(i * g.group_size, (i + 1) * g.group_size)
                grp.rewards = list(res.total[sl])
                grp.per_reward = {k: list(v[sl]) for k, v in res.per_reward.items()}
                grp.failures = 0
            unit[0].failures = sum(res.failures.values())
            unit[0].reward_seconds = res.seconds
        times["score"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ async rollouts (one step off-policy)
    def prefetch(self, step: int, rows: list[np.ndarray]) -> None:
        if self.g.async_rollouts:
            self._next_rows = (step, [[int(i) for i in r] for r in rows])

    def launch_following(self, step: int, version: int | None) -> None:
        """Put step ``step + 1``'s rollouts in flight on the weights the pool holds now (the policy of step
        ``step``); scored in a background thread while the learner trains."""
        from concurrent.futures import ThreadPoolExecutor

        if self._next_rows is None or self._next_rows[0] != step + 1:
            return
        _, rows = self._next_rows
        self._next_rows = None
        micro = [[self.group(step + 1, i) for i in r] for r in rows]  # at their own step's difficulty
        times = new_times()
        units, ref, t0 = self._submit(step + 1, micro, version)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="r1ray-grpo-rollouts")
        self._pending = {"step": step + 1, "micro": micro, "times": times, "version": version,
                         "future": self._executor.submit(self._collect, units, ref, t0, times)}

    def _take_prefetched(self, step: int, rows: list[np.ndarray], times: dict[str, float],
                         m: Metrics) -> list[list[Group]] | None:
        """Step ``step``'s rollouts, started during the previous step (or restored from the checkpoint); None
        if there are none (the run's first step)."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        self.version = p["version"]
        if p["step"] != step:
            raise RuntimeError(f"grpo.async_rollouts: the rollouts in flight are step {p['step']}'s, the loop asks "
                               f"for step {step}'s")
        want = [[int(i) for i in r] for r in rows]
        if "by_index" in p:  # restored from a checkpoint (saved on any number of workers)
            missing = sorted(i for r in want for i in r if i not in p["by_index"])
            if missing:
                raise RuntimeError(f"grpo.async_rollouts: the checkpoint's in-flight rollouts of step {step} lack "
                                   f"problems {missing[:5]}")
            return [[p["by_index"][i] for i in r] for r in want]
        t0 = time.perf_counter()
        p["future"].result()
        m.mean("rollout_wait_seconds", time.perf_counter() - t0)
        if [[grp.index for grp in unit] for unit in p["micro"]] != want:
            raise RuntimeError(f"grpo.async_rollouts: step {step}'s rollouts were started for other problems")
        for k, v in p["times"].items():
            times[k] += v
        return p["micro"]

    def pending_state(self) -> dict[str, Any]:
        """The following step's rollouts (every worker's), as the checkpoint keeps them."""
        import torch.distributed as dist

        p = self._pending
        groups: list[dict[str, Any]] = []
        step = version = None
        if p is not None:
            step, version = p["step"], p["version"]
            if "future" in p:
                p["future"].result()
                groups = [grp.state() for unit in p["micro"] for grp in unit]
            else:
                groups = [grp.state() for grp in p["by_index"].values()]
        if dist.is_initialized() and self.worker.world_size > 1:
            every: list[Any] = [None] * self.worker.world_size
            dist.all_gather_object(every, {"step": step, "version": version, "groups": groups})
            steps = {e["step"] for e in every if e["step"] is not None}
            if len(steps) > 1:
                raise RuntimeError(f"grpo.async_rollouts: workers hold rollouts of different steps {sorted(steps)}")
            step = steps.pop() if steps else None
            version = next((e["version"] for e in every if e["step"] is not None), None)
            groups = [d for e in every for d in e["groups"]]
        return {"step": step, "version": version, "groups": groups}

    def load_pending(self, pending: dict[str, Any] | None) -> None:
        """Restore ``pending_state``'s rollouts (saved on any number of workers)."""
        if pending and pending.get("groups"):
            self._pending = {"step": int(pending["step"]), "version": pending.get("version"),
                             "by_index": {int(d["index"]): Group.from_state(d) for d in pending["groups"]}}

    # ------------------------------------------------------------------ fault injection
    def kill_mid_rollout(self, pid: int, what: str) -> None:
        """SIGKILL ``pid`` once units are in flight on the pool (a thread; the rollout goes on)."""

        def kill() -> None:
            deadline = time.time() + 60
            while self.pool.stats()["in_flight"] == 0 and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)
            log.warning("fault injection: SIGKILL %s pid %d mid-rollout", what, pid)
            os.kill(pid, signal.SIGKILL)

        threading.Thread(target=kill, daemon=True).start()
