"""The naive baseline: transformers ``generate`` per request, one request at a time.

This is what a Python simulation author writes today: a Hugging Face model, a ``generate`` call
per agent turn, and peft adapter switching when agents have their own LoRA adapters. The prefix is
recomputed on every call. It stays in the project as the honest side-by-side peer of the ``torch``
executor in benchmarks.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)

from runtime.constrained import GrammarMasks, GrammarState
from runtime.interface import WallClock
from runtime.model.chat import ChatFormat
from runtime.model.loader import load_hf_model
from runtime.model.profiles import ModelConfig, from_hf_config
from runtime.request import RequestError
from runtime.memory import AgentMemory
from runtime.sequence import Batch, Sequence


class _FirstTokenClock(StoppingCriteria):
    """Never stops generation; stamps the wall time at which the first new token exists."""

    def __init__(self, seq: Sequence) -> None:
        self.seq = seq

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.seq.first_token_wall is None:
            self.seq.first_token_wall = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _GrammarMask(LogitsProcessor):
    """Masks the scores of a constrained request by its grammar before ``generate`` samples.

    transformers runs the processors passed to ``generate`` before its temperature, top-k and
    top-p warpers, so the mask comes first there as in the ``torch`` executor.
    """

    def __init__(self, masks: GrammarMasks, state: GrammarState, prompt_len: int) -> None:
        self.masks = masks
        self.state = state
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.masks.mask(scores, [(0, self.state, input_ids[0, self.prompt_len:].tolist())])
        return scores


class HFExecutor:
    """Serve each sequence to completion with ``model.generate``."""

    max_num_seqs = 1

    def __init__(self, model: str = "smollm2-135m", device: str = "cpu", dtype: str = "float32") -> None:
        self.device = device
        self.base, self.tokenizer = load_hf_model(model, dtype=dtype, device=device)
        self.chat = ChatFormat(self.tokenizer)
        eos = self.base.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.max_context = int(getattr(self.base.config, "max_position_embeddings", 2048))
        self._peft: Any = None
        self.engine_clock = WallClock()
        self._adapter_names: dict[str, str] = {}
        self.structured_output = True
        self._grammar_masks: GrammarMasks | None = None

    @property
    def architecture(self) -> ModelConfig | None:
        try:
            return from_hf_config(self.base.config)
        except (ValueError, AttributeError, TypeError):  # not a Llama-family config
            return None

    def validate(self, seq: Sequence) -> None:
        """Only the constraint is checked ahead: a bad adapter fails its request when it runs."""
        if seq.request.constraint is not None:
            self._grammars().check(seq.request)

    def _grammars(self) -> GrammarMasks:
        """The grammar masker, made at the first constrained request."""
        if self._grammar_masks is None:
            width = self.base.get_output_embeddings().weight.shape[0]
            self._grammar_masks = GrammarMasks.from_tokenizer(self.tokenizer, width,
                                                              sorted(self.eos_token_ids))
        return self._grammar_masks

    def memory_objects(self, seq: Sequence) -> list[AgentMemory]:
        return []  # peft keeps every adapter it loaded; there is nothing to manage

    def decode_horizon(self, seq: Sequence) -> int:
        return 1

    def report(self) -> dict[str, Any]:
        return {}

    def execute(self, batch: Batch) -> None:
        for seq in batch:
            try:
                self._generate(seq)
            except RequestError as exc:
                seq.fail(str(exc))

    def _model_for(self, adapter: str | None) -> tuple[Any, Any]:
        """Return the module to call and a context manager that selects ``adapter``."""
        if adapter is None:
            if self._peft is None:
                return self.base, contextlib.nullcontext()
            return self._peft, self._peft.disable_adapter()
        path = Path(adapter)
        if not (path / "adapter_config.json").is_file():
            raise RequestError(f"adapter {adapter!r}: no adapter_config.json there")
        name = self._adapter_names.get(adapter)
        if name is None:
            name = f"a{len(self._adapter_names)}"
            try:
                if self._peft is None:
                    from peft import PeftModel

                    self._peft = PeftModel.from_pretrained(self.base, adapter, adapter_name=name)
                    self._peft.eval()
                else:
                    self._peft.load_adapter(adapter, adapter_name=name)
            except Exception as exc:  # peft raises many types for a bad adapter
                raise RequestError(f"adapter {adapter!r}: {exc}") from exc
            self._adapter_names[adapter] = name
        self._peft.set_adapter(name)
        return self._peft, contextlib.nullcontext()

    def _generate(self, seq: Sequence) -> None:
        params = seq.request.sampling
        model, selected = self._model_for(seq.request.adapter)
        input_ids = torch.tensor([seq.input_ids], device=self.device)
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            min_new_tokens=params.max_tokens if params.ignore_eos else None,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else None,
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.tokenizer.pad_token_id or sorted(self.eos_token_ids)[0],
            stop_strings=list(params.stop) or None,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        processors = None
        if seq.request.constraint is not None:
            masks = self._grammars()
            processors = LogitsProcessorList([_GrammarMask(
                masks, masks.state(seq.request.constraint), input_ids.shape[1])])
        with selected, torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_FirstTokenClock(seq)]),
                logits_processor=processors,
                tokenizer=self.tokenizer if params.stop else None,
            )
        seq.append_tokens(out[0, input_ids.shape[1]:].tolist())
