"""A pool of generation engines as Ray actors: GRPO rollouts, generation-based evaluation, batch inference.

One named controller actor (no CPU of its own) owns N engine actors, each in its own one-bundle placement
group, so the pool never competes with the training workers' placement group and can grow, shrink or
replace one engine without touching the others. Any process of the Ray job finds the pool by name::

    pool = EnginePool.start("grpo-pool", "outputs/runs/sft/final", n=2, cpus_per_engine=1)   # the driver
    pool = EnginePool.connect("grpo-pool")                                                    # a worker
    outs = pool.generate(prompt_ids, SamplingParams(max_tokens=64, seed=7))
    seconds = pool.update_weights(model.state_dict(), version=step)       # one ray.put, loaded in place
    pool.resize(3); pool.stop()

Reproducible results. Work travels in *units*: consecutive runs of ``unit_size`` prompts (or the explicit
units of ``generate_units``). A unit is generated alone on one engine, admitted as one batch with nothing
else beside it, so its completions are a pure function of (weights, unit contents, sampling params with
their seeds): which engine runs it, how many engines there are, what other units are in flight, and
whether an engine died and the unit was regenerated elsewhere change nothing. (Batch-invariance of the
engine itself is not assumed: logits can differ in the last bits when batch shapes change, and a sampled
token with them.) GRPO makes one unit per micro-batch of prompt groups, a function of the global sample
index alone.

Faults. An engine that dies (SIGKILL, OOM, a lost node) is detected when a call to it fails; the controller
starts a replacement in the same placement-group bundle, loads the newest pushed weights into it, and runs
the failed unit again. ``update_weights`` waits until no unit is in flight and holds new ones back until
every engine carries the new version, so a unit never mixes two policies; ``generate(..., version=v)``
raises if any unit was produced by other weights.

The weights pushed last are kept as an object reference so that replacements load them; the object is
owned by the process that pushed it (a training worker): if that process dies too, the next push (a
restarted learner always pushes before it generates) brings the pool back to a known version.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from r1ray.infer.types import Completion, SamplingParams
from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["DEFAULT_UNIT_SIZE", "NAMESPACE", "EnginePool", "pack_state_dict", "unpack_state_dict"]

NAMESPACE = "r1ray"
"""Ray namespace of every pool's controller (so any job process finds it by name)."""
DEFAULT_UNIT_SIZE = 32
"""Prompts per unit in ``EnginePool.generate`` (a unit is generated alone, as one batch, on one engine)."""
_MAX_QUEUE = 1 << 16


def pack_state_dict(state_dict: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    """``{name: tensor}`` -> ``{name: (numpy array, torch dtype name)}`` for the object store (zero-copy reads
    on the engines; bf16, which numpy lacks, travels as its raw int16 bits)."""
    import torch

    out = {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        dtype = str(t.dtype).replace("torch.", "")
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        out[name] = (t.numpy(), dtype)
    return out


def unpack_state_dict(packed: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    """Inverse of ``pack_state_dict`` (tensors share the arrays' memory; read-only object-store buffers)."""
    import torch

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": the engine copies, never writes
        for name, (arr, dtype) in packed.items():
            t = torch.from_numpy(arr)
            if dtype == "bfloat16":
                t = t.view(torch.bfloat16)
            out[name] = t
    return out


# --------------------------------------------------------------------------------------------------
# The engine actor
# --------------------------------------------------------------------------------------------------


class _EngineActor:
    """One engine (``make_engine``) in a Ray actor; units run one at a time."""

    def __init__(self, model_path: str, engine_kwargs: dict[str, Any]):
        from r1ray.infer import make_engine

        self.engine = make_engine(model_path, max_queue=_MAX_QUEUE, **engine_kwargs)
        self._unit = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def version(self) -> int:
        return int(self.engine.weights_version)

    def generate_unit(self, prompts: list[Any], params: list[SamplingParams]) -> tuple[list[Completion], int]:
        """Generate one unit alone: the HF engine admits it as one batch (its batch limit is the unit's size, so
        the scheduler takes every sequence of it before the first step, and nothing else joins)."""
        with self._unit:
            n = max(1, len(prompts))
            if self.engine.backend == "hf" and self.engine.max_batch_size != n:
                # An idle HF scheduler already computed its batch room from the old limit (while waiting for
                # the next sequence): restart it so its first admission sees this unit's size.
                self.engine.shutdown()
                self.engine.max_batch_size = n
            out = self.engine.generate(prompts, params)
            return out, int(self.engine.weights_version)

    def load_weights(self, packed: dict[str, tuple[Any, str]], version: int) -> float:
        t0 = time.perf_counter()
        with self._unit:
            self.engine.update_weights(unpack_state_dict(packed), int(version))
        return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# The controller actor
# --------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    id: int
    pg: Any
    actor: Any
    cpus: float


class _PoolController:
    """Owns the engines: schedules units on free engines, replaces dead ones, pushes weights, resizes."""

    def __init__(self, name: str, model_path: str, n: int, cpus_per_engine: float, gpus_per_engine: float,
                 engine_kwargs: dict[str, Any]):
        self.name, self.model_path = name, model_path
        self.cpus, self.gpus = float(cpus_per_engine), float(gpus_per_engine)
        self.engine_kwargs = dict(engine_kwargs)
        self.slots: dict[int, _Slot] = {}
        self._next_id = 0
        self._free: asyncio.Queue[int] | None = None
        self._weights: list[Any] = []  # [ObjectRef] of the newest pushed weights (a list: never resolved here)
        self.version = 0
        self.replacements = 0
        self.units_done = 0
        self.in_flight = 0
        self._cond: asyncio.Condition | None = None
        self._writer = False
        self._initial = n
        self._tickets = 0
        self._running: dict[int, asyncio.Future] = {}  # begin_units tickets not yet collected by result
        self._starting: asyncio.Future | None = None
        self._life = os.urandom(3).hex()  # in placement-group names: a restarted controller's never collide
        import ray

        # Restarted by Ray after a crash (max_restarts): this __init__ runs again with the same arguments; the old
        # engines and their placement groups died with the old process (they were its own), so the first call
        # starts fresh ones, on the initial weights, until a client pushes the current ones again.
        with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated actor_id
            warnings.simplefilter("ignore")
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if self.restarted:
            log.warning("engine pool %s: the controller restarted; engines start again on the first call", name)

    # ---- startup (async: the actor's event loop exists only inside methods)
    async def start(self) -> int:
        if self._starting is None or (self._starting.done() and self._starting.exception() is not None):
            self._starting = asyncio.ensure_future(self._start())
        await self._starting
        return len(self.slots)

    async def _start(self) -> None:
        self._free = self._free or asyncio.Queue()
        self._cond = self._cond or asyncio.Condition()
        if self.restarted:
            self._remove_stale_groups()
        await asyncio.gather(*(self._add_slot() for _ in range(self._initial - len(self.slots))))

    def _remove_stale_groups(self) -> None:
        """Remove the placement groups a previous life of this controller left (Ray frees them with their dead
        creator, but not always before the new life asks for the same CPUs)."""
        import ray
        from ray.util.placement_group import placement_group_table, remove_placement_group

        for info in placement_group_table().values():
            name = info.get("name") or ""
            if name.startswith(f"{self.name}-engine-") and info.get("state") != "REMOVED":
                try:
                    remove_placement_group(ray.util.get_placement_group(name))
                    log.info("engine pool %s: removed placement group %s of the controller's previous life",
                             self.name, name)
                except Exception:  # noqa: BLE001 - removed meanwhile
                    pass

    def pid(self) -> int:
        return os.getpid()

    def _engine_options(self, pg: Any) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return dict(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_concurrency=4,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))

    async def _new_actor(self, pg: Any, attempts: int = 5) -> Any:
        """A new engine in ``pg``, with the newest pushed weights; one that dies while it starts is started again."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in range(attempts):
            actor = ray.remote(_EngineActor).options(**self._engine_options(pg)).remote(
                self.model_path, self.engine_kwargs)
            try:
                await actor.pid.remote()
                if self._weights:
                    await actor.load_weights.remote(self._weights[0], self.version)
                return actor
            except (RayActorError, ActorUnavailableError) as e:
                if attempt == attempts - 1:
                    raise
                log.warning("engine pool %s: an engine died while it started (%s); starting another", self.name,
                            type(e).__name__)
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - it is dead already
                    pass
        raise AssertionError("unreachable")

    async def _add_slot(self) -> None:
        from ray.util.placement_group import placement_group

        sid = self._next_id
        self._next_id += 1
        bundle = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        pg = placement_group([bundle], name=f"{self.name}-engine-{self._life}-{sid}")
        await pg.ready()
        actor = await self._new_actor(pg)
        self.slots[sid] = _Slot(sid, pg, actor, self.cpus)
        self._free.put_nowait(sid)
        log.info("engine pool %s: engine %d up (%d engines)", self.name, sid, len(self.slots))

    async def _replace(self, sid: int, err: BaseException) -> None:
        import ray

        slot = self.slots.get(sid)
        if slot is None:
            return
        self.replacements += 1
        log.warning("engine pool %s: engine %d died (%s); starting a replacement", self.name, sid,
                    type(err).__name__)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        slot.actor = await self._new_actor(slot.pg)

    # ---- a readers/writer gate: units share it, weight pushes and resizes take it alone
    async def _enter(self, writer: bool) -> None:
        async with self._cond:
            if writer:
                await self._cond.wait_for(lambda: not self._writer)
                self._writer = True
                await self._cond.wait_for(lambda: self.in_flight == 0)
            else:
                await self._cond.wait_for(lambda: not self._writer)
                self.in_flight += 1

    async def _leave(self, writer: bool) -> None:
        async with self._cond:
            if writer:
                self._writer = False
            else:
                self.in_flight -= 1
            self._cond.notify_all()

    # ---- generation
    async def _run_unit(self, prompts: list[Any], params: list[SamplingParams]) -> tuple[list[Completion], int]:
        from ray.exceptions import ActorUnavailableError, RayActorError

        while True:
            sid = await self._free.get()
            slot = self.slots.get(sid)
            if slot is None:  # removed by a resize
                continue
            try:
                out = await slot.actor.generate_unit.remote(prompts, params)
            except (RayActorError, ActorUnavailableError) as e:
                try:
                    await self._replace(sid, e)
                finally:
                    if sid in self.slots:
                        self._free.put_nowait(sid)
                continue  # the same unit again, alone, on whichever engine is free next
            self._free.put_nowait(sid)
            self.units_done += 1
            return out

    async def generate_units(self, units: list[list[Any]], params: list[list[SamplingParams]],
                             version: int | None = None) -> list[list[Completion]]:
        await self.start()
        await self._enter(writer=False)
        return await self._entered_units(units, params, version)

    async def begin_units(self, units: list[list[Any]], params: list[list[SamplingParams]],
                          version: int | None = None) -> int:
        """Admit the units now (a later weight push waits for them) and generate them in the background;
        returns a ticket for ``result``."""
        await self.start()
        await self._enter(writer=False)
        self._tickets += 1
        self._running[self._tickets] = asyncio.ensure_future(self._entered_units(units, params, version))
        return self._tickets

    async def result(self, ticket: int) -> list[list[Completion]]:
        return await self._running.pop(ticket)

    async def _entered_units(self, units: list[list[Any]], params: list[list[SamplingParams]],
                             version: int | None) -> list[list[Completion]]:
        try:
            results = await asyncio.gather(*(self._run_unit(u, p) for u, p in zip(units, params, strict=True)))
        finally:
            await self._leave(writer=False)
        if version is not None:
            bad = sorted({v for _, v in results if v != version})
            if bad:
                raise RuntimeError(f"engine pool {self.name}: units were generated by weights version(s) {bad}, "
                                   f"expected {version} (push the weights with update_weights first)")
        return [out for out, _ in results]

    # ---- weights
    async def update_weights(self, ref: list[Any], version: int) -> float:
        from ray.exceptions import ActorUnavailableError, RayActorError

        await self.start()
        await self._enter(writer=True)
        try:
            t0 = time.perf_counter()
            self._weights, self.version = list(ref), int(version)
            slots = list(self.slots.values())
            results = await asyncio.gather(*(s.actor.load_weights.remote(ref[0], version) for s in slots),
                                           return_exceptions=True)
            for s, r in zip(slots, results, strict=True):
                if isinstance(r, (RayActorError, ActorUnavailableError)):
                    await self._replace(s.id, r)  # the replacement loads these weights
                elif isinstance(r, BaseException):
                    raise r
            return time.perf_counter() - t0
        finally:
            await self._leave(writer=True)

    # ---- size and health
    async def resize(self, n: int) -> int:
        import ray
        from ray.util.placement_group import remove_placement_group

        if n < 1:
            raise ValueError(f"an engine pool needs at least 1 engine, got n={n}")
        await self.start()
        await self._enter(writer=True)
        try:
            while len(self.slots) > n:
                slot = self.slots.pop(max(self.slots))
                ray.kill(slot.actor, no_restart=True)
                remove_placement_group(slot.pg)
                log.info("engine pool %s: engine %d removed (%d engines)", self.name, slot.id, len(self.slots))
            await asyncio.gather(*(self._add_slot() for _ in range(n - len(self.slots))))
            return len(self.slots)
        finally:
            await self._leave(writer=True)

    async def health(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Ping every engine; replace those that do not answer. Returns the stats after."""
        await self.start()
        for s in list(self.slots.values()):
            try:
                await asyncio.wait_for(s.actor.pid.remote(), timeout_s)
            except Exception as e:  # noqa: BLE001 - dead, unreachable or hung: replace it
                await self._replace(s.id, e)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {"engines": len(self.slots), "version": self.version, "replacements": self.replacements,
                "units_done": self.units_done, "in_flight": self.in_flight, "restarted": self.restarted}

    async def actors(self) -> list[Any]:
        await self.start()
        return [self.slots[k].actor for k in sorted(self.slots)]

    async def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for s in list(self.slots.values()):
            try:
                ray.kill(s.actor, no_restart=True)
                remove_placement_group(s.pg)
            except Exception:  # noqa: BLE001 - best effort at teardown
                log.warning("engine pool %s: could not stop engine %d cleanly", self.name, s.id, exc_info=True)
        self.slots.clear()


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


class EnginePool:
    """A handle on a named pool of engine actors (cheap to create; pickles by name)."""

    def __init__(self, name: str, controller: Any):
        self.name, self._controller = name, controller
        self._pushed: tuple[Any, int] | None = None  # (ObjectRef, version) of the weights this client pushed last
        self.controller_restarts = 0  # restarts this client saw and recovered from

    def __reduce__(self):
        return (EnginePool.connect, (self.name,))

    @classmethod
    def start(cls, name: str, model_path: str, n: int = 1, cpus_per_engine: float = 1.0, *,
              gpus_per_engine: float = 0.0, backend: str = "hf", device: str = "auto", dtype: str = "auto",
              torch_threads: int | None = None, max_model_len: int | None = None, seed: int = 0) -> EnginePool:
        """Start ``n`` engines on ``model_path`` (a Hugging Face directory) under the name ``name``; returns
        when every engine has loaded. ``torch_threads`` defaults to the engine's CPUs (at least 1)."""
        import ray

        if n < 1:
            raise ValueError(f"an engine pool needs at least 1 engine, got n={n}")
        if cpus_per_engine <= 0 and gpus_per_engine <= 0:
            raise ValueError("cpus_per_engine or gpus_per_engine must be > 0")
        kwargs = dict(backend=backend, device=device, dtype=dtype, max_model_len=max_model_len, seed=seed,
                      torch_threads=torch_threads or max(1, int(cpus_per_engine)), batch_wait_timeout_s=1.0)
        t0 = time.perf_counter()
        # Restartable: a controller that dies comes back under the same name (its engines start again on the first
        # call), and clients recover their calls (``_call``). Calls in flight when it dies fail (no task retries).
        controller = ray.remote(_PoolController).options(
            name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=1000,
            lifetime=None).remote(name, str(model_path), n, cpus_per_engine, gpus_per_engine, kwargs)
        pool = cls(name, controller)
        try:
            pool._call("start")  # a controller that dies while starting comes back and starts again
        except BaseException:
            ray.kill(controller, no_restart=True)
            raise
        log.info("engine pool %s: %d %s engine(s) on %s in %.1fs", name, n, backend, model_path,
                 time.perf_counter() - t0)
        return pool

    @classmethod
    def connect(cls, name: str, timeout_s: float = 60.0) -> EnginePool:
        """The running pool named ``name`` (waits up to ``timeout_s`` for it to appear)."""
        import ray

        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                return cls(name, ray.get_actor(name, namespace=NAMESPACE))
            except ValueError:
                if time.perf_counter() > deadline:
                    raise ValueError(f"no engine pool named {name!r} in namespace {NAMESPACE!r}") from None
                time.sleep(0.2)

    # ---- calls that survive a controller restart
    def _call(self, method: str, *args: Any) -> Any:
        """``ray.get`` of a controller method; if the controller dies meanwhile, wait until Ray has restarted it,
        push the weights this client pushed last again (a restarted controller starts its engines on the initial
        weights), and call again. Units are a function of (weights, contents), so the result is the one the call
        would have returned. A client that never pushed weights cannot restore them: a call of it that names a
        weights version then fails the version check (the restarted controller holds the initial weights), and
        the training worker group restarts from its checkpoint (the learner pushes before it generates)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        for attempt in range(3):
            try:
                return ray.get(getattr(self._controller, method).remote(*args))
            except (RayActorError, ActorUnavailableError) as e:
                if isinstance(e, RayTaskError) or attempt == 2:  # the method failed (an engine's death inside it)
                    raise
                self._recover(e)
        raise AssertionError("unreachable")

    def _recover(self, err: BaseException) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        log.warning("engine pool %s: the controller failed (%s); waiting for Ray to restart it", self.name,
                    type(err).__name__)
        deadline = time.perf_counter() + 120
        while True:
            try:
                stats = ray.get(self._controller.stats.remote(), timeout=10)
                break
            except (RayActorError, ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.5)
        self.controller_restarts += 1
        if self._pushed is None:  # nothing pushed from here: the initial weights, or another process restores them
            return  # (a call that names a version fails its version check until then: the worker group restarts)
        ref, version = self._pushed
        if stats["version"] != version:
            ray.get(self._controller.update_weights.remote([ref], version))
            log.warning("engine pool %s: controller back; weights version %d pushed again", self.name, version)

    # ---- generation
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 *, unit_size: int = DEFAULT_UNIT_SIZE, version: int | None = None) -> list[Completion]:
        """Completions of ``prompts`` (text or token ids), in order. Consecutive ``unit_size`` prompts form a
        unit (see the module doc): the result does not depend on the pool's size or on engine faults."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        if unit_size < 1:
            raise ValueError(f"unit_size must be >= 1, got {unit_size}")
        units = [list(prompts[i:i + unit_size]) for i in range(0, len(prompts), unit_size)]
        uparams = [plist[i:i + unit_size] for i in range(0, len(prompts), unit_size)]
        return [c for unit in self.generate_units(units, uparams, version=version) for c in unit]

    def generate_units(self, units: Sequence[Sequence[Any]], params: Sequence[Sequence[SamplingParams]], *,
                       version: int | None = None) -> list[list[Completion]]:
        """Each unit generated alone on one engine (its completions a function of its contents only)."""

        units, params = _checked_units(units, params)
        if not units:
            return []
        return self._call("generate_units", units, params, version)

    def submit_units(self, units: Sequence[Sequence[Any]], params: Sequence[Sequence[SamplingParams]], *,
                     version: int | None = None) -> Any:
        """``generate_units`` without waiting: a handle for ``collect`` (None for no units). The units are in
        flight once this returns (the controller admits them in ``begin_units`` before answering), so a later
        ``update_weights`` waits for them and they run on the weights in place now."""
        units, params = _checked_units(units, params)
        if not units:
            return None
        ticket = self._call("begin_units", units, params, version)
        return _Submitted(self._controller.result.remote(ticket), units, params, version, self._pushed)

    def collect(self, submitted: Any) -> list[list[Completion]]:
        """The completions of ``submit_units``. If the controller died while they were in flight, they are
        generated again, on the weights in place when they were submitted (the same completions)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        if submitted is None:
            return []
        try:
            return ray.get(submitted.ref)
        except (RayActorError, ActorUnavailableError) as e:
            if isinstance(e, ray.exceptions.RayTaskError):
                raise
            self._recover(e)
        if submitted.pushed is not None and submitted.pushed != self._pushed:  # submitted before a later push
            ray.get(self._controller.update_weights.remote([submitted.pushed[0]], submitted.pushed[1]))
        try:
            return self._call("generate_units", submitted.units, submitted.params, submitted.version)
        finally:
            if submitted.pushed is not None and self._pushed is not None and submitted.pushed != self._pushed:
                self._call("update_weights", [self._pushed[0]], self._pushed[1])

    # ---- weights, size, health
    def update_weights(self, state_dict: Mapping[str, Any], version: int) -> float:
        """Put ``state_dict`` in the object store once and load it into every engine in place (after the
        units in flight finish; none start until every engine has it). Returns the seconds it took."""
        import ray

        t0 = time.perf_counter()
        ref = ray.put(pack_state_dict(state_dict))
        self._pushed = (ref, int(version))  # kept: a restarted controller gets them again from here
        self._call("update_weights", [ref], int(version))
        return time.perf_counter() - t0

    def resize(self, n: int) -> int:
        """Grow or shrink to ``n`` engines (after the units in flight finish); returns the new size."""

        return self._call("resize", int(n))

    def health(self) -> dict[str, Any]:
        """Ping every engine, replace those that are gone; returns ``stats()``."""

        return self._call("health")

    def stats(self) -> dict[str, Any]:
        """``engines``, weights ``version``, ``replacements`` so far, ``units_done``, ``in_flight``."""

        return self._call("stats")

    def actors(self) -> list[Any]:
        """The engine actors' handles (tests and drills: ``ray.get(actor.pid.remote())``)."""

        return self._call("actors")

    def controller_pid(self) -> int:
        """The controller's process id (fault drills)."""
        return int(self._call("pid"))

    def size(self) -> int:
        return int(self.stats()["engines"])

    def stop(self) -> None:
        """Stop every engine, free their placement groups and the controller."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            ray.get(self._controller.stop.remote())
        except (RayActorError, ActorUnavailableError) as e:  # it died: its engines and groups went with it
            log.warning("engine pool %s: the controller was gone at stop (%s)", self.name, type(e).__name__)
        finally:
            ray.kill(self._controller, no_restart=True)


@dataclass
class _Submitted:
    """``submit_units``' handle: the result's ref, and what is needed to generate the units again."""

    ref: Any
    units: list[list[Any]]
    params: list[list[SamplingParams]]
    version: int | None
    pushed: tuple[Any, int] | None


def _checked_units(units: Sequence[Sequence[Any]], params: Sequence[Sequence[SamplingParams]]):
    units = [[list(p) if not isinstance(p, str) else p for p in u] for u in units]
    params = [list(p) for p in params]
    for i, (u, p) in enumerate(zip(units, params, strict=True)):
        if len(u) != len(p):
            raise ValueError(f"unit {i}: {len(u)} prompts but {len(p)} sampling params")
    return units, params
