"""experiments.diagnose_policies explains regretted evictions by the oracle's estimates (modeled)."""

import re

from experiments import diagnose_policies


def test_verbose_diagnosis_names_the_sources_behind_regretted_evictions(capsys):
    diagnose_policies.main(["town", "32", "-v", "--examples", "2"])
    out = capsys.readouterr().out
    totals = re.findall(r"^(\w+) +calls=(\d+) .*regret=(\d+) ", out, re.M)
    assert [policy for policy, *_ in totals] == ["lru", "scalesim", "belady"]
    assert all(int(calls) > 0 for _, calls, _ in totals)
    # Under the oracle every regretted eviction is put down to a source, and the examples show
    # the oracle's account of both agents; belady has no oracle to ask.
    by_source = re.findall(r"evicted object's estimate: (\{.*\})", out)
    assert len(by_source) == 3 and "no oracle" not in by_source[0] + by_source[1]
    assert "'no oracle'" in by_source[2]
    assert re.search(r"evicted \S+:.*eta [\d.]+ by \w+ \(", out)
    assert re.search(r"and kept \S+:.*eta [\d.]+ by \w+ \(", out)
