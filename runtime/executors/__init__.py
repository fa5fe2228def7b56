"""Executors: what actually advances a batch of sequences (protocol: :mod:`runtime.executors.base`).

``torch`` is the real paged engine, ``hf`` the transformers baseline, ``modeled`` the cost model.
"""
