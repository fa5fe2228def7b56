"""The transformers-free warm path: :class:`~runtime.model.tokenizer.Tokenizer` and
:func:`~runtime.model.loader.load_checkpoint` against transformers on the real SmolLM2-135M.

Token ids, decoded text and chat-template renderings must be those of transformers'
AutoTokenizer; the warm-loaded engine must answer greedily as the one built from the
transformers model; and a warm engine build and call must never import transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import Request, SamplingParams, build_engine
from runtime.model.loader import load_checkpoint, resolve_model, weights_fingerprint
from runtime.model.profiles import from_hf_config
from runtime.model.tokenizer import Tokenizer

pytestmark = [pytest.mark.model, pytest.mark.slow]  # the real model's files (converted once)

TEXTS = [
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "  two  spaces\tand\ttabs\n\nnew lines\r\n",
    "naïve café — «quotes» …",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 and a ZWJ family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> inside text<|im_end|>",
    "<|im_start without the end",
    "numbers 1234567890 3.14159 -42 1e-5",
    "def f(x):\n    return x ** 2  # code\n",
    '{"json": [1, 2, {"a": null}], "s": "\\u00e9"}',
    "Ünïcödé ßtraße ÅÆØ İı",
    "\u200b zero width \ufeff bom \x00 nul",
    "a" * 300,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are Ada, a baker."},
     {"role": "user", "content": "What do you bake?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, with unicode: é中😀"}],
    [{"role": "system", "content": "Tools are available."},
     {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call-1", "name": "weather"},
     {"role": "assistant", "content": "It is 21 degrees."}],
    [{"role": "user", "content": "  spaces \n\n and newlines  "},
     {"role": "assistant", "content": ""}],
]
#: a value None is left out of the message (SmolLM2's template cannot render a missing content)
WITH_NONE = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"type": "function", "function": {"name": "weather", "arguments": {}}}]},
             {"role": "tool", "content": "sunny", "name": None}]

# Templates using what transformers' jinja environment adds or sets: trimmed blocks, loop
# controls, raise_exception, the tojson filter, namespace, strftime_now, the generation tag.
TEMPLATES = {
    "tools": (
        "{%- set ns = namespace(system=none) %}"
        "{%- for m in messages %}{%- if m.role == 'system' %}{%- set ns.system = m.content %}"
        "{%- endif %}{%- endfor %}\n"
        "{% if ns.system %}<<SYS>>{{ ns.system }}<</SYS>>\n{% endif %}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "  {% if m.role not in ['user', 'assistant', 'tool'] %}"
        "{{ raise_exception('unknown role ' + m.role) }}{% endif %}\n"
        "[{{ m.role }}]{% if m.tool_calls is defined %}{{ m.tool_calls | tojson }}"
        "{% else %}{{ m.content }}{% endif %}{% if m.name is defined %}({{ m.name }}){% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[assistant]{% endif %}"),
    "generation": (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}"
        "{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
        "{% else %}{{ m.role }}: {{ m.content | trim }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"),
    "date": "{{ strftime_now('%Y') }}|{% for m in messages %}{{ m.content }}{% endfor %}",
}


@pytest.fixture(scope="module")
def directory() -> Path:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def fast(directory) -> Tokenizer:
    tokenizer = Tokenizer.from_directory(directory)
    assert tokenizer is not None, "the converted model's tokenizer must load without transformers"
    return tokenizer


def test_token_ids_are_those_of_transformers(hf, fast):
    _, reference = hf
    batch = reference(TEXTS, add_special_tokens=False)["input_ids"]
    assert fast(TEXTS, add_special_tokens=False)["input_ids"] == batch
    for text, ids in zip(TEXTS, batch):
        assert fast(text, add_special_tokens=False)["input_ids"] == ids
        assert fast(text)["input_ids"] == reference(text)["input_ids"]


def test_decoding_is_that_of_transformers(hf, fast):
    _, reference = hf
    sequences = reference(TEXTS, add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    # Arbitrary ids too, as a model samples them: cut UTF-8 sequences, special tokens anywhere.
    sequences += [torch.randint(0, 49152, (n,), generator=generator).tolist() for n in (1, 7, 64)]
    sequences += [[1, 2, 0, 9, 2], [49151], []]
    for ids in sequences:
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == \
                reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_renders_as_transformers(hf, fast, generation_prompt):
    _, reference = hf
    assert fast.chat_template == reference.chat_template
    for messages in CONVERSATIONS:
        for n in range(1, len(messages) + 1):
            assert fast.apply_chat_template(messages[:n], add_generation_prompt=generation_prompt,
                                            tokenize=False) == \
                reference.apply_chat_template(messages[:n], tokenize=False,
                                              add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_other_templates_render_as_transformers(hf, fast, name):
    _, reference = hf
    ours = Tokenizer(fast.backend, TEMPLATES[name], fast.special_tokens)
    for messages in [*CONVERSATIONS, WITH_NONE]:
        for generation_prompt in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                            tokenize=False) == \
                reference.apply_chat_template(messages, chat_template=TEMPLATES[name],
                                              add_generation_prompt=generation_prompt,
                                              tokenize=False)


def test_raise_exception_stops_a_template_as_in_transformers(hf, fast):
    import jinja2

    _, reference = hf
    ours = Tokenizer(fast.backend, TEMPLATES["tools"], fast.special_tokens)
    narrator = [{"role": "narrator", "content": "Once upon a time"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role narrator"):
        ours.apply_chat_template(narrator, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="unknown role narrator"):
        reference.apply_chat_template(narrator, chat_template=TEMPLATES["tools"], tokenize=False)


def test_grammar_masks_are_those_of_transformers(hf, fast):
    """xgrammar reads the vocabulary from either tokenizer alike: the same tokens are allowed
    at every step of a JSON reply."""
    import xgrammar as xgr

    from runtime.constrained import Constraint, GrammarMasks

    _, reference = hf
    reply = reference.encode('{"name": "Ada", "loaves": [1, 2.5], "note": "é中😀"}',
                             add_special_tokens=False) + [2]
    masks = []
    for tokenizer in (fast, reference):
        grammar = GrammarMasks.from_tokenizer(tokenizer, 49152, [2])
        matcher = xgr.GrammarMatcher(grammar.compile(Constraint.json_object()))
        steps = []
        for token in reply:
            bitmask = xgr.allocate_token_bitmask(1, 49152)
            matcher.fill_next_token_bitmask(bitmask)
            steps.append(bitmask.clone())
            assert matcher.accept_token(token)
        masks.append(torch.stack(steps))
    assert torch.equal(masks[0], masks[1])


def test_checkpoint_holds_the_transformers_weights_and_config(hf):
    model, _ = hf
    checkpoint = load_checkpoint("smollm2-135m")
    assert isinstance(checkpoint.tokenizer, Tokenizer)
    assert checkpoint.config == from_hf_config(model.config)
    state = model.state_dict()
    assert set(checkpoint.tensors) == set(state) - {"lm_head.weight"}  # tied to the embedding
    for name, tensor in checkpoint.tensors.items():
        assert torch.equal(tensor, state[name]), name
    assert weights_fingerprint(checkpoint.config, checkpoint.tensors) == \
        weights_fingerprint(from_hf_config(model.config), state)


def test_warm_engine_answers_as_the_engine_built_from_transformers(hf):
    model, tokenizer = hf
    requests = [
        Request(agent_id=f"a{i}", prefix="You are Ada, a cheerful baker in Maple Hollow.",
                prompt=prompt, sampling=SamplingParams(max_tokens=24, temperature=0.0),
                history=history)
        for i, (prompt, history) in enumerate([
            ("What do you bake today?", ()),
            ("Tell me about the weather, in one sentence: é中😀", ()),
            ("And after that?", ({"role": "user", "content": "What is first?"},
                                 {"role": "assistant", "content": "Kneading the dough."})),
        ])]
    answers = []
    for engine in (build_engine("torch", hf_model=model, tokenizer=tokenizer,
                                kv_cache_tokens=2048),
                   build_engine("torch", model="smollm2-135m", kv_cache_tokens=2048)):
        ids = [engine.submit(r) for r in requests]
        done = {}
        while engine.has_work():
            for completion in engine.step().finished:
                done[completion.request_id] = completion
        answers.append([(done[i].text, done[i].prompt_tokens, done[i].output_tokens,
                         done[i].finish_reason) for i in ids])
        assert all(done[i].ok for i in ids)
    assert answers[0] == answers[1]


WARM_CALL = """
import sys
from runtime import Request, SamplingParams, build_engine

engine = build_engine("torch", model="smollm2-135m", kv_cache_tokens=1024)
engine.submit(Request(agent_id="a", prefix="You are Ada.", prompt="Hello!",
                      sampling=SamplingParams(max_tokens=4, temperature=0.0)))
done = []
while engine.has_work():
    done += engine.step().finished
assert done and done[0].ok, done
print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers")[:3])
"""


def test_a_warm_engine_never_imports_transformers(directory):
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", WARM_CALL], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def _copy(directory: Path, target: Path, **config_changes: object) -> Path:
    """``directory``'s tokenizer files in ``target``, tokenizer_config.json changed."""
    target.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(directory / name, target / name)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("changes", [
    {"tokenizer_class": "LlamaTokenizerFast"},  # transformers 5 rebuilds parts of it in Python
    {"add_prefix_space": False},
    {"add_bos_token": False},
    {"clean_up_tokenization_spaces": True},
    {"bos_token": "<|not-in-the-vocabulary|>"},
    {"chat_template": [{"name": "default", "template": "x"}]},
])
def test_what_transformers_would_load_differently_is_left_to_it(directory, tmp_path, changes):
    assert Tokenizer.from_directory(_copy(directory, tmp_path / "same")) is not None
    target = _copy(directory, tmp_path / "changed", **changes)
    if "chat_template" in changes:
        (target / "chat_template.jinja").unlink()
    assert Tokenizer.from_directory(target) is None


def test_a_directory_left_to_transformers_still_loads(hf, directory, tmp_path):
    model, _ = hf
    target = _copy(directory, tmp_path / "model", add_bos_token=False)
    for name in ("config.json", "model.safetensors"):
        (target / name).symlink_to(directory / name)
    checkpoint = load_checkpoint(str(target))
    assert not isinstance(checkpoint.tokenizer, Tokenizer)  # transformers' own
    assert checkpoint.config == from_hf_config(model.config)
    norm = "model.norm.weight"
    assert torch.equal(checkpoint.tensors[norm], model.state_dict()[norm])
