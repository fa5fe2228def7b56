"""The roofline cost model: sizes, monotonicity, the bound that dominates, copy time."""

import pytest

from runtime.cost_model import HARDWARE, CostModel, SeqWork, hardware
from runtime.model.profiles import profile


def test_every_hardware_row_is_positive_and_sourced():
    for hw in HARDWARE.values():
        assert hw.flops > 0 and hw.mem_bw > 0 and hw.link_bw > 0 and hw.mem_bytes > 0
        assert 0 < hw.eff_compute and 0 < hw.eff_memory and 0 < hw.eff_link
        assert hw.source


def test_unknown_hardware_names_the_choices():
    with pytest.raises(KeyError, match="H100"):
        hardware("TPU")


def test_sizes_of_qwen_7b():
    cost = CostModel(hardware("H100"), profile("qwen2.5-7b"))
    assert 14e9 < cost.weight_bytes < 16e9  # ~7.6B parameters in bf16
    assert cost.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert cost.lora_bytes(64) == 4 * cost.lora_bytes(16)


def test_decode_is_memory_bound_and_long_prefill_compute_bound():
    cost = CostModel(hardware("H100"), profile("qwen2.5-7b"))
    decode = cost.step([SeqWork(new=1, past=500)])
    assert decode.memory_s > decode.compute_s
    prefill = cost.step([SeqWork(new=8192, past=0)])
    assert prefill.compute_s > prefill.memory_s


def test_step_time_grows_with_work():
    cost = CostModel(hardware("A100-80G"), profile("llama-3-8b"))
    small = cost.step_seconds([SeqWork(new=1, past=100)] * 4)
    more_seqs = cost.step_seconds([SeqWork(new=1, past=100)] * 64)
    longer = cost.step_seconds([SeqWork(new=1, past=20000)] * 4)
    assert small < more_seqs and small < longer
    assert cost.step_seconds([]) == 0.0


def test_adapters_are_read_once_per_step():
    cost = CostModel(hardware("H100"), profile("qwen2.5-7b"))
    shared = cost.step([SeqWork(1, 100, lora="a", rank=64)] * 8)
    distinct = cost.step([SeqWork(1, 100, lora=f"a{i}", rank=64) for i in range(8)])
    assert distinct.bytes - shared.bytes == pytest.approx(7 * cost.lora_bytes(64))


def test_copy_time_is_latency_plus_bandwidth():
    hw = hardware("H100", eff_link=1.0)
    cost = CostModel(hw, profile("qwen2.5-7b"))
    assert cost.copy_seconds(0) == pytest.approx(hw.link_latency)
    assert cost.copy_seconds(64e9) == pytest.approx(hw.link_latency + 1.0)


def test_decode_seconds_equals_stepping_one_decode_at_a_time():
    from runtime.cost_model import CostModel, SeqWork, hardware
    from runtime.model.profiles import profile

    cost = CostModel(hardware("H100"), profile("qwen2.5-7b"))
    work = [SeqWork(1, p, True, f"a{p % 3}", 16) for p in (100, 900, 4000)]
    stepped = sum(cost.step_seconds([SeqWork(1, w.past + j, True, w.lora, w.rank) for w in work])
                  for j in range(6))
    assert cost.decode_seconds(work, 6) == pytest.approx(stepped, rel=1e-12)
    assert cost.decode_seconds(work, 1) == cost.step_seconds(work)
