"""The modeled executor: the same scheduler and memory manager, with a cost model's clock.

* :mod:`~runtime.executors.modeled.chat`: token counts and placeholder (or replayed) replies;
* :mod:`~runtime.executors.modeled.link`: the virtual clock and the host link on it;
* :mod:`~runtime.executors.modeled.objects`: agent memory objects that are only sizes;
* :mod:`~runtime.executors.modeled.executor`: the executor that advances batches in modeled time.

Every number it produces is *modeled*, labelled with its hardware and model profile.
"""

from runtime.executors.modeled.chat import FILLER, LengthChat, ReplayChat
from runtime.executors.modeled.executor import ModeledExecutor
from runtime.executors.modeled.link import ModeledCopyEngine, VirtualClock
from runtime.executors.modeled.objects import ModeledMemory

__all__ = ["FILLER", "LengthChat", "ModeledCopyEngine", "ModeledExecutor", "ModeledMemory",
           "ReplayChat", "VirtualClock"]
