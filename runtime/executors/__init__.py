"""Executors: what actually advances a batch of sequences.

An executor has a ``chat`` (:class:`~runtime.model.chat.ChatFormat`), ``eos_token_ids``,
``max_context``, ``max_num_seqs`` and ``execute(batch)``, which appends newly generated tokens to
each sequence of the batch (or fails it). The engine owns admission and finishing.
"""
