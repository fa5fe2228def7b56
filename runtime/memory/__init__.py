"""Agent memory management: objects, tiers, policies, the copy engine and the manager.

:class:`MemoryManager` keeps the memory objects of agents (an :class:`AdapterFile`, a
:class:`ModelWeights`, the torch executor's pooled adapters and prefix KV, or a world's own
:class:`AgentMemory` kind) on the device within a byte budget, under a named policy
(``scalesim``, ``lru``, ``lfu``, ``fifo``, ``belady``, ``infinite``, ``unlimited``, ``none``)
over a host tier, a disk tier and a persistent :class:`KVStore`, and reports every operation
as a :class:`MemoryEvent`. Distance-driven policies read a :class:`DistanceSource`; the
simulation supplies one (``scalesim.distance.DistanceOracle``), this package never imports it.
"""

from runtime.memory.copy_engine import CopyEngine, CopyLink, Transfer
from runtime.memory.distance import DistanceSource, FutureSequence, OrderedDistanceSource
from runtime.memory.events import MemoryEvent
from runtime.memory.kv_store import KVStore
from runtime.memory.manager import MemoryManager, WorkingSetTooLarge
from runtime.memory.object_file import CorruptObjectFile
from runtime.memory.objects import (AdapterFile, AgentMemory, ModelWeights, TensorMemory,
                                    tensors_nbytes)
from runtime.memory.policies import POLICIES, Policy, make_policy
from runtime.memory.totals import MemoryTotals

__all__ = [
    "AdapterFile", "AgentMemory", "CopyEngine", "CopyLink", "CorruptObjectFile", "DistanceSource",
    "FutureSequence", "KVStore", "MemoryEvent", "MemoryManager", "MemoryTotals", "ModelWeights",
    "OrderedDistanceSource", "POLICIES", "Policy", "TensorMemory", "Transfer", "WorkingSetTooLarge",
    "make_policy", "tensors_nbytes",
]
