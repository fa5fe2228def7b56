"""LoRA adapters: loading PEFT files, keeping them in device slots, applying many in one batch.

An adapter is a directory in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``)
targeting any of the projections ``q/k/v/o/gate/up/down``. :func:`load_adapter` validates it
against the model and the engine's maximum rank and keeps its weights on the host as a
:class:`LoraAdapter` (``key``, ``nbytes``, ``offload``/``load``: what a memory manager needs).

Resident adapters live in :class:`LoraPool` slots. Per layer and target module the pool holds
``A`` as ``[slots, in, max_rank]`` and ``B`` as ``[slots, max_rank, out]``, with the scaling
already folded into ``B`` and smaller ranks zero-padded. Slot-major storage makes each adapter one
contiguous matrix pair, which is what both kinds of work in a batch want. Decode tokens (one per
sequence, many different adapters) are scattered into a ``[slots, m, in]`` tensor by slot and go
through two ``bmm`` calls against the pool's slots in place: every adapter present is read once
and each token is multiplied by its own adapter only (multiplying every token by every resident
adapter and masking, as an earlier version did, cost more arithmetic than the base model).
Prefill chunks are few and long; each runs against its own adapter's slice (a view, no copy).
:class:`LoraBatch` holds that per-iteration plan.

Projections that read the same input (q/k/v, gate/up: a :data:`GROUPS` entry) keep their ``A``
matrices side by side in one ``[slots, in, modules * max_rank]`` tensor, of which each module's
``A`` is a view. :meth:`LoraBatch.apply_group` then scatters the input once and multiplies it by
all of the group's ``A`` in one product, leaving one small ``B`` product per module: four input
scatters and shrink products per layer instead of seven.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.model.profiles import ModelConfig
from runtime.request import RequestError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the targets that read the same input, in the model's order; their A matrices share a tensor
GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                      "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def lora_tensor_target(name: str) -> tuple[int, str, str] | None:
    """``(layer, module, "lora_A" | "lora_B")`` of a PEFT tensor name, or ``None``.

    PEFT names them ``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}
    .weight``.
    """
    parts = name.split(".")
    try:
        at = parts.index("layers")
        return int(parts[at + 1]), parts[at + 3], parts[at + 4]
    except (ValueError, IndexError):
        return None


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each LoRA-targetable projection."""
    h, i = config.hidden_size, config.intermediate_size
    return {"q_proj": (h, config.q_size), "k_proj": (h, config.kv_size),
            "v_proj": (h, config.kv_size), "o_proj": (config.q_size, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(eq=False)
class LoraAdapter:
    """One agent's adapter: host weights, and the pool slot it occupies while resident.

    ``weights[(layer, module)] = (A [in, rank], B [rank, out])`` with the PEFT scaling folded into
    ``B``. The host copy is kept, so offloading only frees the slot and reloading copies it back.
    """

    key: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    slot: int | None = None

    @property
    def resident(self) -> bool:
        return self.slot is not None

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values())


def adapter_fingerprint(path: str) -> str:
    """A digest of an adapter directory's config and weights (part of a persona KV's identity:
    the adapter changes keys and values)."""
    import hashlib

    digest = hashlib.sha1()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def load_adapter(path: str, config: ModelConfig, max_rank: int) -> LoraAdapter:
    """Read and validate a PEFT adapter directory; raise :class:`RequestError` if unusable."""
    directory = Path(path)
    cfg_file = directory / "adapter_config.json"
    if not cfg_file.is_file():
        raise RequestError(f"adapter {path!r}: no adapter_config.json there")
    try:
        peft = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise RequestError(f"adapter {path!r}: adapter_config.json is not JSON: {exc}") from None
    if peft.get("peft_type", "LORA") != "LORA":
        raise RequestError(f"adapter {path!r}: peft_type {peft.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if peft.get(key, ok) != ok:
            raise RequestError(f"adapter {path!r}: {key}={peft[key]} is not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if peft.get(key):
            raise RequestError(f"adapter {path!r}: {key} is not supported")
    rank, alpha = int(peft.get("r", 8)), float(peft.get("lora_alpha", 8))
    if rank > max_rank:
        raise RequestError(f"adapter {path!r}: rank {rank} exceeds the engine's max_lora_rank "
                           f"{max_rank}")
    scaling = alpha / (rank ** 0.5 if peft.get("use_rslora") else rank)
    weights_file = directory / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise RequestError(f"adapter {path!r}: no adapter_model.safetensors there")
    from runtime.memory.object_file import read_safetensors

    try:
        tensors = read_safetensors(weights_file)  # direct I/O: the page cache is not a tier
    except Exception as exc:  # safetensors has its own error type for a truncated or garbled file
        raise RequestError(f"adapter {path!r}: adapter_model.safetensors is unreadable: "
                           f"{exc}") from None
    shapes = module_shapes(config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        where = lora_tensor_target(name)
        if where is None:
            raise RequestError(f"adapter {path!r}: unexpected tensor {name!r}")
        layer, module, which = where
        if module not in shapes or which not in ("lora_A", "lora_B"):
            raise RequestError(f"adapter {path!r}: tensor {name!r} targets an unsupported module")
        if layer >= config.num_layers:
            raise RequestError(f"adapter {path!r}: layer {layer} but the model has "
                               f"{config.num_layers} (adapter for another model?)")
        pairs.setdefault((layer, module), {})[which] = tensor
    weights = {}
    for (layer, module), ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise RequestError(f"adapter {path!r}: layer {layer} {module} lacks lora_A or lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        fan_in, fan_out = shapes[module]
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise RequestError(
                f"adapter {path!r}: layer {layer} {module} has shapes {tuple(a.shape)}/"
                f"{tuple(b.shape)}, expected ({rank}, {fan_in})/({fan_out}, {rank}) "
                "(adapter for another model?)")
        weights[(layer, module)] = (a.float().t().contiguous(), (b.float() * scaling).t().contiguous())
    if not weights:
        raise RequestError(f"adapter {path!r}: no LoRA tensors found")
    return LoraAdapter(key=str(path), rank=rank, weights=weights)


class LoraPool:
    """Device slots for resident adapters, laid out for batched application (see module doc)."""

    def __init__(self, config: ModelConfig, max_rank: int, dtype: torch.dtype,
                 device: str | torch.device, slots: int = 4) -> None:
        self.config, self.max_rank, self.dtype, self.device = config, max_rank, dtype, device
        self.shapes = module_shapes(config)
        self.adapters: dict[str, LoraAdapter] = {}
        self.num_slots = 0
        self._owners: list[LoraAdapter | None] = []
        #: ``[slots, in, len(modules) * max_rank]`` per ``(layer, group)`` (see :data:`GROUPS`)
        self.a_group: dict[tuple[int, str], torch.Tensor] = {}
        #: per ``(layer, module)``: A a view into its group's tensor, B a tensor of its own
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        self._grow(slots)

    def _grow(self, slots: int) -> None:
        r = self.max_rank
        for layer in range(self.config.num_layers):
            for group, modules in GROUPS.items():
                fan_in = self.shapes[modules[0]][0]
                a = torch.zeros(slots, fan_in, len(modules) * r, dtype=self.dtype,
                                device=self.device)
                if self.num_slots:
                    a[: self.num_slots] = self.a_group[layer, group]
                self.a_group[layer, group] = a
                for i, module in enumerate(modules):
                    self.a[layer, module] = a[:, :, i * r:(i + 1) * r]
                    b = torch.zeros(slots, r, self.shapes[module][1], dtype=self.dtype,
                                    device=self.device)
                    if self.num_slots:
                        b[: self.num_slots] = self.b[layer, module]
                    self.b[layer, module] = b
        self._owners += [None] * (slots - self.num_slots)
        self.num_slots = slots

    def get(self, path: str) -> tuple[LoraAdapter, bool]:
        """The adapter at ``path``, made resident; the flag says whether it already was."""
        adapter = self.adapters.get(path)
        if adapter is None:
            adapter = load_adapter(path, self.config, self.max_rank)
            self.adapters[path] = adapter
        was_resident = adapter.resident
        if not was_resident:
            self.load(adapter)
        return adapter, was_resident

    def load(self, adapter: LoraAdapter, owner: LoraAdapter | None = None) -> None:
        """Copy ``adapter`` into a free slot (the pool grows when none is free).

        ``owner`` is the adapter the slot is recorded for when ``adapter`` is a staged copy of
        its weights (a load through the memory manager's copy engine); by default ``adapter``.
        """
        owner = owner if owner is not None else adapter
        if adapter.resident:
            return
        try:
            slot = self._owners.index(None)
        except ValueError:
            slot = self.num_slots
            self._grow(self.num_slots * 2)
        for key in self.a:
            # A slot the adapter fills whole needs no clearing (a full-rank adapter of every
            # target: the common case); else the previous owner's weights must not leak through.
            if adapter.rank < self.max_rank or key not in adapter.weights:
                self.a[key][slot].zero_()
                self.b[key][slot].zero_()
        for key, (a, b) in adapter.weights.items():
            self.a[key][slot, :, : adapter.rank] = a.to(self.device, self.dtype)
            self.b[key][slot, : adapter.rank] = b.to(self.device, self.dtype)
        self._owners[slot] = owner
        adapter.slot = owner.slot = slot

    def offload(self, adapter: LoraAdapter) -> None:
        """Free ``adapter``'s slot; its host weights stay, so :meth:`load` restores it exactly."""
        if adapter.slot is not None:
            self._owners[adapter.slot] = None
            adapter.slot = None


@dataclass
class LoraBatch:
    """How the adapters of one iteration's tokens are applied.

    Decode tokens go through the slot-major ``bmm`` path: ``bmm_rows`` are their rows in the
    batch, placed at ``(bmm_slot, bmm_pos)`` of a ``[bmm_slots, bmm_depth, in]`` tensor.
    ``bmm_slots`` is the slot count spanned (from 0) when the batch uses most of it, so the pool is
    read in place; otherwise ``bmm_gather`` lists the used slots, copied out once per module.
    ``segments`` are ``(start, end, slot)`` runs of prefill tokens handled against one slot each.
    """

    pool: LoraPool
    bmm_rows: torch.Tensor | None = None
    bmm_slot: torch.Tensor | None = None
    bmm_pos: torch.Tensor | None = None
    bmm_slots: int = 0
    bmm_depth: int = 0
    bmm_gather: torch.Tensor | None = None
    bmm_all: bool = False
    segments: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def plan(cls, pool: LoraPool, q_lens: list[int], slots: list[int | None]) -> "LoraBatch | None":
        if all(s is None for s in slots):
            return None
        batch = cls(pool)
        rows, row_slots, start = [], [], 0
        for n, slot in zip(q_lens, slots):
            if slot is not None:
                if n == 1:
                    rows.append(start)
                    row_slots.append(slot)
                else:
                    batch.segments.append((start, start + n, slot))
            start += n
        if rows:
            used = sorted(set(row_slots))
            span = used[-1] + 1
            if 2 * len(used) >= span:  # read the pool in place, skipping the few unused slots
                index = {s: s for s in used}
                batch.bmm_slots = span
            else:  # a few slots of a big pool: copy just those out
                index = {s: i for i, s in enumerate(used)}
                batch.bmm_slots = len(used)
                batch.bmm_gather = torch.tensor(used, device=pool.device)
            depth: dict[int, int] = {}
            pos = []
            for s in row_slots:  # several decode tokens of one adapter stack along dim 1
                pos.append(depth.get(s, 0))
                depth[s] = pos[-1] + 1
            batch.bmm_depth = max(depth.values())
            device = pool.device
            batch.bmm_rows = torch.tensor(rows, device=device)
            batch.bmm_slot = torch.tensor([index[s] for s in row_slots], device=device)
            batch.bmm_pos = torch.tensor(pos, device=device)
            batch.bmm_all = len(rows) == start
        return batch

    def apply(self, layer: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the LoRA delta of ``module`` for input ``x`` into ``out`` in place."""
        self._apply(self.pool.a[layer, module], [(self.pool.b[layer, module], out)], x)

    def apply_group(self, layer: int, group: str, x: torch.Tensor,
                    outs: list[torch.Tensor]) -> None:
        """Add the deltas of every module of ``group`` (:data:`GROUPS`), all reading ``x``, into
        ``outs`` (one per module, in the group's order), with one shrink product for all."""
        modules = GROUPS[group]
        self._apply(self.pool.a_group[layer, group],
                    [(self.pool.b[layer, m], out) for m, out in zip(modules, outs)], x)

    def _apply(self, a_pool: torch.Tensor, expands: list[tuple[torch.Tensor, torch.Tensor]],
               x: torch.Tensor) -> None:
        """``out += (x @ A) @ B`` per token's slot, for ``A`` the side-by-side ``A`` matrices
        of ``expands``' modules and each ``(B, out)`` of ``expands``."""
        r = self.pool.max_rank
        if self.bmm_rows is not None:
            if self.bmm_gather is not None:
                a = a_pool.index_select(0, self.bmm_gather)
            else:
                a = a_pool[: self.bmm_slots]
            xs = x if self.bmm_all else x.index_select(0, self.bmm_rows)
            grid = x.new_zeros(self.bmm_slots, self.bmm_depth, x.shape[1])
            grid[self.bmm_slot, self.bmm_pos] = xs
            shrunk = torch.bmm(grid, a)
            for i, (b_pool, out) in enumerate(expands):
                if self.bmm_gather is not None:
                    b = b_pool.index_select(0, self.bmm_gather)
                else:
                    b = b_pool[: self.bmm_slots]
                delta = torch.bmm(shrunk[:, :, i * r:(i + 1) * r], b)[self.bmm_slot, self.bmm_pos]
                if self.bmm_all:
                    out += delta
                else:
                    out.index_add_(0, self.bmm_rows, delta)
        for s, e, slot in self.segments:
            shrunk = x[s:e] @ a_pool[slot]
            for i, (b_pool, out) in enumerate(expands):
                out[s:e] += shrunk[:, i * r:(i + 1) * r] @ b_pool[slot]
