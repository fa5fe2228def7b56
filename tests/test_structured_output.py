"""Structured output: grammar masks on a tiny vocabulary, the engine's handling of constraints,
and (slow) the real SmolLM2-135M held to JSON schemas, choices and tool calls under the torch
and hf executors, alone and in mixed batches with preemption."""

from __future__ import annotations

import json

import pytest
import torch

from runtime import Constraint, ConstraintError, Request, RequestError, SamplingParams
from runtime.constrained import GrammarMasks
from scalesim.serve.prompt import parse_tool_calls

#: token id -> text; 0 is end-of-sequence
VOCAB = ["<eos>", "y", "es", "yes", "n", "o", "no", "x", "{", "}", '"', "a", ":", "1", " "]
EOS = 0


def allowed(masks: GrammarMasks, constraint: Constraint, output: list[int]) -> set[int]:
    """The token ids the grammar allows after ``output``."""
    logits = torch.zeros(1, len(VOCAB))
    masks.mask(logits, [(0, masks.state(constraint), output)])
    return {i for i, v in enumerate(logits[0].tolist()) if v == 0}


@pytest.fixture(scope="module")
def masks() -> GrammarMasks:
    return GrammarMasks.from_vocab(VOCAB, [EOS])


def test_choice_mask_allows_the_prefixes_of_the_options_then_only_eos(masks):
    choice = Constraint.choice(["yes", "no"])
    assert allowed(masks, choice, []) == {VOCAB.index(t) for t in ("y", "yes", "n", "no")}
    assert allowed(masks, choice, [VOCAB.index("y")]) == {VOCAB.index("es")}
    assert allowed(masks, choice, [VOCAB.index("yes")]) == {EOS}
    assert allowed(masks, choice, [VOCAB.index("n"), VOCAB.index("o")]) == {EOS}


def test_only_the_listed_rows_are_masked_and_the_others_keep_their_logits(masks):
    logits = torch.randn(3, len(VOCAB), generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    masks.mask(logits, [(1, masks.state(Constraint.choice(["no"])), [])])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert {i for i, v in enumerate(logits[1].tolist()) if v != float("-inf")} == \
        {VOCAB.index("n"), VOCAB.index("no")}


def test_the_matcher_follows_the_tokens_and_is_rebuilt_when_they_were_cut(masks):
    state = masks.state(Constraint.choice(["yes", "no"]))
    logits = torch.zeros(1, len(VOCAB))
    masks.mask(logits, [(0, state, [VOCAB.index("yes")])])
    assert state.accepted == 1
    # The tokens went back (a sequence restarted from fewer tokens): the state is rebuilt.
    logits = torch.zeros(1, len(VOCAB))
    masks.mask(logits, [(0, state, [])])
    assert state.accepted == 0 and logits[0, VOCAB.index("n")] == 0
    # A token the grammar never allowed fails the request (it was not sampled under the mask).
    with pytest.raises(RequestError, match="does not fit"):
        masks.mask(torch.zeros(1, len(VOCAB)), [(0, state, [VOCAB.index("x")])])


def test_json_schema_mask(masks):
    schema = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"]})
    assert allowed(masks, schema, []) == {VOCAB.index("{")}
    ids = [VOCAB.index(t) for t in ("{", '"', "a", '"', ":", " ", "1")]
    assert VOCAB.index("}") in allowed(masks, schema, ids)


def test_invalid_constraints_are_refused_before_any_engine():
    with pytest.raises(ConstraintError, match="objec"):
        Constraint.json_schema({"type": "objec"}).grammar()
    with pytest.raises(ConstraintError):
        Constraint.regex("a(").grammar()
    with pytest.raises(ConstraintError):
        Constraint.choice([]).grammar()
    with pytest.raises(ConstraintError, match="no tool named"):
        Constraint.tool_call([{"type": "function", "function": {"name": "a"}}], name="b")


def test_a_pydantic_model_is_a_schema():
    from pydantic import BaseModel

    class Vote(BaseModel):
        side: str
        weight: int

    constraint = Constraint.json_schema(Vote)
    assert json.loads(constraint.spec)["required"] == ["side", "weight"]
    constraint.grammar()


def test_engine_refuses_a_required_constraint_without_real_tokens_and_ignores_an_optional(
        echo_engine):
    rejected = echo_engine.submit(Request("a", "hi", constraint=Constraint.choice(["x"])))
    served = echo_engine.submit(Request("b", "hi", constraint=Constraint.choice(
        ["x"], required=False)))
    done = {}
    while echo_engine.has_work():
        done.update({c.request_id: c for c in echo_engine.step().finished})
    assert "samples real tokens" in (done[rejected].error or "")
    assert done[served].ok and done[served].text == "b:hi"


@pytest.mark.parametrize("text, content, names", [
    ('{"name": "like", "arguments": {"post_id": 3}}', None, ["like"]),          # untagged
    ('```json\n{"name": "like", "arguments": {"post_id": 3}}\n```', None, ["like"]),  # fenced
    ('{"name": "unknown", "arguments": {}}', '{"name": "unknown", "arguments": {}}', []),
    ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
    ('{"post_id": 3}', '{"post_id": 3}', []),                                  # JSON, no call
    ('<tool_call>\n{"name": "like", "arguments": {"post_id": 3}}\n</tool_call> ok', "ok",
     ["like"]),
])
def test_auto_tool_calls_are_parsed_for_the_requests_tools(text, content, names):
    got, calls = parse_tool_calls(text, {"like"})
    assert got == content and [c["function"]["name"] for c in calls] == names


# -- the real model --------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "like_post", "parameters": {
        # Bounded: left free, a 135M model writes digits until max_tokens.
        "type": "object", "properties": {"post_id": {"type": "integer", "minimum": 0,
                                                     "maximum": 9999}},
        "required": ["post_id"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "create_post", "parameters": {
        "type": "object", "properties": {"content": {"type": "string", "maxLength": 40}},
        "required": ["content"], "additionalProperties": False}}},
]


def valid(instance: object, schema: dict) -> bool:
    """A check of the schemas used here (no jsonschema package in the project)."""
    if not isinstance(instance, dict) or set(instance) != set(schema["required"]):
        return False
    for key, sub in schema["properties"].items():
        value = instance[key]
        if sub["type"] == "string" and not (isinstance(value, str)
                                            and len(value) <= sub.get("maxLength", 1e9)):
            return False
        if sub["type"] == "integer" and not (isinstance(value, int)
                                             and sub.get("minimum", -1e9) <= value
                                             <= sub.get("maximum", 1e9)):
            return False
        if sub["type"] == "array" and not (isinstance(value, list)
                                           and len(value) <= sub.get("maxItems", 1e9)
                                           and all(isinstance(v, str) for v in value)):
            return False
    return True


def run(engine, requests: list[Request]) -> list:
    ids = [engine.submit(r) for r in requests]
    done = {}
    while engine.has_work():
        done.update({c.request_id: c for c in engine.step().finished})
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def torch_engine(hf):
    from runtime import build_engine

    model, tokenizer = hf
    return build_engine("torch", hf_model=model, tokenizer=tokenizer, kv_cache_tokens=4096)


def person(agent: str = "p", **sampling) -> Request:
    return Request(agent, "Describe Maria, a 34-year-old gardener who likes chess, as JSON.",
                   prefix="You are a helpful assistant.",
                   sampling=SamplingParams(max_tokens=80, **sampling),
                   constraint=Constraint.json_schema(SCHEMA))


def free() -> Request:
    return Request("f", "Tell me about the weather in spring.", prefix="You are a poet.",
                   sampling=SamplingParams(max_tokens=24))


@pytest.mark.slow
@pytest.mark.model
def test_json_schema_replies_parse_and_validate_greedy_and_sampled(torch_engine):
    for reply in run(torch_engine, [person(), person("q", temperature=0.9, top_p=0.95, seed=3)]):
        assert reply.finish_reason == "stop", reply
        assert valid(json.loads(reply.text), SCHEMA), reply.text


@pytest.mark.slow
@pytest.mark.model
def test_mixed_batch_leaves_the_unconstrained_row_as_it_is_alone(torch_engine):
    alone, = run(torch_engine, [free()])
    mixed = run(torch_engine, [person(), free(), Request(
        "c", "Is water wet?", sampling=SamplingParams(max_tokens=4),
        constraint=Constraint.choice(["yes", "no"]))])
    assert mixed[1].text == alone.text and mixed[1].output_tokens == alone.output_tokens
    assert valid(json.loads(mixed[0].text), SCHEMA)
    assert mixed[2].text in ("yes", "no") and mixed[2].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.model
def test_tool_call_constraint_gives_a_call_of_one_of_the_tools(torch_engine):
    for constraint, names in ((Constraint.tool_call(TOOLS), {"like_post", "create_post"}),
                              (Constraint.tool_call(TOOLS, "create_post"), {"create_post"})):
        reply, = run(torch_engine, [Request("t", "Post 7 reads 'Tomatoes are in!'. Like it, or post about your garden.",
                                            sampling=SamplingParams(max_tokens=80),
                                            constraint=constraint)])
        content, calls = parse_tool_calls(reply.text, names)
        assert reply.finish_reason == "stop" and len(calls) == 1 and content is None, reply.text
        call = calls[0]["function"]
        arguments = json.loads(call["arguments"])
        tool = next(t["function"] for t in TOOLS if t["function"]["name"] == call["name"])
        assert set(arguments) == set(tool["parameters"]["required"])


@pytest.mark.slow
@pytest.mark.model
def test_constraints_survive_preemption_and_the_prefix_cache(hf):
    """A pool too small for every sequence at once: sequences are preempted and recomputed
    (their grammar state follows their tokens), and the second round reuses cached prefixes."""
    from runtime import build_engine

    model, tokenizer = hf
    engine = build_engine("torch", hf_model=model, tokenizer=tokenizer, kv_cache_tokens=192,
                          block_size=16, max_num_seqs=4)
    alone = [run(engine, [person(f"a{i}")])[0].text for i in range(2)]
    batch = run(engine, [person(f"b{i}") for i in range(4)])
    assert engine.scheduler.num_preemptions > 0
    assert all(r.finish_reason == "stop" and valid(json.loads(r.text), SCHEMA) for r in batch)
    assert {r.text for r in batch} == {alone[0]}  # greedy: the same reply as a lone request
    assert batch[-1].cached_tokens > 0


@pytest.mark.slow
@pytest.mark.model
def test_hf_executor_honours_constraints(hf):
    from runtime import build_engine

    model, tokenizer = hf
    with pytest.MonkeyPatch.context() as patch:  # share the loaded model
        patch.setattr("runtime.executors.hf.load_hf_model", lambda *a, **k: (model, tokenizer))
        engine = build_engine("hf", model="smollm2-135m")
    json_reply, choice, unconstrained = run(engine, [
        person(), Request("c", "Is water wet?", sampling=SamplingParams(max_tokens=4),
                          constraint=Constraint.choice(["yes", "no"])), free()])
    assert valid(json.loads(json_reply.text), SCHEMA), json_reply.text
    assert choice.text in ("yes", "no")
    assert unconstrained.text  # generate as before


@pytest.mark.slow
@pytest.mark.model
def test_a_cancelled_constrained_request_leaves_the_others_whole(torch_engine):
    """Cancelled mid-reply (a client went away): its matcher goes with it; the request beside
    it and the next one with the same schema still validate."""
    doomed, kept = torch_engine.submit(person("x")), torch_engine.submit(person("y"))
    for _ in range(4):
        torch_engine.step()
    assert torch_engine.cancel(doomed)
    done = {}
    while torch_engine.has_work():
        done.update({c.request_id: c for c in torch_engine.step().finished})
    assert done[doomed].error and valid(json.loads(done[kept].text), SCHEMA)
    again, = run(torch_engine, [person("x")])
    assert valid(json.loads(again.text), SCHEMA)
