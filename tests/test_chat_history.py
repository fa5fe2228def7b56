"""Multi-turn requests: each turn of an agent's conversation stays a token prefix of its next call.

The token-prefix property is checked on the modeled stand-in (:class:`LengthChat`), on a
character-level ChatML tokenizer (fast) and on the real SmolLM2 tokenizer (slow). A request of
turn ``k`` is ``(persona, history_k, prompt_k)``; the next request's history is ``history_k``,
the user turn ``prompt_k`` and the reply. What must hold: the ids of request ``k`` are a prefix
of the ids of request ``k + 1``, and what follows them there is the reply's own tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.executors.modeled import LengthChat, ReplayChat
from runtime.model.chat import ChatFormat
from scalesim import Agent, SimEnvironment, World

# Texts that make BPE merges want to cross turn boundaries: spaces and newlines at the edges,
# punctuation, digits, accents, CJK and an emoji (outside the Basic Multilingual Plane).
ALPHABET = st.sampled_from(list(" \n\t.,!?'\"-:abcdeXYZ0123é中😀<>/|"))
TEXT = st.text(ALPHABET, max_size=40)
EXCHANGES = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4)
PERSONA = st.sampled_from(["", "You are Ada, a baker.", " Lead space\n", "😀 persona. "])


def _requests(persona: str, exchanges: list[tuple[str, str]]
              ) -> list[tuple[str, str, tuple[dict[str, Any], ...], str]]:
    """``(prefix, prompt, history, reply)`` of each call of a growing conversation."""
    calls: list[tuple[str, str, tuple[dict[str, Any], ...], str]] = []
    history: tuple[dict[str, Any], ...] = ()
    for user, reply in exchanges:
        calls.append((persona, user, history, reply))
        history = history + ({"role": "user", "content": user},
                             {"role": "assistant", "content": reply})
    return calls


def _is_prefix(short: list[int], long: list[int]) -> bool:
    return long[:len(short)] == short


# -- the modeled stand-in ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(persona=PERSONA, exchanges=EXCHANGES)
def test_length_chat_requests_are_prefixes_of_the_next_ones(persona, exchanges):
    chat = LengthChat()
    previous: list[int] | None = None
    for prefix, prompt, history, _ in _requests(persona, exchanges):
        prefix_ids, prompt_ids = chat.encode(prefix, prompt, history)
        assert len(prefix_ids) == (chat.count(prefix) if prefix else 0)
        assert len(prompt_ids) == chat.count(prompt) + sum(chat.count(t["content"])
                                                           for t in history)
        ids = prefix_ids + prompt_ids
        if previous is not None:
            assert _is_prefix(previous, ids)
        previous = ids


@settings(max_examples=200, deadline=None)
@given(common=TEXT, a=TEXT, b=TEXT, per=st.sampled_from([4.0, 3.5, 1.0, 6.0]))
def test_length_chat_equal_text_prefixes_give_equal_id_prefixes(common, a, b, per):
    chat = LengthChat(chars_per_token=per)
    ids_a, ids_b = chat.encode("", common + a)[1], chat.encode("", common + b)[1]
    whole = int(len(common) // per)  # chunks that lie inside the common text
    assert ids_a[:whole] == ids_b[:whole]
    if common + a != common + b:
        assert ids_a != ids_b
    # The same text gives the same ids in a fresh instance (nothing depends on what was seen).
    assert LengthChat(chars_per_token=per).encode("", common + a)[1] == ids_a


def test_length_chat_counts_tokens_as_before():
    chat = LengthChat(chars_per_token=4, template_tokens=5)
    prefix_ids, prompt_ids = chat.encode("x" * 40, "hello")
    assert len(prefix_ids) == 5 + 10 and len(prompt_ids) == 5 + 2
    assert len(LengthChat(prefix_tokens=2048).encode("short", "p")[0]) == 2048
    assert chat.encode("", "")[1] == chat.encode("", "")[1] and len(chat.encode("", "")[1]) == 5


def test_length_chat_tells_texts_and_roles_apart():
    chat = LengthChat()
    personas = [chat.encode(f"You are agent {i}.", "")[0] for i in range(2000)]
    assert len({tuple(p) for p in personas}) == 2000  # no two agents' personas share ids
    as_user = chat.encode("", "p", [{"role": "user", "content": "same"}])[1]
    as_reply = chat.encode("", "p", [{"role": "assistant", "content": "same"}])[1]
    assert as_user != as_reply  # the role markers differ
    long = LengthChat(prefix_tokens=64)
    assert long.encode("You are a.", "")[0] != long.encode("You are b.", "")[0]


def test_length_chat_ids_do_not_depend_on_the_hash_salt():
    script = ("import json; from runtime.executors.modeled import LengthChat; "
              "c = LengthChat(); d = LengthChat(chars_per_token=3.0, prefix_tokens=32); "
              "h = ({'role': 'assistant', 'content': 'Hi 😀 there'},); "
              "print(json.dumps([c.encode('You are Ada.', 'What now?', h), "
              "d.encode('You are Ada.', 'What now?', h)]))")
    outputs = []
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__))))
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]


def test_replay_chat_passes_the_history_to_the_real_chat_format():
    import pandas as pd

    class Recording:
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def encode(self, prefix, prompt, history=()):
            self.seen.append(tuple(history))
            return [1], [2]

    inner = Recording()
    trace = pd.DataFrame({"request_id": [0], "agent": ["a"], "completion": ["x"],
                          "output_tokens": [1], "finish_reason": ["stop"]})
    history = ({"role": "user", "content": "hi"},)
    ReplayChat(inner, trace).encode("p", "q", history)
    assert inner.seen == [history]


# -- ChatFormat on a character-level ChatML tokenizer (fast) ----------------------------------------


class CharTokenizer:
    """ChatML rendering (SmolLM2's template, default system turn included) and one id per
    character, with ``<|im_start|>`` / ``<|im_end|>`` as single ids: enough to check the turn
    cutting without the real tokenizer. ``rewrite`` makes a template that is not incremental."""

    chat_template = "chatml"
    SPECIAL = {"<|im_start|>": 1, "<|im_end|>": 2}

    def __init__(self, rewrite: str = "") -> None:
        self.rewrite = rewrite

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = ""
        if messages and messages[0]["role"] != "system":
            text += "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
        for m in messages:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if self.rewrite == "count":  # says how many turns follow: every render differs
            text = f"[{len(messages)}]" + text
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def _encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for token, tid in self.SPECIAL.items():
                if text.startswith(token, i):
                    ids.append(tid)
                    i += len(token)
                    break
            else:
                ids.append(ord(text[i]) + 10)
                i += 1
        return ids

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self._encode(t) for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 10) for i in ids if i >= 10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(persona=PERSONA, exchanges=EXCHANGES)
def test_chat_format_cuts_turns_so_requests_are_prefixes_of_the_next(persona, exchanges):
    tok = CharTokenizer()
    chat = ChatFormat(tok)
    previous: list[int] | None = None
    first_prefix: list[int] | None = None
    for prefix, prompt, history, reply in _requests(persona, exchanges):
        prefix_ids, prompt_ids = chat.encode(prefix, prompt, history)
        messages = ([{"role": "system", "content": prefix}] if prefix else []) + list(history) \
            + [{"role": "user", "content": prompt}]
        assert prefix_ids + prompt_ids == tok._encode(tok.apply_chat_template(messages, True))
        first_prefix = prefix_ids if first_prefix is None else first_prefix
        assert prefix_ids == first_prefix and bool(prefix_ids) == bool(prefix)
        ids = prefix_ids + prompt_ids
        if previous is not None:
            assert _is_prefix(previous, ids)
        previous = ids


def test_chat_format_a_rewritten_history_shares_tokens_up_to_the_first_change():
    """A client that replaces old turns by a summary: the ids are those a fresh encoder gives
    (nothing stale comes out of the kept cuts), and the shared prefix ends at the change."""
    chat = ChatFormat(CharTokenizer())
    turns = tuple({"role": role, "content": f"{role} {i}"}
                  for i in range(3) for role in ("user", "assistant"))
    before = sum(chat.encode("You are Ada.", "next?", turns), [])
    summary = turns[:2] + ({"role": "user", "content": "(summary of turns 1-2)"},)
    after = sum(chat.encode("You are Ada.", "next?", summary), [])
    assert after == sum(ChatFormat(CharTokenizer()).encode("You are Ada.", "next?", summary), [])
    tok = CharTokenizer()
    unchanged = tok._encode(tok.apply_chat_template(
        [{"role": "system", "content": "You are Ada."}, *turns[:2]]))
    common = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert len(unchanged) <= common < len(before)


def test_chat_format_without_an_incremental_template_has_no_reusable_prefix():
    tok = CharTokenizer(rewrite="count")
    prefix_ids, prompt_ids = ChatFormat(tok).encode("You are Ada.", "hi",
                                                    [{"role": "user", "content": "a"}])
    assert prefix_ids == []
    full = tok.apply_chat_template([{"role": "system", "content": "You are Ada."},
                                    {"role": "user", "content": "a"},
                                    {"role": "user", "content": "hi"}], True)
    assert prompt_ids == tok._encode(full)


# -- the simulation side ----------------------------------------------------------------------------


class Chatty(Agent):
    """Keeps a running conversation and sends it with every call."""

    def __init__(self) -> None:
        super().__init__("ann", persona="P")
        self.chat: list[Any] = []
        self.done: list[Any] = []

    def run(self):
        for question in ("ab", "cde"):
            reply = yield self.llm(question, history=self.chat, max_tokens=8)
            self.done.append(reply)
            self.chat += [("user", question), {"role": "assistant", "content": reply.text}]


def test_agent_llm_sends_its_history(echo_engine):
    world = World(SimEnvironment(echo_engine), seed=0)
    agent = world.add(Chatty())
    world.env.run()
    first, second = agent.done
    # The echo engine's tokens are characters, the history's contents before the prompt.
    assert first.prompt_tokens == len("P") + len("ab")
    assert second.prompt_tokens == len("P") + len("ab") + len(first.text) + len("cde")


# -- the real SmolLM2 tokenizer (slow: the first use converts the model's GGUF) ---------------------


@pytest.fixture(scope="module")
def smol_chat() -> ChatFormat:
    from transformers import AutoTokenizer

    from runtime.model.loader import resolve_model

    return ChatFormat(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"),
                                                    local_files_only=True))


@pytest.mark.slow
def test_smollm2_single_turn_ids_are_the_templates_text_tokenized(smol_chat):
    tok = smol_chat.tokenizer
    messages = [{"role": "system", "content": "You are Ada, a cheerful baker."},
                {"role": "user", "content": "Who are you?"}]
    prefix_ids, prompt_ids = smol_chat.encode(messages[0]["content"], messages[1]["content"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prefix_ids + prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    head = tok.apply_chat_template(messages[:1], tokenize=False)
    assert prefix_ids == tok(head, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(persona=PERSONA, exchanges=EXCHANGES)
def test_smollm2_each_request_is_a_token_prefix_of_the_next(smol_chat, persona, exchanges):
    """Request ``k``'s ids, generation prompt included, start request ``k + 1``; the reply's
    own tokens (tokenized alone, as a model generates them after the generation prompt) follow
    them there; the model reads exactly the template's text."""
    tok = smol_chat.tokenizer
    previous: tuple[list[int], str] | None = None
    for prefix, prompt, history, reply in _requests(persona, exchanges):
        prefix_ids, prompt_ids = smol_chat.encode(prefix, prompt, history)
        ids = prefix_ids + prompt_ids
        messages = ([{"role": "system", "content": prefix}] if prefix else []) + list(history) \
            + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
        if prefix:
            system = tok.apply_chat_template(messages[:1], tokenize=False)
            assert prefix_ids == tok(system, add_special_tokens=False)["input_ids"]
        if previous is not None:
            before, last_reply = previous
            assert _is_prefix(before, ids)
            reply_ids = tok(last_reply, add_special_tokens=False)["input_ids"]
            assert ids[len(before):len(before) + len(reply_ids)] == reply_ids
        previous = (ids, reply)
