"""Structured output: a reply held to a grammar by masking the tokens it may not take.

A :class:`Constraint` says what a reply must be: an instance of a JSON schema, any JSON object,
one of a few fixed strings, a match of a regular expression, or a Hermes-style tool call of
one of a request's tools. It is plain data on the :class:`~runtime.request.Request`
(``constraint``); with none, a request is sampled exactly as before (no mask is computed, the
sampling path and its random draws are unchanged).

The executors that sample real tokens (``torch``, ``hf``) hold one :class:`GrammarMasks` over
their tokenizer. Before a constrained row is sampled, its :class:`GrammarState` (the grammar
matcher of that sequence) catches up with the tokens the sequence has (its ``output_ids``), then
fills the row's bitmask of allowed next tokens, and every other token's logit is set to
``-inf``: before temperature, top-k and top-p, and for greedy rows alike. Once the grammar is
complete, only end-of-sequence tokens are allowed, so a constrained reply ends where its
grammar does (``finish_reason`` ``"stop"``), or at ``max_tokens`` (``"length"``: the text is
then a truncated instance).

The matcher state is derived from the sequence's own tokens, never the other way round: a
preempted sequence keeps its ``output_ids`` and its matcher; a state that is ahead of the tokens
(they were cut) is rebuilt from them, so no executor or scheduler path can leave it out of step.

The grammar library is xgrammar: it compiles on the CPU, its masks are computed in C++ from a
precomputed per-state token cache (about 10 microseconds per token on SmolLM2-135M's 49,152-token
vocabulary, see the README), and it applies a bitmask to CPU logits without triton or CUDA.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Sequence as Seq

from runtime.request import Request, RequestError
from runtime.sequence import Sequence

#: What a constraint holds a reply to (see :class:`Constraint`).
ConstraintKind = Literal["json_schema", "json_object", "choice", "regex", "tool_call"]


class ConstraintError(ValueError):
    """A constraint that no reply can be held to (an invalid schema or pattern)."""


@dataclass(frozen=True)
class Constraint:
    """What a reply must be; build one with the class methods.

    ``spec`` is the kind's source text: the JSON schema (``json_schema``), the JSON list of
    options (``choice``), the pattern (``regex``) or the JSON list of tool schemas
    (``tool_call``, OpenAI's ``{"type": "function", "function": {...}}`` shape). ``required``
    says what an executor that samples no real tokens (the modeled one) does with it: refuse the
    request (True), or answer as it always does and leave the reply to the caller's own parsing
    (False: ``choose`` of a world, which falls back to a default).
    """

    kind: ConstraintKind
    spec: str = ""
    required: bool = True

    @classmethod
    def json_schema(cls, schema: Any, required: bool = True) -> "Constraint":
        """A JSON instance of ``schema``: a dict, its JSON text or a pydantic model class."""
        if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text, required)

    @classmethod
    def json_object(cls, required: bool = True) -> "Constraint":
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls("json_object", "", required)

    @classmethod
    def choice(cls, options: Seq[str], required: bool = True) -> "Constraint":
        """Exactly one of ``options``, nothing before or after it."""
        return cls("choice", json.dumps(list(options)), required)

    @classmethod
    def regex(cls, pattern: str, required: bool = True) -> "Constraint":
        """A full match of the regular expression ``pattern``."""
        return cls("regex", pattern, required)

    @classmethod
    def tool_call(cls, tools: Seq[dict[str, Any]], name: str | None = None,
                  required: bool = True) -> "Constraint":
        """One call of one of ``tools`` (of the one called ``name``), written as
        ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` with arguments that
        are an instance of the tool's ``parameters`` schema."""
        chosen = [t for t in tools if name is None or _tool_name(t) == name]
        if not chosen:
            raise ConstraintError(f"no tool named {name!r} among the request's tools")
        return cls("tool_call", json.dumps(chosen), required)

    def grammar(self) -> Any:
        """The constraint as an ``xgrammar.Grammar`` (no tokenizer needed); raises
        :class:`ConstraintError` when it cannot be built. Cheap enough to check a request's
        constraint before it reaches the engine."""
        import xgrammar as xgr

        try:
            return _grammar(xgr, self)
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConstraintError(_first_line(exc)) from None


@functools.lru_cache(maxsize=256)
def checked(constraint: Constraint) -> Constraint:
    """``constraint`` itself once its grammar builds (remembered: an agent asking the same
    schema a thousand times checks it once); :class:`ConstraintError` if it does not."""
    constraint.grammar()
    return constraint


#: Separators of generated JSON: compact, one space after ``,`` and ``:``. A small model left
#: free to write any whitespace can loop on newlines until ``max_tokens``.
_SEPARATORS = (", ", ": ")

#: ``[09:21:14] /project/cpp/regex_converter.cc:94: `` in front of xgrammar's messages
_XGRAMMAR_WHERE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")

#: compiled grammars a :class:`GrammarMasks` keeps (least recently used dropped first)
COMPILED_KEPT = 256

#: logits dtypes that :meth:`GrammarMasks._apply_cpu` writes through numpy
_NUMPY_FLOATS = ("torch.float32", "torch.float64")

#: The tool-call wrapper the server's tools preamble asks for (Hermes format).
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"


def _first_line(exc: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source position; keep the reason."""
    lines = str(exc).strip().splitlines()
    return _XGRAMMAR_WHERE.sub("", lines[0]) if lines else type(exc).__name__


def _tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function", tool)
    return str(function.get("name", "")) if isinstance(function, dict) else ""


def _literal(text: str) -> str:
    """``text`` as an EBNF string literal (xgrammar reads JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _grammar(xgr: Any, c: Constraint) -> Any:
    if c.kind == "json_schema":
        schema = json.loads(c.spec)
        if not isinstance(schema, dict):
            raise ConstraintError("a JSON schema must be a JSON object")
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                            separators=_SEPARATORS)
    if c.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                            separators=_SEPARATORS)
    if c.kind == "choice":
        options = json.loads(c.spec)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError("choices must be a non-empty list of non-empty strings")
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_literal(o) for o in options))
    if c.kind == "regex":
        return xgr.Grammar.from_regex(c.spec)
    if c.kind == "tool_call":
        calls = []
        for tool in json.loads(c.spec):
            function = tool.get("function", tool)
            if not isinstance(function, dict) or not function.get("name"):
                raise ConstraintError("every tool needs a function with a name")
            parameters = function.get("parameters") or {"type": "object"}
            calls.append({"type": "object", "additionalProperties": False,
                          "required": ["name", "arguments"],
                          "properties": {"name": {"const": function["name"]},
                                         "arguments": parameters}})
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return xgr.Grammar.concat(
            xgr.Grammar.from_ebnf(f"root ::= {_literal(TOOL_CALL_OPEN)}"),
            xgr.Grammar.from_json_schema(json.dumps(call), any_whitespace=False,
                                         separators=_SEPARATORS),
            xgr.Grammar.from_ebnf(f"root ::= {_literal(TOOL_CALL_CLOSE)}"))
    raise ConstraintError(f"unknown constraint kind {c.kind!r}")


class _RowError(RequestError):
    """A row's tokens broke its grammar (which row: ``row``)."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


class GrammarState:
    """One sequence's grammar matcher and how many of its output tokens it has taken."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.accepted = 0

    def sync(self, output_ids: list[int]) -> None:
        """Take the output tokens the matcher has not seen; rebuild it if it is ahead of them.

        Raises :class:`RequestError` if a token breaks the grammar (it was not sampled under
        this grammar's mask).
        """
        if self.accepted > len(output_ids):
            self.matcher.reset()
            self.accepted = 0
        for token in output_ids[self.accepted:]:
            if self.matcher.is_terminated():
                break  # the end-of-sequence token is taken; the engine stops the sequence
            if not self.matcher.accept_token(token):
                raise RequestError(f"token {token} does not fit the request's grammar")
            self.accepted += 1

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class GrammarMasks:
    """The grammar compiler and masker of one vocabulary (one per executor).

    ``info`` is the vocabulary as xgrammar reads it (:meth:`from_tokenizer`, :meth:`from_vocab`)
    and ``vocab_size`` the width of the model's logits (which may exceed the tokenizer's size).
    """

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int,
                       stop_token_ids: Seq[int]) -> "GrammarMasks":
        """The masker of a transformers tokenizer or a
        :class:`~runtime.model.tokenizer.Tokenizer`; ``stop_token_ids`` are the ids the engine
        ends a sequence at, the only ones allowed once a grammar is complete."""
        import xgrammar as xgr

        from runtime.model.tokenizer import Tokenizer

        if isinstance(tokenizer, Tokenizer):
            # xgrammar reads the vocabulary's encoding from a transformers fast tokenizer (and
            # imports transformers itself): wrap a copy of ours, which is shared between threads.
            import tokenizers
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.backend.to_str()))
        return cls(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=sorted(stop_token_ids)),
                   vocab_size)

    @classmethod
    def from_vocab(cls, tokens: Seq[str], stop_token_ids: Seq[int]) -> "GrammarMasks":
        """The masker of a vocabulary given as the text of each token id (tests)."""
        import xgrammar as xgr

        info = xgr.TokenizerInfo(list(tokens), vocab_type=xgr.VocabType.RAW,
                                 stop_token_ids=sorted(stop_token_ids))
        return cls(info, len(tokens))

    def __init__(self, info: Any, vocab_size: int, threads: int = 1) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        # Compiled grammars are kept by their source, the most recently used COMPILED_KEPT: an
        # agent asking the same schema again pays nothing, and a server sent a new schema with
        # every request does not grow without bound (xgrammar's own cache is unbounded).
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar of ``constraint``; :class:`RequestError` if it has none."""
        key = Constraint(constraint.kind, constraint.spec)
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
        else:
            try:
                compiled = self.compiler.compile_grammar(constraint.grammar())
            except ConstraintError as exc:
                raise RequestError(f"the request's {constraint.kind} constraint: {exc}") from None
            except RuntimeError as exc:
                raise RequestError(f"the request's {constraint.kind} constraint: "
                                   f"{_first_line(exc)}") from None
            self._compiled[key] = compiled
            if len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return compiled

    def state(self, constraint: Constraint) -> GrammarState:
        """A fresh matcher for one sequence."""
        return GrammarState(self._xgr.GrammarMatcher(self.compile(constraint)))

    def check(self, request: Request) -> None:
        """At submission: raise :class:`RequestError` if ``request``'s constraint cannot be
        served (it does not compile, or asks to go on past end-of-sequence tokens)."""
        if request.constraint is None:
            return
        if request.sampling.ignore_eos:
            raise RequestError(f"request {request.request_id}: a constrained reply ends where "
                               "its grammar does; ignore_eos cannot be honoured with it")
        self.compile(request.constraint)

    def mask_sequences(self, logits: Any, rows: list[tuple[int, Sequence]]) -> None:
        """Mask the logits of the constrained sequences among ``rows`` (``(row of logits,
        sequence)``), making their matchers when first needed. A sequence whose tokens broke
        its grammar fails alone; the others are masked."""
        masked: list[tuple[int, GrammarState, list[int]]] = []
        for row, seq in rows:
            constraint = seq.request.constraint
            if constraint is None or seq.error is not None:
                continue
            if seq.grammar is None:
                seq.grammar = self.state(constraint)
            masked.append((row, seq.grammar, seq.output_ids))
        try:
            self.mask(logits, masked)
        except _RowError as exc:
            seq = next(s for r, s in rows if r == exc.row)
            seq.fail(f"request {seq.request_id}: {exc}")
            self.mask_sequences(logits, [(r, s) for r, s in rows if r != exc.row])

    def mask(self, logits: Any, rows: list[tuple[int, GrammarState, list[int]]]) -> None:
        """Set to ``-inf`` the logits each listed row's grammar does not allow next.

        ``rows`` are ``(row of logits, its sequence's state, its output ids so far)``; rows not
        listed are not touched. A state whose tokens break its grammar raises a
        :class:`RequestError` naming its row (``row`` attribute) before any row is masked.
        """
        if not rows:
            return
        bitmask = self._bitmask
        if bitmask.shape[0] < logits.shape[0]:
            bitmask = self._bitmask = self._xgr.allocate_token_bitmask(logits.shape[0],
                                                                       self.vocab_size)
        for row, state, output_ids in rows:
            try:
                state.sync(output_ids)
            except RequestError as exc:
                raise _RowError(row, str(exc)) from None
            state.matcher.fill_next_token_bitmask(bitmask, row)
        if logits.device.type != "cpu" or str(logits.dtype) not in _NUMPY_FLOATS:
            self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device),
                                                  vocab_size=self.vocab_size,
                                                  indices=[row for row, _, _ in rows])
            return
        for row, _, _ in rows:
            self._apply_cpu(logits[row], bitmask[row])

    def _apply_cpu(self, logits: Any, bits: Any) -> None:
        """``logits[i] = -inf`` where bit ``i`` of ``bits`` is 0, in place.

        xgrammar's CPU kernel writes the masked logits one by one (about 300 us on a 49k
        vocabulary when a grammar allows few tokens, the usual case). numpy unpacks the bits
        and writes the row in about 40 us, on one thread: a torch op of this size would run on
        torch's thread pool and wait for a core whenever another process holds one.
        """
        import numpy as np

        width = logits.shape[-1]
        allowed = np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:width]
        np.copyto(logits.numpy(), -np.inf, where=~allowed.view(np.bool_))
