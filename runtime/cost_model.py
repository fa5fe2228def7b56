"""The cost model behind the ``modeled`` executor: how long a batch step and a copy take.

A :class:`HardwareProfile` is a row of public numbers about one accelerator: dense 16-bit matrix
FLOP/s, memory bandwidth, the host link (bandwidth and per-transfer latency) and its memory size.
:data:`HARDWARE` is the table. A :class:`CostModel` pairs a hardware profile with a model
architecture (:class:`~runtime.model.profiles.ModelConfig`) and prices

* one engine iteration by a *roofline*: the step is bound either by arithmetic (linear layers,
  attention, LoRA) or by the bytes it must read (weights once, each sequence's KV, each distinct
  adapter once), whichever is slower, plus a fixed per-step and per-sequence overhead;
* one copy over the host link: latency plus bytes over bandwidth; a copy from the disk tier
  first reads the object from disk (per-request latency plus bytes over the disk's bandwidth),
  then crosses the link.

Peak numbers are never reached, so each side is scaled by an efficiency factor. The GPU rows carry
assumed factors (typical of well-tuned serving stacks, not measured here); the ``cpu`` row is
fitted to this machine by ``python -m experiments.calibrate`` and records its fit error. Every
number that comes out of this module is *modeled*, and whoever prints it says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from runtime.model.profiles import ModelConfig

#: Modules of every layer that a LoRA adapter targets (all linear layers, as in the paper setup).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class HardwareProfile:
    """Peak capabilities of one device and the efficiency with which a serving stack uses them.

    ``flops`` is dense 16-bit tensor throughput (FLOP/s), ``mem_bw`` device memory bandwidth and
    ``link_bw`` the host-to-device link (bytes/s), ``link_latency`` seconds per transfer;
    ``disk_bw`` and ``disk_latency`` the disk tier's read bandwidth (bytes/s, direct I/O) and
    seconds per object read (open, header, checksum setup).
    ``eff_*`` scale the peaks; ``step_overhead`` and ``seq_overhead`` are seconds per iteration and
    per sequence in it (scheduling, kernel launches, sampling). ``source`` says where the numbers
    come from.
    """

    name: str
    flops: float
    mem_bw: float
    link_bw: float
    link_latency: float
    mem_bytes: float
    dtype_bytes: int = 2
    eff_compute: float = 0.6
    eff_memory: float = 0.75
    eff_link: float = 0.8
    step_overhead: float = 2e-3
    seq_overhead: float = 10e-6
    #: a datacenter PCIe Gen4 NVMe drive (sequential read ~7 GB/s); assumed for the GPU rows
    disk_bw: float = 7 * 1e9
    disk_latency: float = 100e-6
    source: str = ""


GB = 1e9
T = 1e12

#: Public spec-sheet numbers (SXM parts; dense BF16, no sparsity). Efficiencies are assumptions.
HARDWARE: dict[str, HardwareProfile] = {
    p.name: p for p in (
        HardwareProfile("H100", flops=989 * T, mem_bw=3.35e12, link_bw=64 * GB,
                        link_latency=10e-6, mem_bytes=80 * GB,
                        source="NVIDIA H100 SXM datasheet: 989 TFLOP/s BF16, 3.35 TB/s HBM3, "
                               "PCIe Gen5 x16 64 GB/s; efficiencies assumed"),
        HardwareProfile("H200", flops=989 * T, mem_bw=4.8e12, link_bw=64 * GB,
                        link_latency=10e-6, mem_bytes=141 * GB,
                        source="NVIDIA H200 SXM datasheet: 989 TFLOP/s BF16, 4.8 TB/s HBM3e, "
                               "PCIe Gen5 x16 64 GB/s; efficiencies assumed"),
        HardwareProfile("A100-80G", flops=312 * T, mem_bw=2.039e12, link_bw=32 * GB,
                        link_latency=10e-6, mem_bytes=80 * GB,
                        source="NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s BF16, 2.039 TB/s "
                               "HBM2e, PCIe Gen4 x16 32 GB/s; efficiencies assumed"),
        HardwareProfile("L4", flops=121 * T, mem_bw=300 * GB, link_bw=32 * GB,
                        link_latency=10e-6, mem_bytes=24 * GB,
                        source="NVIDIA L4 datasheet: 121 TFLOP/s BF16 dense, 300 GB/s GDDR6, "
                               "PCIe Gen4 x16 32 GB/s; efficiencies assumed"),
        # The CPU row is this 2-vCPU AMD EPYC VM running the torch executor in float32. Peaks
        # are nominal: 2 cores x two 512-bit FMA pipes (avx512f) x 2.6 GHz = 333 GFLOP/s, and
        # 50 GB/s of DRAM bandwidth for a VM slice; the efficiencies and overheads are those
        # experiments/calibrate.py fitted (88 steps of SmolLM2-135M on the quiet machine, with
        # persona prefixes up to ~1,000 tokens; mean relative error 6.4%, max 27%; 2026-11-25).
        HardwareProfile("cpu", flops=333e9, mem_bw=50 * GB, link_bw=5 * GB,
                        link_latency=20e-6, mem_bytes=8 * GB, dtype_bytes=4,
                        eff_compute=0.7878, eff_memory=0.4741, eff_link=1.0,
                        step_overhead=0.000584, seq_overhead=0.000718,
                        # Direct-I/O reads of object files, 1-256 MiB, fitted by
                        # `calibrate --disk-only` (quiet machine, 2026-12-02; mean rel. error 19%).
                        disk_bw=1.14e9, disk_latency=0.00093,
                        source="nominal 2-core VM; efficiencies fitted by experiments/calibrate.py"),
    )
}


def hardware(name: str, **overrides: Any) -> HardwareProfile:
    """The profile ``name`` from :data:`HARDWARE`, with fields replaced by ``overrides``."""
    if name not in HARDWARE:
        raise KeyError(f"unknown hardware profile {name!r}; built-in: {', '.join(HARDWARE)}")
    return replace(HARDWARE[name], **overrides)


@dataclass(frozen=True)
class SeqWork:
    """What one sequence computes in one step: ``new`` tokens after ``past`` tokens of KV.

    ``sampled`` is whether the step produces an output token for it (its chunk reaches the end);
    ``lora`` is the adapter it uses (``None``: base model) and ``rank`` that adapter's rank.
    """

    new: int
    past: int
    sampled: bool = True
    lora: str | None = None
    rank: int = 0


@dataclass
class StepCost:
    """The parts of one modeled step, in seconds and raw units (for calibration and reports)."""

    seconds: float
    compute_s: float
    memory_s: float
    overhead_s: float
    flops: float
    bytes: float


@dataclass
class CostModel:
    """Roofline step time and link copy time for one model on one device (all modeled).

    ``dtype_bytes`` defaults to the hardware profile's; after construction it is always set.
    """

    hw: HardwareProfile
    model: ModelConfig
    dtype_bytes: int | None = None
    # dtype_bytes once resolved, typed as a plain int for the arithmetic below. Like
    # _weight_bytes it is fixed at construction.
    _dtype_bytes: int = field(init=False, repr=False, compare=False)
    _linear_flops_per_token: float = field(init=False)
    _weight_bytes: float = field(init=False)
    _lora_cache: dict[int, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype_bytes is None:
            self.dtype_bytes = self.hw.dtype_bytes
        self._dtype_bytes = self.dtype_bytes
        m = self.model
        embed = m.vocab_size * m.hidden_size
        body = m.num_parameters() - embed * (1 if m.tie_word_embeddings else 2) - m.hidden_size
        # Every new token goes through every layer's matrices (2 FLOP per weight).
        self._linear_flops_per_token = 2.0 * body
        self._weight_bytes = float(m.num_parameters() * self._dtype_bytes)

    # -- sizes --------------------------------------------------------------------------------

    @property
    def weight_bytes(self) -> float:
        return self._weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token(self._dtype_bytes)

    def lora_bytes(self, rank: int) -> int:
        """Bytes of a rank-``rank`` adapter on all linear layers (A and B matrices)."""
        if rank not in self._lora_cache:
            self._lora_cache[rank] = self._lora_bytes(rank)
        return self._lora_cache[rank]

    def _lora_bytes(self, rank: int) -> int:
        m = self.model
        h, i, q, kv = m.hidden_size, m.intermediate_size, m.q_size, m.kv_size
        dims = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h),
                "gate": (h, i), "up": (h, i), "down": (i, h)}
        per_layer = sum(rank * (a + b) for a, b in (dims[t] for t in LORA_TARGETS))
        return per_layer * m.num_layers * self._dtype_bytes

    # -- time ---------------------------------------------------------------------------------

    def step(self, work: Iterable[SeqWork]) -> StepCost:
        """The modeled duration of one iteration that computes ``work``."""
        m, hw = self.model, self.hw
        linear = attn = lora = 0.0
        kv_read = 0.0
        sampled = 0
        adapters: dict[str, int] = {}
        n = 0
        for w in work:
            n += 1
            linear += w.new * self._linear_flops_per_token
            # Causal attention: QK^T and PV, each 2 FLOP per (query, key, head_dim) pair.
            keys = w.past * w.new + w.new * (w.new + 1) / 2
            attn += 4.0 * keys * m.num_heads * m.head_dim * m.num_layers
            kv_read += (w.past + w.new) * self.kv_bytes_per_token
            sampled += w.sampled
            if w.lora is not None and w.rank:
                lora += 2.0 * w.new * self.lora_bytes(w.rank) / self._dtype_bytes
                adapters[w.lora] = w.rank
        if n == 0:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        head = 2.0 * sampled * m.vocab_size * m.hidden_size
        flops = linear + attn + lora + head
        nbytes = (self._weight_bytes + kv_read
                  + sum(self.lora_bytes(r) for r in adapters.values()))
        compute_s = flops / (hw.flops * hw.eff_compute)
        memory_s = nbytes / (hw.mem_bw * hw.eff_memory)
        overhead_s = hw.step_overhead + n * hw.seq_overhead
        return StepCost(max(compute_s, memory_s) + overhead_s, compute_s, memory_s, overhead_s,
                        flops, nbytes)

    def step_seconds(self, work: Iterable[SeqWork]) -> float:
        return self.step(work).seconds

    def decode_seconds(self, work: list[SeqWork], steps: int) -> float:
        """Total time of ``steps`` consecutive decode steps of the sequences in ``work``.

        Every sequence computes one new token per step and its ``past`` grows by one after each;
        the result equals summing :meth:`step` over the steps, in O(len(work) + steps).
        """
        first = self.step(work)
        if steps <= 1 or not work:
            return first.seconds * max(steps, 0)
        m, hw = self.model, self.hw
        n = len(work)
        # Per step, each sequence attends to one more key and reads one more token of KV.
        flops_step = n * 4.0 * m.num_heads * m.head_dim * m.num_layers
        bytes_step = n * self.kv_bytes_per_token
        total = 0.0
        for j in range(steps):
            compute_s = (first.flops + j * flops_step) / (hw.flops * hw.eff_compute)
            memory_s = (first.bytes + j * bytes_step) / (hw.mem_bw * hw.eff_memory)
            total += max(compute_s, memory_s) + first.overhead_s
        return total

    def copy_seconds(self, nbytes: float, source: str = "host") -> float:
        """Modeled time to move ``nbytes`` to the device from ``source``: over the link from the
        host, or read from the disk tier first (``source="disk"``)."""
        seconds = self.hw.link_latency + nbytes / (self.hw.link_bw * self.hw.eff_link)
        if source == "disk":
            seconds += self.hw.disk_latency + nbytes / self.hw.disk_bw
        return seconds
