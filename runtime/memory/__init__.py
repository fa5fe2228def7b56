"""Agent memory management: objects, tiers, policies, the copy engine and the manager.

:class:`MemoryManager` keeps the memory objects of agents (:class:`LoRAAdapter`,
:class:`PrefixKV`, :class:`ModelWeights` or a world's own :class:`AgentMemory` kind) on the device
within a byte budget, under a named policy (``scalesim``, ``lru``, ``lfu``, ``fifo``, ``belady``,
``infinite``, ``none``). Distance-driven policies read a :class:`DistanceSource`; the simulation
supplies one (``scalesim.distance.DistanceOracle``), this package never imports it.
"""

from runtime.memory.copy_engine import CopyEngine, Transfer
from runtime.memory.distance import DistanceSource, FutureSequence
from runtime.memory.manager import MemoryManager, WorkingSetTooLarge
from runtime.memory.objects import (AgentMemory, LoRAAdapter, ModelWeights, PrefixKV,
                                    TensorMemory, tensors_nbytes)
from runtime.memory.policies import POLICIES, Policy, make_policy

__all__ = [
    "AgentMemory", "CopyEngine", "DistanceSource", "FutureSequence", "LoRAAdapter",
    "MemoryManager", "ModelWeights", "POLICIES", "Policy", "PrefixKV", "TensorMemory",
    "Transfer", "WorkingSetTooLarge", "make_policy", "tensors_nbytes",
]
