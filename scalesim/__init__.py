"""ScaleSim: LLM-driven multi-agent simulations with a memory-efficient serving runtime.

Write a :class:`World` of :class:`Agent` processes, then run it from a YAML file with
``python -m scalesim.run world.yaml`` or from Python with :func:`simulate`; read a run back with
:func:`load_trace`.
"""

from scalesim.agent import Agent, Message
from scalesim.config import ConfigError, RunConfig, load_config
from scalesim.environment import LLMCall, SimEnvironment
from scalesim.simulation import Simulation, simulate
from scalesim.stopping import RunFailed, RunInterrupted
from scalesim.trace import RunResult, load_trace
from scalesim.turns import TurnOrder
from scalesim.world import World

__all__ = [
    "Agent",
    "ConfigError",
    "LLMCall",
    "Message",
    "RunConfig",
    "RunFailed",
    "RunInterrupted",
    "RunResult",
    "SimEnvironment",
    "TurnOrder",
    "World",
    "load_config",
    "Simulation",
    "load_trace",
    "simulate",
]
