"""Engine replicas as Ray actors (``runtime.cluster: ray``).

:class:`RayCluster` starts one Ray Core actor per replica, each an
:class:`~runtime.replica.EngineReplica` that builds its own engine (and loads its own model) in
its own process. The actors are placed by a placement group (one bundle of
``num_cpus``/``num_gpus`` per replica; ``PACK`` or ``SPREAD``). :meth:`RayCluster.dispatch` sends
every replica its batch at once and waits for all: the replicas step concurrently. An actor that
died answers with :class:`~runtime.replica.ReplicaDied` instead of a result.

Without an ``address`` a local Ray instance is started (and shut down by :meth:`close`); with one
(``ray.address``, e.g. ``auto`` or ``ray://head:10001``) the cluster is joined and left as it
was. Ray is an optional extra: :func:`import_ray` raises :class:`RayUnavailable`, one line
naming it, when it is not installed.
"""

from __future__ import annotations

from collections import abc
from typing import Any, Callable

from runtime.engine import Engine
from runtime.replica import EngineReplica, ReplicaBatch, ReplicaDied, ReplicaResult
from runtime.request import Turn

#: seconds to wait for the placement group before saying the cluster is too small
PLACEMENT_TIMEOUT_S = 120.0


class RayUnavailable(RuntimeError):
    """``cluster: ray`` was asked for but Ray is not installed."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailable` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("ray needs Ray, which is not installed; "
                             "install the ray extra: pip install 'scalesim[ray]'") from None
    return ray


class RayCluster:
    """``replicas`` :class:`~runtime.replica.EngineReplica` actors (see the module docstring)."""

    name = "ray"

    def __init__(self, replicas: int, build: Callable[[], Engine], *,
                 address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 strategy: str = "PACK") -> None:
        ray = self.ray = import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._remove_placement_group = remove_placement_group
        self._dead: dict[int, str] = {}
        self._final: dict[int, dict[str, Any]] = {}
        self.actors: list[Any] = []
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        bundle: dict[str, float] = {"CPU": num_cpus}
        if num_gpus:
            bundle["GPU"] = num_gpus
        self.group = placement_group([dict(bundle) for _ in range(replicas)], strategy=strategy)
        try:
            ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"the Ray cluster cannot place {replicas} replicas of {bundle} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (resources: {ray.cluster_resources()})") from None
        actor = ray.remote(EngineReplica)
        self.actors = [
            actor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              placement_group=self.group, placement_group_bundle_index=i)
                          ).remote(i, build)
            for i in range(replicas)]
        self._described = [ray.get(a.describe.remote()) for a in self.actors]

    def size(self) -> int:
        return len(self.actors)

    def describe(self) -> list[dict[str, Any]]:
        return list(self._described)

    def listen(self) -> None:
        self.ray.get([actor.listen.remote() for actor in self.actors])

    def encode(self, replica: int, prefix: str, prompt: str,
               history: abc.Sequence[Turn] = ()) -> tuple[list[int], list[int]]:
        ids: tuple[list[int], list[int]] = self.ray.get(
            self.actors[replica].encode.remote(prefix, prompt, tuple(history)))
        return ids

    def dispatch(self, batches: dict[int, ReplicaBatch]) -> dict[int, ReplicaResult | ReplicaDied]:
        ray = self.ray
        refs = {i: self.actors[i].step.remote(batch) for i, batch in batches.items()}
        out: dict[int, ReplicaResult | ReplicaDied] = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                reason = f"Ray actor lost ({type(exc).__name__})"
                self._dead[i] = reason
                out[i] = ReplicaDied(i, reason)
        return out

    def report(self, replica: int) -> dict[str, Any]:
        if replica in self._final:  # closed: what the actor said before it stopped
            return self._final[replica]
        if replica in self._dead or not self.actors:
            return {"sections": {}, "totals": {}}
        report: dict[str, Any] = self.ray.get(self.actors[replica].report.remote())
        return report

    def close(self) -> None:
        """Stop the actors (their engines), remove the placement group, stop a started Ray.

        Each live actor's report is kept first: the run directory is written after the engine
        is closed.
        """
        ray = self.ray
        for i, actor in enumerate(self.actors):
            if i not in self._dead:
                try:
                    self._final[i] = ray.get(actor.report.remote(), timeout=30)
                    ray.get(actor.close.remote(), timeout=30)
                except Exception:  # a dying actor cannot close; it is killed below anyway
                    self._dead[i] = "closing failed"
            ray.kill(actor)
        self.actors = []
        self._remove_placement_group(self.group)
        if self._started:
            ray.shutdown()
            self._started = False
