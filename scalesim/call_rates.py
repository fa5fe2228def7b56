"""What a wake-up is worth: learned, per agent and blocking site, the time to the next LLM call.

The event queue says when an agent next *wakes*; the memory manager needs when it next *calls*.
In many worlds most wake-ups make no call (a person who goes out every day and asks the LLM only
when something happened), so :class:`CallRates` learns online how long after a wake-up the
agent's next call comes:

* a **site** is where an agent blocks: the kind of wait and the line of ``run()`` that issued it,
  or the label the world gave (``self.wait(60, label="outing")``);
* every wake-up at a site stays *open* until the agent's next call; the call at time ``c``
  resolves each open wake-up at ``w`` with a *lag* ``c - w`` (0 when the wake-up itself called);
* the expected lag of an agent at a site is its own mean lag shrunk toward the mean of every
  agent at that site (``prior_weight`` pseudo-observations), and 0 before anything was seen at
  the site: until the world shows otherwise, a wake-up is assumed to call.

The estimated next call of an agent blocked at a site is then its next wake-up plus that lag.
Open wake-ups are kept as a count and a sum of wake times per site, so a call costs O(sites the
agent woke at since its last call) and memory is O(agents x sites), whatever the number of
wake-ups. Wake-ups that no call ever resolves (the run ended first) are not counted.

It also keeps, per agent, the mean interval between wake-ups and between calls, which the
oracle's graph estimate (how soon a neighbour sends) and its last-resort estimate use.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable

Site = Hashable


class _Mean:
    """A running mean (count and sum)."""

    __slots__ = ("n", "total")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0

    def add(self, value: float, count: int = 1) -> None:
        self.n += count
        self.total += value

    @property
    def value(self) -> float:
        return self.total / self.n if self.n else 0.0


class _Interval:
    """Mean spacing of an agent's successive events (wake-ups or calls)."""

    __slots__ = ("last", "mean")

    def __init__(self) -> None:
        self.last: float | None = None
        self.mean = _Mean()

    def event(self, now: float) -> None:
        if self.last is not None:
            self.mean.add(now - self.last)
        self.last = now


class CallRates:
    """Online wake-up -> call statistics; see the module docstring."""

    def __init__(self, prior_weight: float = 4.0) -> None:
        self.prior_weight = prior_weight
        self._site: dict[Site, _Mean] = defaultdict(_Mean)
        self._agent_site: dict[tuple[str, Site], _Mean] = defaultdict(_Mean)
        #: agent -> site -> [open wake-ups, sum of their times]
        self._open: dict[str, dict[Site, list[float]]] = defaultdict(dict)
        self._wakes: dict[str, _Interval] = defaultdict(_Interval)
        self._calls: dict[str, _Interval] = defaultdict(_Interval)
        self._woke_since_call: set[str] = set()
        self.wakeups = 0
        self.wakeups_with_call = 0

    def woke(self, agent: str, site: Site, now: float, wakeup: bool = True) -> None:
        """``agent`` woke at ``now`` from a wait issued at ``site``.

        ``wakeup=False`` learns the lag from a moment that is not a wake-up (a call returned)
        without counting it among the agent's wake-ups.
        """
        if wakeup:
            self.wakeups += 1
            self._wakes[agent].event(now)
            self._woke_since_call.add(agent)
        pending = self._open[agent].setdefault(site, [0.0, 0.0])
        pending[0] += 1
        pending[1] += now

    def called(self, agent: str, now: float) -> None:
        """``agent`` called the LLM at ``now``: resolve its open wake-ups."""
        self._calls[agent].event(now)
        if agent in self._woke_since_call and self._wakes[agent].last == now:
            self.wakeups_with_call += 1  # this very wake-up made the call
        self._woke_since_call.discard(agent)
        open_sites = self._open.pop(agent, None)
        if not open_sites:
            return
        for site, (count, times) in open_sites.items():
            n = int(count)
            lag_sum = n * now - times
            self._site[site].add(lag_sum, n)
            self._agent_site[agent, site].add(lag_sum, n)

    def forget(self, agent: str) -> None:
        """``agent`` left the simulation: its open wake-ups will never be resolved."""
        self._open.pop(agent, None)
        self._woke_since_call.discard(agent)

    def lag(self, agent: str, site: Site) -> float:
        """Expected time from a wake-up of ``agent`` at ``site`` to its next call."""
        # Asked for in nearly every estimate of the oracle: the pooled mean is read off its
        # count and sum here rather than through _Mean.value, a call each time.
        pooled = self._site.get(site)
        if pooled is None or not pooled.n:
            return 0.0
        pooled_mean = pooled.total / pooled.n
        own = self._agent_site.get((agent, site))
        if own is None or not own.n:
            return pooled_mean
        k = self.prior_weight
        return (own.total + k * pooled_mean) / (own.n + k)

    def wake_interval(self, agent: str) -> float | None:
        """Mean time between ``agent``'s wake-ups (``None`` before its second one)."""
        interval = self._wakes.get(agent)
        return interval.mean.value if interval is not None and interval.mean.n else None

    def wake_count(self, agent: str) -> int:
        interval = self._wakes.get(agent)
        return interval.mean.n + 1 if interval is not None and interval.last is not None else 0

    def call_interval(self, agent: str) -> float | None:
        """Mean time between ``agent``'s calls (``None`` before its second one)."""
        interval = self._calls.get(agent)
        return interval.mean.value if interval is not None and interval.mean.n else None

    def last_call(self, agent: str) -> float:
        """When ``agent`` last called (``-inf``: never)."""
        interval = self._calls.get(agent)
        return interval.last if interval is not None and interval.last is not None else -math.inf

    def summary(self) -> dict[str, object]:
        """Per-site call rates for ``summary.json``: the sites with the most wake-ups first."""
        sites = sorted(self._site.items(), key=lambda item: -item[1].n)[:8]
        return {
            "wakeups": self.wakeups,
            #: the share of wake-ups that called the LLM before the agent blocked again
            "wakeups_then_call": round(self.wakeups_with_call / self.wakeups, 4)
            if self.wakeups else None,
            "sites": {(" ".join(map(str, site)) if isinstance(site, tuple) else str(site)): {
                "resolved_wakeups": m.n, "mean_lag": round(m.value, 3)}
                      for site, m in sites},
        }
