"""A small OASIS (camel-oasis 0.2.5) Reddit simulation, unmodified apart from where the model is.

Sixteen users (made-up profiles written to a JSON file, OASIS's Reddit profile format) on one
Reddit platform; user 0 opens with a manual post, then every user acts through the LLM for
``--steps`` steps (OASIS's ``LLMAction``: camel's ``ChatAgent`` sends the agent's system prompt,
the refreshed feed and nine action tools, and OASIS runs the tool the model calls). camel's
client keeps its defaults: a 180 s timeout and 3 retries.

What is ScaleSim-specific: the model is camel's ``OPENAI_COMPATIBLE_MODEL`` pointed at the
server by base URL, and camel's token counter is given explicitly, because the default one for
an OpenAI-compatible model (tiktoken's ``o200k_base``) downloads its vocabulary from the
internet on first use. camel lets a caller pass any ``BaseTokenCounter``; this one counts
UTF-8 bytes / 4, offline (camel uses the count only to trim the agent's memory to the context,
which two steps never reach).

Prints each step's wall time and the rows OASIS wrote to its database (posts, comments, likes
and the ``trace`` table of every action, tool calls included), and exits 1 when no action of
the LLM steps came from a tool call. Run by ``make realclient-oasis`` with the OASIS venv's
Python: ``python oasis_reddit.py BASE_URL [--steps N] [--agents N] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

TOOLS = ("LIKE_POST", "DISLIKE_POST", "CREATE_POST", "CREATE_COMMENT", "LIKE_COMMENT",
         "DISLIKE_COMMENT", "SEARCH_POSTS", "FOLLOW", "DO_NOTHING")
TOPICS = ("gardening", "chess", "jazz", "cycling", "baking", "astronomy", "football", "poetry",
          "birdwatching", "woodworking", "sailing", "photography", "robotics", "hiking",
          "cooking", "film")
MBTI = ("INTJ", "ENFP", "ISTP", "ESFJ")
SEED_POST = "Hello Reddit! What hobby should everyone try this year?"


def profiles(n: int) -> list[dict[str, object]]:
    """``n`` Reddit users in OASIS's profile format, told apart by name and interest."""
    return [{"realname": f"User {i}", "username": f"user{i}_{TOPICS[i % len(TOPICS)]}",
             "bio": f"I post about {TOPICS[i % len(TOPICS)]}.",
             "persona": f"A {20 + i}-year-old who loves {TOPICS[i % len(TOPICS)]} and enjoys "
                        "friendly discussions online.",
             "age": 20 + i, "gender": "female" if i % 2 else "male",
             "mbti": MBTI[i % len(MBTI)], "country": "UK"} for i in range(n)]


def counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        out = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # noqa: S608
               for t in ("post", "comment", "like", "dislike", "follow", "trace")}
        out["llm_actions"] = con.execute(  # every action but signing up, the feed, the seed
            "SELECT COUNT(*) FROM trace WHERE action NOT IN ('sign_up', 'refresh', 'exit') "
            "AND info NOT LIKE ?", (f"%{SEED_POST}%",)).fetchone()[0]
    return out


async def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    (workdir / "log").mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # OASIS opens ./log/*.log when it is imported
    from camel.models import ModelFactory
    from camel.types import ModelPlatformType
    from camel.utils.token_counting import BaseTokenCounter

    import oasis
    from oasis import ActionType, LLMAction, ManualAction, generate_reddit_agent_graph

    class ByteCounter(BaseTokenCounter):
        """About four UTF-8 bytes a token, offline."""

        def count_tokens_from_messages(self, messages: list) -> int:  # type: ignore[type-arg]
            return sum(len(json.dumps(m, ensure_ascii=False).encode()) // 4 + 4
                       for m in messages)

        def encode(self, text: str) -> list[int]:
            return list(text.encode())[::4]

        def decode(self, token_ids: list[int]) -> str:
            return bytes(token_ids).decode(errors="replace")

    model = ModelFactory.create(model_platform=ModelPlatformType.OPENAI_COMPATIBLE_MODEL,
                                model_type="smollm2-135m", url=args.base_url, api_key="x",
                                token_counter=ByteCounter())
    profile_path = workdir / "reddit_users.json"
    profile_path.write_text(json.dumps(profiles(args.agents)))
    db = workdir / "reddit.db"
    db.unlink(missing_ok=True)
    graph = await generate_reddit_agent_graph(
        profile_path=str(profile_path), model=model,
        available_actions=[getattr(ActionType, t) for t in TOOLS])
    env = oasis.make(agent_graph=graph, platform=oasis.DefaultPlatformType.REDDIT,
                     database_path=str(db))
    await env.reset()
    await env.step({env.agent_graph.get_agent(0): ManualAction(
        action_type=ActionType.CREATE_POST,
        action_args={"content": SEED_POST})})
    for step in range(args.steps):
        t0 = time.monotonic()
        await env.step({agent: LLMAction() for _, agent in env.agent_graph.get_agents()})
        print(f"[step {step}] {time.monotonic() - t0:.1f} s; database {counts(db)}", flush=True)
    await env.close()
    after = counts(db)
    acted = after["llm_actions"]
    print(f"camel-oasis {oasis.__version__}: {args.agents} agents, {args.steps} steps; "
          f"actions from tool calls: {acted}; database {after}", flush=True)
    return 0 if acted > 0 else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base_url")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--workdir", default="runs/realclient-oasis/oasis")
    sys.exit(asyncio.run(main(p.parse_args())))
