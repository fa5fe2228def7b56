"""A tiny AgentScope multi-agent script, unmodified apart from its base URL.

Two villagers (AgentScope ``Agent`` objects on ``OpenAIChatModel``) talk for a few turns; the
only ScaleSim-specific thing is where the OpenAI credential points (``base_url``). Run by
``make realclient`` with the client venv's Python: ``python agentscope_village.py BASE_URL``.
"""

from __future__ import annotations

import asyncio
import sys

import agentscope
from agentscope.agent import Agent
from agentscope.credential import OpenAICredential
from agentscope.message import Msg, TextBlock
from agentscope.model import OpenAIChatModel


def villager(name: str, persona: str, base_url: str) -> Agent:
    model = OpenAIChatModel(
        credential=OpenAICredential(api_key="not-needed", base_url=base_url),
        model="smollm2-135m", stream=True, max_retries=0, context_size=8192,
        parameters=OpenAIChatModel.Parameters(max_tokens=48))
    return Agent(name=name, system_prompt=persona, model=model)


async def main(base_url: str) -> int:
    alice = villager("Alice", "You are Alice, the baker of Maple Hollow. Be brief.", base_url)
    bob = villager("Bob", "You are Bob, the blacksmith of Maple Hollow. Be brief.", base_url)
    msg = Msg(name="Narrator", role="user",
              content=[TextBlock(text="Good morning! What will you do today?")])
    replies = 0
    for turn in range(3):
        for agent in (alice, bob):
            msg = await agent.reply(msg)
            text = msg.get_text_content() or ""
            print(f"[turn {turn}] {agent.name}: {text[:120]!r}", flush=True)
            replies += 1
    print(f"agentscope {agentscope.__version__}: {replies} replies", flush=True)
    return 0 if replies == 6 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
