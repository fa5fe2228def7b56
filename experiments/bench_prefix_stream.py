"""Recorded multi-turn request streams replayed against the server, with and without prefix reuse.

Part (a) of the prefix benchmark (issue #24, scope 6a; part (b), the salon world in-process, is
``experiments/bench_prefix.py``). Four request streams, shaped like what unmodified simulators
send to an OpenAI-compatible endpoint, are generated from a seed, written to
``experiments/results/streams/<name>.jsonl`` (``results/quick/streams/`` for ``--quick``) and
replayed from those files against an in-process ``scalesim.serve`` server, once per variant:

=========== ================================================================================
oasis       N agents share one long system prompt and 9 tool schemas (``tools=[...]``); every
            step each agent sends its whole conversation plus a new observation of its feed;
            on most steps its reply carries a tool call, the tool's result follows and a second
            request (ending with the tool result) is sent, as camel's ``ChatAgent`` does
agentscope  a group chat: every agent has a persona of its own; messages carry ``name`` fields
            and content-part arrays (``[{"type": "text", ...}]``); agents speak in turn and
            each sends the whole conversation so far
concordia   a game master that sends one long (~1,000-token) prompt again and again with small
            changes at its end (and a growing record of events before them), and entities
            that share Concordia's one system prompt and whose prompts grow with what they saw
salon       built the way ``worlds/salon.py``'s guests build theirs (``LLMAgent`` with
            ``history_turns``): shared house rules and a persona in one system prompt, the
            growing user/assistant history, the older half folded into a summary turn once it
            passes ``history_turns`` exchanges (a client that rewrites its history)
=========== ================================================================================

A stream is a list of ``(agent, request body)`` in order; each request also has a *wave*: the
requests of one wave are sent at once (concurrently, as the framework's agents act within one
step) and the next wave waits for them. Where a request repeats an earlier reply (the agent's own
assistant turn, or another agent's line in a group chat), the recording holds a marker
``{"$reply": k}`` (the reply to the stream's request ``k``) and the replay puts in the text the
server answered, exactly as the client got it: a recording is replayable against any model.

Variants, side by side in one run (the server's ``runtime`` section):

=============== ===============================================================================
no reuse        ``memory.policy: none``: nothing kept between calls
persona only    ``prefix_cache: persona``, ``lru``: only each request's system prompt (and tool
                schemas) is cached, the reuse the engine had before the token-level cache
tokens + lru    the token-level prefix cache, least recently used segments evicted (SGLang's way)
tokens+scalesim the token-level cache under the distance policy (no hints are sent: a server
                without hints sees what an unmodified simulator sends; its distances come from
                the stream estimator, ``serve.stream_estimator``, on by default)
unbounded       ``memory.policy: unlimited``: the token-level cache with no budget (the ideal)
=============== ===============================================================================

The unbounded run goes first: the budgeted variants get ``--budget-fraction`` (default 0.25) of
the prefix KV it holds at its end (``engine.report()["memory"]["device_used_bytes"]``), and
evicted segments are dropped (``host_bytes: 0``). For each stream and variant: requests, prompt
tokens, cached tokens (``usage.prompt_tokens_details.cached_tokens``), computed = prompt -
cached, the share reused and the wall seconds of the replay (plus modeled seconds on the modeled
engine). The last line is a JSON headline (kept as ``results/bench_prefix_stream.json``).

By default the server runs the modeled engine (Qwen2.5-7B profile on an H100; no weights). Its
replies are placeholder text, generated as filler token ids: the client sends the text back as
the assistant turn, whose ids (chunk ids of the text) differ from the generated fillers, so the
modeled cache cannot reuse a reply's own tokens, only everything before it (the previous
request in full). ``--real`` replays small streams on SmolLM2-135M on the CPU instead, where a
reply sent back as it was received re-tokenizes to (nearly) the tokens the model generated.

    python -m experiments.bench_prefix_stream [--quick] [--real] [--budget-fraction 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from experiments.harness import headline
from experiments.results_dir import results_dir
from scalesim.config import load_serve_config
from scalesim.serve import build_server

VARIANTS: dict[str, dict[str, Any]] = {
    "no reuse": {"memory": {"policy": "none"}},
    "persona only": {"prefix_cache": "persona", "memory": {"policy": "lru"}},
    "tokens + lru": {"memory": {"policy": "lru"}},
    "tokens + scalesim": {"memory": {"policy": "scalesim"}},
    "unbounded": {"memory": {"policy": "unlimited"}},
}
BUDGETED = ("persona only", "tokens + lru", "tokens + scalesim")
MODEL = {"modeled": "qwen2.5-7b", "real": "smollm2-135m"}

#: Placeholder replies of the modeled engine (one per call, in turn).
MODELED_REPLIES = ["I think so too, and I will say it again tomorrow.",
                   "That is interesting; tell me more about it.",
                   "Let us wait and see what happens next.",
                   "I disagree, but politely."]

# -- building the streams ------------------------------------------------------------------------

Body = dict[str, Any]


def quoted(value: Any) -> Iterator[int]:
    """The requests whose replies ``value`` quotes (its reply markers)."""
    if isinstance(value, list):
        for v in value:
            yield from quoted(v)
    elif isinstance(value, dict):
        if set(value) == {"$reply"}:
            yield int(value["$reply"])
        else:
            for v in value.values():
                yield from quoted(v)


def reply_of(index: int) -> dict[str, int]:
    """The marker standing for the text the server answered to the stream's request ``index``."""
    return {"$reply": index}


@dataclass
class Stream:
    """A request stream being recorded: ``(wave, agent, body)`` in order."""

    name: str
    max_tokens: int
    entries: list[tuple[int, str, Body]] = field(default_factory=list)

    def add(self, wave: int, agent: str, messages: list[dict[str, Any]], **extra: Any) -> int:
        """Record one request (a deep copy of ``messages``); returns its index in the stream.

        The request goes in ``wave``, or in a later one when it quotes a reply of that wave or
        later (an agent that answers twice in one round waits for its first answer)."""
        body: Body = {"model": "replay", "messages": json.loads(json.dumps(messages)),
                      "max_tokens": self.max_tokens, "temperature": 0, **extra}
        for index in quoted(messages):
            wave = max(wave, self.entries[index][0] + 1)
        self.entries.append((wave, agent, body))
        return len(self.entries) - 1

    @property
    def next_wave(self) -> int:
        """The wave after the last one recorded so far."""
        return max((w for w, _, _ in self.entries), default=-1) + 1

    def write(self, path: Path) -> Path:
        """One JSON object per line: ``{"i", "wave", "agent", "body"}``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for i, (wave, agent, body) in enumerate(self.entries):
                f.write(json.dumps({"i": i, "wave": wave, "agent": agent, "body": body}) + "\n")
        return path


WORDS = ("market river bridge garden letter harvest lantern festival story bakery mayor "
         "teacher council rumour weather train library concert painting recipe ferry storm "
         "museum election school fountain orchard bicycle newspaper theatre").split()


def sentence(rng: random.Random, words: int) -> str:
    """A deterministic filler sentence of ``words`` words."""
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


OASIS_SYSTEM = (
    "# OBJECTIVE\nYou're a Twitter user, and I'll present you with some posts. After you see "
    "the posts, choose some actions from the following functions.\n\n# SELF-DESCRIPTION\nYour "
    "actions should be consistent with your self-description and personality. You are one of "
    "many users of a social media platform that simulates how information spreads and how "
    "opinions form. Read the posts of the accounts you follow and of the recommendation system, "
    "then decide: like a post you agree with, repost what you find important, follow users "
    "whose posts you enjoy, comment when you have something to add, or do nothing when nothing "
    "interests you.\n\n# RESPONSE METHOD\nPlease perform actions by tool calling. Consider "
    "the platform's rules: be respectful, do not spread content you know to be false, and keep "
    "comments short. ") * 2
OASIS_TOOLS = [
    ("create_post", "Create a new post with the given content.", {"content": "string"}),
    ("like_post", "Like the post with the given id.", {"post_id": "integer"}),
    ("dislike_post", "Dislike the post with the given id.", {"post_id": "integer"}),
    ("repost", "Repost the post with the given id.", {"post_id": "integer"}),
    ("quote_post", "Quote the post with the given id and add a comment.",
     {"post_id": "integer", "quote_content": "string"}),
    ("follow", "Follow the user with the given id.", {"followee_id": "integer"}),
    ("unfollow", "Stop following the user with the given id.", {"followee_id": "integer"}),
    ("create_comment", "Comment on the post with the given id.",
     {"post_id": "integer", "content": "string"}),
    ("do_nothing", "Perform no action this step.", {}),
]


def oasis_tools() -> list[dict[str, Any]]:
    """The 9 function schemas, in the OpenAI ``tools`` format."""
    return [{"type": "function", "function": {
        "name": name, "description": doc,
        "parameters": {"type": "object", "properties": {k: {"type": t} for k, t in args.items()},
                       "required": list(args)}}} for name, doc, args in OASIS_TOOLS]


def oasis_stream(seed: int, agents: int, steps: int, max_tokens: int) -> Stream:
    """OASIS-shaped: one shared system prompt and tool schemas, growing tool-calling histories.

    Agents are told apart by the request's ``user`` field (their system prompts are equal)."""
    rng = random.Random(seed)
    stream = Stream("oasis", max_tokens)
    tools = oasis_tools()
    convs: list[list[dict[str, Any]]] = [[{"role": "system", "content": OASIS_SYSTEM}]
                                         for _ in range(agents)]
    for step in range(steps):
        firsts: list[int] = []
        for a, conv in enumerate(convs):
            feed = "\n".join(f"post_id {rng.randrange(1000)}, user {rng.randrange(agents)}: "
                             f"{sentence(rng, 12)} ({rng.randrange(50)} likes)" for _ in range(3))
            conv.append({"role": "user", "content": "Please perform social media actions after "
                         "observing the platform environments. Here is your social media "
                         f"environment: After refreshing, you see some posts:\n{feed}"})
            firsts.append(stream.add(2 * step, f"user{a}", conv, tools=tools, user=f"user{a}"))
        for a, conv in enumerate(convs):
            if rng.random() < 0.7:  # the reply acts: a tool call, its result, a second request
                name, _, args = rng.choice(OASIS_TOOLS)
                call_args = {k: rng.randrange(1000) if t == "integer" else sentence(rng, 6)
                             for k, t in args.items()}
                call_id = f"call_{step}_{a}"
                conv.append({"role": "assistant", "content": reply_of(firsts[a]),
                             "tool_calls": [{"id": call_id, "type": "function", "function": {
                                 "name": name, "arguments": json.dumps(call_args)}}]})
                conv.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(
                    {"success": True, "id": rng.randrange(10_000)})})
                second = stream.add(2 * step + 1, f"user{a}", conv, tools=tools,
                                    user=f"user{a}")
                conv.append({"role": "assistant", "content": reply_of(second)})
            else:
                conv.append({"role": "assistant", "content": reply_of(firsts[a])})
    return stream


PERSONA_TRAITS = ["cheerful", "grumpy", "shy", "witty", "pompous", "kind", "curious", "tired"]
PERSONA_JOBS = ["baker", "poet", "sailor", "doctor", "banker", "gardener", "painter", "judge"]


def concat(*pieces: Any) -> dict[str, list[Any]]:
    """A text made of strings and reply markers, joined on replay."""
    return {"$concat": list(pieces)}


def lines(items: list[Any]) -> list[Any]:
    """``items`` with a newline after each, for :func:`concat`."""
    return [piece for item in items for piece in (item, "\n")]


def parts(text: Any) -> list[dict[str, Any]]:
    """AgentScope's content-part array of one text (or reply marker)."""
    return [{"type": "text", "text": text}]


def agentscope_stream(seed: int, agents: int, rounds: int, max_tokens: int) -> Stream:
    """AgentScope-shaped: personas of their own, a group chat with ``name``d content parts.

    Agents speak in turn (one request per wave); each sends its persona, then every message of
    the chat so far: its own as assistant turns, the others' as named user turns."""
    rng = random.Random(seed)
    stream = Stream("agentscope", max_tokens)
    names = [f"Agent{a}" for a in range(agents)]
    personas = [f"You're {n}, a {rng.choice(PERSONA_TRAITS)} {rng.choice(PERSONA_JOBS)} living "
                f"in a small village. {sentence(rng, 40)} {sentence(rng, 40)} Speak in the first "
                "person, in one or two sentences, and address the others by name."
                for n in names]
    chat: list[tuple[str, Any]] = [("Host", parts(
        "Welcome to the village meeting. Today we decide how to spend the harvest money. "
        "Everyone, please say what you think in turn."))]
    wave = 0
    for _ in range(rounds):
        for a, name in enumerate(names):
            messages: list[dict[str, Any]] = [{"role": "system", "content": parts(personas[a])}]
            for speaker, content in chat:
                if speaker == name:
                    messages.append({"role": "assistant", "name": name, "content": content})
                else:
                    messages.append({"role": "user", "name": speaker, "content": content})
            index = stream.add(wave, name, messages)
            wave += 1
            chat.append((name, parts(reply_of(index))))
    return stream


CONCORDIA_SYSTEM = (
    "You always continue sentences provided by the user and you never repeat what the user "
    "already said. All responses must end with a period. Try not to use lists, but if you "
    "must, then always delimit list items using either semicolons or single newlines (\"\\n\"), "
    "never delimit list items with double newlines (\"\\n\\n\").")


def concordia_stream(seed: int, entities: int, steps: int, max_tokens: int) -> Stream:
    """Concordia-shaped: a game master's long prompt repeated with small changes at its end.

    Each step the entities act (one wave, their prompts growing with what they observed), then
    the game master resolves each action in turn: the same ~1,000-token context (world rules,
    the record of events so far) with the action and the question at its end. The resolved
    event is appended to the record, so the game master's prompt also grows. Everyone shares
    Concordia's one system prompt and is told apart by ``user``."""
    rng = random.Random(seed)
    stream = Stream("concordia", max_tokens)
    names = [f"Entity{e}" for e in range(entities)]
    world = ("Game master instructions. This is a social science experiment. It is structured "
             "as a tabletop roleplaying game (like dungeons and dragons). You are the game "
             "master and storyteller. Your job is to make the experience fun and realistic and "
             "to decide what happens as a consequence of the players' actions. " +
             " ".join(sentence(rng, 14) for _ in range(48)))
    record: list[Any] = []  # resolved events, as text with reply markers
    cards = {n: f"{n}'s identity: {sentence(rng, 30)} {sentence(rng, 30)}" for n in names}
    seen: dict[str, list[Any]] = {n: [] for n in names}
    wave = 0
    for step in range(steps):
        actions: dict[str, int] = {}
        for n in names:
            prompt = concat(f"{cards[n]}\nObservations of {n}:\n", *lines(seen[n]),
                            f"\n\nQuestion: It is step {step}. What would {n} do next? "
                            f"Answer: {n} would")
            actions[n] = stream.add(wave, n, [{"role": "system", "content": CONCORDIA_SYSTEM},
                                              {"role": "user", "content": prompt}], user=n)
        wave += 1
        for n in names:
            prompt = concat(f"{world}\n\nEvents so far:\n", *lines(record),
                            f"\n\nPutative event: {n} attempts: ", reply_of(actions[n]),
                            f"\nQuestion: What happens as a result of {n}'s attempt? Answer:")
            resolved = stream.add(wave, "game_master",
                                  [{"role": "system", "content": CONCORDIA_SYSTEM},
                                   {"role": "user", "content": prompt}], user="game_master")
            wave += 1
            record.append(concat(f"[step {step}] {n}: ", reply_of(resolved)))
            for other in names:
                seen[other].append(concat(f"[step {step}] ", reply_of(resolved)))
    return stream


SALON_RULES = (
    "House rules of the salon. Guests speak one at a time and keep each remark to one "
    "short sentence. Be courteous: no insults, no shouting, no talking over others. Stay "
    "on the evening's topics: books, music, travel, food and the news of the town. When "
    "someone addresses you, answer them directly before changing the subject. Do not "
    "repeat what you already said tonight. The host may ring the bell; then the room "
    "falls silent. Refreshments are served in the garden room after the first hour. ")
SALON_TOPICS = ["a novel you are reading", "a journey you made", "a dish you cooked",
                "a concert", "the town's new bridge", "an old friend",
                "the weather this season", "a painting"]


def salon_stream(seed: int, guests: int, remarks: int, max_tokens: int, rules_repeat: int = 2,
                 history_turns: int = 8) -> Stream:
    """Salon-shaped: requests built the way ``worlds/salon.py``'s guests build theirs.

    Guests make ``remarks`` remarks in rounds (one wave per round); a remark is answered by a
    neighbour half of the time, who sends the line it heard as its next prompt. Each guest
    keeps ``LLMAgent``'s running conversation: its older half folded into one summary turn
    once it passes ``history_turns`` exchanges. A summary quotes earlier replies, so it holds
    reply markers inside its text."""
    rng = random.Random(seed)
    stream = Stream("salon", max_tokens)
    rules = SALON_RULES * rules_repeat
    personas = [f"{rules}\nYou are guest {g}, a {rng.choice(PERSONA_TRAITS)} "
                f"{rng.choice(PERSONA_JOBS)}." for g in range(guests)]
    history: list[list[tuple[str, Any]]] = [[] for _ in range(guests)]

    def call(wave: int, g: int, prompt: Any) -> int:
        messages: list[dict[str, Any]] = [{"role": "system", "content": personas[g]}]
        messages += [{"role": role, "content": text} for role, text in history[g]]
        messages.append({"role": "user", "content": prompt})
        index = stream.add(wave, f"guest{g}", messages, stop=["\n"])
        history[g] += [("user", prompt), ("assistant", reply_of(index))]
        if len(history[g]) > 2 * history_turns:  # LLMAgent._fold_history
            keep = 2 * (history_turns // 2)
            old, history[g] = history[g][:-keep], history[g][-keep:]
            said = [text for role, text in old if role == "assistant"]
            history[g].insert(0, ("user", {"$summary": said}))
        return index

    wave = 0
    for _ in range(remarks):
        said = {g: call(wave, g, f"Make one remark to the room about {rng.choice(SALON_TOPICS)}.")
                 for g in range(guests)}
        wave += 1
        answers = [(g, (g + rng.choice((-1, 1))) % guests) for g in range(guests)
                   if rng.random() < 0.5]
        for speaker, listener in answers:
            call(wave, listener, {"$answer": [f"guest{speaker}", reply_of(said[speaker])]})
        wave = stream.next_wave
    return stream


def build_streams(seed: int, quick: bool, real: bool) -> list[Stream]:
    """The four streams at the sizes of the run."""
    if quick:
        return [oasis_stream(seed, 4, 3, 16), agentscope_stream(seed, 3, 3, 16),
                concordia_stream(seed, 2, 3, 16), salon_stream(seed, 4, 4, 16)]
    if real:  # CPU, SmolLM2-135M: small streams
        return [oasis_stream(seed, 3, 3, 12), agentscope_stream(seed, 3, 3, 12),
                concordia_stream(seed, 2, 2, 12), salon_stream(seed, 6, 4, 12, rules_repeat=2)]
    return [oasis_stream(seed, 32, 8, 32), agentscope_stream(seed, 8, 6, 32),
            concordia_stream(seed, 6, 8, 32), salon_stream(seed, 32, 12, 32, rules_repeat=4)]


# -- replaying a recorded stream -------------------------------------------------------------------

def read_stream(path: Path) -> list[dict[str, Any]]:
    """A recorded stream's entries, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resolve(value: Any, replies: dict[int, str]) -> Any:
    """``value`` with every reply marker replaced by the text the server answered.

    ``{"$reply": k}`` is request ``k``'s reply; ``{"$concat": [...]}`` the text of its pieces
    (strings and markers) joined; ``{"$summary": [...]}`` is ``LLMAgent``'s
    summary of the replies listed; ``{"$answer": [speaker, k]}`` is the salon's prompt to
    answer ``speaker``'s line ``k``."""
    if isinstance(value, list):
        return [resolve(v, replies) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"$reply"}:
        return replies[int(value["$reply"])]
    if set(value) == {"$concat"}:
        return "".join(str(resolve(v, replies)) for v in value["$concat"])
    if set(value) == {"$summary"}:
        said = [s for s in (resolve(v, replies) for v in value["$summary"]) if s]
        return f"(Earlier in this conversation you said: {' / '.join(said)[-600:] or 'nothing'})"
    if set(value) == {"$answer"}:
        speaker, line = value["$answer"]
        text = resolve(line, replies) or "..."  # LLMAgent.say's default
        return f"{speaker} says to you: \"{text}\" Answer {speaker} in one sentence."
    return {k: resolve(v, replies) for k, v in value.items()}


def first_line(text: str) -> str:
    """What a client keeps of a reply: its first non-empty line, stripped (``LLMAgent``)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


@dataclass
class ReplayResult:
    """Totals of one replay."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    wall_s: float = 0.0
    modeled_s: float | None = None
    kv_bytes: int = 0

    def row(self) -> dict[str, Any]:
        computed = self.prompt_tokens - self.cached_tokens
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "computed_tokens": computed,
                "reused_share": round(self.cached_tokens / self.prompt_tokens, 4)
                if self.prompt_tokens else 0.0,
                "wall_s": round(self.wall_s, 2),
                **({"modeled_s": round(self.modeled_s, 3)} if self.modeled_s is not None
                   else {}), "kv_bytes": self.kv_bytes}


async def replay(url: str, model: str, entries: list[dict[str, Any]]) -> ReplayResult:
    """Send ``entries`` wave by wave (a wave's requests at once), putting in the replies."""
    result = ReplayResult()
    replies: dict[int, str] = {}
    waves: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        waves.setdefault(int(entry["wave"]), []).append(entry)

    async with httpx.AsyncClient(timeout=600) as client:
        async def send(entry: dict[str, Any]) -> None:
            body = resolve(entry["body"], replies)
            body["model"] = model
            response = await client.post(f"{url}/chat/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"request {entry['i']} ({entry['agent']}) failed: "
                                   f"{response.status_code} {response.text[:300]}")
            data = response.json()
            message = data["choices"][0]["message"]
            replies[int(entry["i"])] = first_line(message.get("content") or "")
            usage = data["usage"]
            result.requests += 1
            result.prompt_tokens += int(usage["prompt_tokens"])
            result.cached_tokens += int((usage.get("prompt_tokens_details") or {})
                                        .get("cached_tokens") or 0)

        start = time.perf_counter()
        for wave in sorted(waves):
            await asyncio.gather(*(send(e) for e in waves[wave]))
        result.wall_s = time.perf_counter() - start
    return result


# -- the server ------------------------------------------------------------------------------------

def server_config(real: bool, variant: str, device_bytes: int | None) -> dict[str, Any]:
    """The server's configuration for one variant (``device_bytes``: the budget, if any)."""
    overrides = VARIANTS[variant]
    memory: dict[str, Any] = {**overrides["memory"]}
    if device_bytes is not None:
        memory.update(device_bytes=device_bytes, host_bytes=0)
    runtime: dict[str, Any] = {"model": MODEL["real" if real else "modeled"], "memory": memory}
    if "prefix_cache" in overrides:
        runtime["prefix_cache"] = overrides["prefix_cache"]
    if real:
        runtime.update(executor="torch", kv_cache_tokens=32768)
    else:
        runtime.update(executor="modeled", max_num_seqs=256, max_batch_tokens=8192,
                       modeled={"hardware": "H100", "lora_rank": 0, "output_tokens": 16,
                                "replies": MODELED_REPLIES})
    return {"runtime": runtime, "serve": {"port": 0, "max_pending": 1024}}


def run_variant(path: Path, real: bool, variant: str, device_bytes: int | None
                ) -> ReplayResult:
    """Replay the stream recorded at ``path`` against a fresh server of ``variant``."""
    entries = read_stream(path)
    server_of = build_server(load_serve_config(server_config(real, variant, device_bytes)))
    with server_of.running() as server:
        url = f"http://127.0.0.1:{server.port}/v1"
        result = asyncio.run(replay(url, MODEL["real" if real else "modeled"], entries))
        report = server.engine.report()
        result.kv_bytes = int(report["memory"].get("device_used_bytes") or 0)
        if not real and "modeled" in report:
            result.modeled_s = float(report["modeled"]["modeled_makespan_s"])
    return result


def compare(path: Path, real: bool, fraction: float) -> dict[str, Any]:
    """Every variant on one recorded stream; the unbounded run first (it sizes the budget)."""
    rows = {"unbounded": run_variant(path, real, "unbounded", None).row()}
    budget = max(1, int(rows["unbounded"]["kv_bytes"] * fraction))
    for variant in VARIANTS:
        if variant != "unbounded":
            rows[variant] = run_variant(path, real, variant,
                                        budget if variant in BUDGETED else None).row()
    rows = {v: rows[v] for v in VARIANTS}  # the table's order
    name = path.stem
    for variant, row in rows.items():
        modeled = f" modeled {row['modeled_s']:8.3f} s" if "modeled_s" in row else ""
        print(f"{name:11s} {variant:18s} requests {row['requests']:5d} prompt "
              f"{row['prompt_tokens']:8d} cached {row['cached_tokens']:8d} computed "
              f"{row['computed_tokens']:8d} reused {row['reused_share']:6.1%} wall "
              f"{row['wall_s']:7.2f} s{modeled}", flush=True)
    computed = {v: r["computed_tokens"] for v, r in rows.items()}
    return {"budget_bytes": budget, "working_set_bytes": rows["unbounded"]["kv_bytes"],
            "reused_share": {v: r["reused_share"] for v, r in rows.items()},
            "computed_persona_over_tokens_lru": round(
                computed["persona only"] / max(1, computed["tokens + lru"]), 3),
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small streams (smoke test)")
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M on the CPU (small streams) instead of the modeled "
                             "engine")
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streams", default="oasis,agentscope,concordia,salon",
                        help="comma-separated stream names")
    args = parser.parse_args()
    wanted = args.streams.split(",")
    out = results_dir(args.quick)
    label = "real" if args.real else "modeled"
    line: dict[str, Any] = {"experiment": "bench_prefix_stream", "engine": label,
                            "model": MODEL[label], "budget_fraction": args.budget_fraction,
                            "seed": args.seed, "streams": {}}
    details: dict[str, Any] = {}
    for stream in build_streams(args.seed, args.quick, args.real):
        if stream.name not in wanted:
            continue
        suffix = "_real" if args.real else ""
        path = stream.write(out / "streams" / f"{stream.name}{suffix}.jsonl")
        result = compare(path, args.real, args.budget_fraction)
        details[stream.name] = result.pop("rows")
        line["streams"][stream.name] = result
    (out / f"bench_prefix_stream_{label}_rows.json").write_text(
        json.dumps(details, indent=1) + "\n")
    headline(line, keep_as="bench_prefix_stream" + ("_real" if args.real else ""),
             quick=args.quick)


if __name__ == "__main__":
    main()
