"""A model directory's tokenizer without transformers: ``tokenizer.json`` run by the
``tokenizers`` library, the chat template rendered with jinja2 the way transformers renders it.

Importing transformers takes seconds, more than the rest of an engine's start together; this is
what lets a cached model start without it. :class:`Tokenizer` has the part of a transformers
tokenizer's interface that the engine uses (``tokenizer(texts, add_special_tokens=False)``,
``decode``, ``chat_template``, ``apply_chat_template(..., tokenize=False)``), so
:class:`~runtime.model.chat.ChatFormat` and the executors take either, and gives the same ids,
text and renderings as transformers 5 (``tests/test_tokenizer.py`` checks them).

:meth:`Tokenizer.from_directory` loads only what it can load exactly as transformers does: a
``tokenizer_config.json`` naming the generic class (transformers then runs ``tokenizer.json`` as
it is; model-specific classes may rebuild parts of the pipeline in Python) and none of the
settings with which transformers changes it, special tokens that ``tokenizer.json`` has already,
and one chat template. It returns None for anything else, and the caller loads that directory
with transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: tokenizer classes that transformers loads as ``tokenizer.json`` says, with nothing rebuilt
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
#: the named special tokens a chat template sees as variables (transformers' special_tokens_map)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
#: tokenizer_config.json keys with which transformers changes what ``tokenizer.json`` gives:
#: these whatever their value (it rebuilds the pre-tokenizer or the post-processor from them) ...
_REBUILDING_KEYS = ("add_prefix_space", "add_bos_token", "add_eos_token")
#: ... and these when true (it cleans decoded text, or encodes special tokens as text)
_SWITCHES = ("clean_up_tokenization_spaces", "split_special_tokens")
#: names a message's reasoning comes under; templates read the first (as in transformers)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """Text to token ids and back, and chat messages to text, for one model."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None) -> None:
        #: the ``tokenizers`` object (not to be reconfigured: it is shared between threads)
        self.backend = backend
        # As transformers calls it: never truncate or pad, whatever tokenizer.json says.
        backend.no_truncation()
        backend.no_padding()
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._template: jinja2.Template | None = None

    @classmethod
    def from_directory(cls, directory: Path) -> "Tokenizer | None":
        """The tokenizer of a Hugging Face-format ``directory``, or None where transformers
        would load it differently (see the module docstring)."""
        config_file = directory / "tokenizer_config.json"
        backend_file = directory / "tokenizer.json"
        if not (config_file.is_file() and backend_file.is_file()) or \
                (directory / "additional_chat_templates").exists():
            return None
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") not in GENERIC_CLASSES or \
                any(key in config for key in _REBUILDING_KEYS) or \
                any(config.get(key) for key in _SWITCHES):
            return None
        template_file = directory / "chat_template.jinja"
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else config.get("chat_template"))
        if template is not None and not isinstance(template, str):
            return None  # named templates: transformers picks one by the request's tools
        backend = tokenizers.Tokenizer.from_file(str(backend_file))
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        special = {name: _content(config[name]) for name in SPECIAL_TOKENS
                   if config.get(name) is not None}
        declared = [_content(token) for token in config.get("added_tokens_decoder", {}).values()]
        if not added.issuperset([*special.values(), *declared]):
            return None  # transformers would add these tokens to the vocabulary first
        return cls(backend, template, special)

    def __call__(self, text: str | Sequence[str],
                 add_special_tokens: bool = True) -> dict[str, Any]:
        """``{"input_ids": ids}`` of ``text``, or a list of ids per text for a batch."""
        if isinstance(text, str):
            return {"input_ids": self.backend.encode(text,
                                                     add_special_tokens=add_special_tokens).ids}
        encodings = self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text: str = self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return text

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]], *, tokenize: bool,
                            add_generation_prompt: bool = False) -> str:
        """The text of ``conversation`` by the chat template. ``tokenize`` must be False (the
        engine tokenizes pieces of the text itself): it is there so that a call reads the same
        for a transformers tokenizer, whose default is to tokenize."""
        if tokenize:
            raise ValueError("Tokenizer.apply_chat_template renders text only (tokenize=False)")
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation.")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        messages = [_normalized(message) for message in conversation]
        text: str = self._template.render(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt,
                                          **self.special_tokens)
        return text


def _content(token: str | Mapping[str, Any]) -> str:
    """A token as tokenizer_config.json gives it: its text, or a serialized AddedToken."""
    return token if isinstance(token, str) else str(token["content"])


def _normalized(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to a template: keys whose value is None dropped (many
    templates would render "None"), reasoning also under ``thinking`` and ``reasoning_content``."""
    plain = {key: value for key, value in message.items() if value is not None}
    reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens
    with it; rendering text, the block is its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        text: str = caller()
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which a prompt must keep.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    """The jinja environment transformers renders chat templates in: sandboxed, blocks trimmed,
    loop controls, and its globals and ``tojson`` filter."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
