"""The prefix cache: a radix tree over the KV pool's blocks whose segments are memory objects.

Every request reuses the KV of the longest token prefix it shares with anything computed before
it, under the same adapter: a world's shared preamble, an agent's persona, the agent's own
earlier turns. The tree (one per adapter, since an adapter changes k and v) holds *segments*:
runs of full KV blocks, each the continuation of its parent. A request computes only what
follows its match; once its prompt has been computed, and again when it finishes, the blocks
it computed are inserted (shared by reference: nothing is copied), splitting a segment where
two requests part. Only full blocks are cached, so a sequence never writes into a shared block;
and a match stops one token short of the whole input, whose logits give the first new token.

Why a radix tree of segments rather than vLLM's chain of block hashes: the segment is the unit
the :class:`~runtime.memory.MemoryManager` moves. A segment is one
:class:`~runtime.memory.AgentMemory` (kind ``prefix_kv``) whose *users* are the agents whose
requests matched or computed it, so its invocation distance is the nearest of its users' (the
seed release's rule on SGLang's radix tree), and eviction, the host, disk and persistent-store
tiers and prefetch apply to it exactly as to any object. A hash chain would make every block
an object: tens per request, where a radix tree adds about one per distinct continuation.
Eviction is leaf-first (a segment with a resident continuation is not a candidate, see
:class:`~runtime.memory.residency.Residency`), and the path a running request holds is pinned.

A segment's state follows the manager's: resident with its blocks (*filled*), resident without
them (it was dropped and is being recomputed by the request that holds it, which fills it when
it inserts), or not resident (a copy below the device, or nothing: a dropped segment that is
refilled when someone computes it again). Dropped segments with no continuation are removed
from the tree and the manager. The persona boundary of the request that creates a segment is
always a segment boundary, so a persona's KV is one segment and the persistent store finds it
in a later run.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from typing import TYPE_CHECKING, Any, Callable

import torch

from runtime.kv_cache import KVCache, OutOfBlocks
from runtime.memory.objects import AgentMemory, Tensors
from runtime.memory.tiers import Tiers

if TYPE_CHECKING:
    from runtime.memory import MemoryManager
    from runtime.sequence import Sequence

Children = dict[tuple[int, ...], "Segment"]

#: What a tree keeps: every computed prefix, or only each request's persona (the reuse the
#: engine had before token-level caching, kept for comparison).
SCOPES = ("tokens", "persona")


class Segment(AgentMemory):
    """A run of full KV blocks continuing ``parent`` (``None``: the start of the input).

    ``start`` is its first block's index in the input, ``tokens`` the token ids it holds KV for
    (a whole number of blocks) and ``blocks`` the pool blocks that hold it while it is filled.
    """

    kind = "prefix_kv"
    origin = "recompute"
    threadsafe = False  # recomputing needs the model: the request that needs it prefills it
    #: whether :meth:`preload` gives the contents for free (only a model of the hardware can)
    preload_free = False
    parent: Segment | None  # a segment continues a segment
    path_hash: int

    def __init__(self, tree: PrefixTree, key: str, parent: Segment | None, adapter: str | None,
                 start: int, tokens: tuple[int, ...]) -> None:
        super().__init__(key, len(tokens) // tree.cache.block_size * tree.block_nbytes)
        self.tree = tree
        self.parent = parent
        self.adapter = adapter
        self.start = start
        self.tokens = tokens
        #: how many blocks ``tokens`` fill (asked at every step of every walk of the tree)
        self.num_blocks = len(tokens) // tree.cache.block_size
        self.children: Children = {}
        #: a hash of the input from the start through this segment (recomputation counts)
        self.path_hash = hash((parent.path_hash if parent is not None else adapter, tokens))
        self.blocks: list[int] = []
        #: the agent whose request computed it first (names its parts when it is split)
        self.creator = ""
        self._recomputing = False

    @property
    def filled(self) -> bool:
        """Resident with its KV in the pool (usable by a request now)."""
        return self.device is not None and bool(self.blocks)

    def dependents(self) -> list[Segment]:
        return list(self.children.values())

    def materialize(self) -> Tensors:
        self._recomputing = True  # resident empty: the request that holds it computes it
        return {}

    def on_device(self, tensors: Tensors) -> Tensors:
        recomputing, self._recomputing = self._recomputing, False
        if recomputing or self.blocks:
            return {}
        cache = self.tree.cache
        try:
            blocks = cache.allocate(self.num_blocks)
        except OutOfBlocks:
            return {}  # the pool is full of running sequences: recomputed instead
        self._write(blocks, tensors)
        self.blocks = blocks
        return {}

    def device_tensors(self) -> Tensors:
        return self._read() if self.blocks else {}

    def off_device(self) -> None:
        self.tree.cache.release(self.blocks)
        self.blocks = []
        self.tree.left(self)

    def _read(self) -> Tensors:
        k, v = self.tree.cache.read(self.blocks)
        return {"k": k, "v": v}

    def _write(self, blocks: list[int], tensors: Tensors) -> None:
        self.tree.cache.write(blocks, tensors["k"], tensors["v"])

    def split_contents(self, head: Segment, tail: Segment, at: int) -> None:
        head.blocks, tail.blocks = self.blocks[:at], self.blocks[at:]
        self.blocks = []


class SizedSegment(Segment):
    """A segment of a sizing-only pool (the modeled executor): blocks are counted, never read.

    A placeholder tensor stands for its computed KV, so the tiers keep a copy (the manager
    counts ``nbytes``, not the placeholder's size), and a load installs blocks without data.
    """

    def _read(self) -> Tensors:
        return {"kv": torch.empty(0)}

    preload_free = True

    def _write(self, blocks: list[int], tensors: Tensors) -> None:
        pass

    def preload(self) -> Tensors | None:
        return {}  # sizes only: resident from the start means already computed


class PrefixTree:
    """The radix tree of one KV pool under ``manager`` (see the module docstring).

    ``block_nbytes`` is what one block of KV weighs in the manager's budget (the pool's own
    blocks, or the modeled model's); ``scope`` what it keeps (:data:`SCOPES`), and
    ``cache_outputs=False`` leaves generated tokens out (a modeled reply is placeholder ids that
    no later prompt contains: cached, they would only take room); ``segment`` the segment class (:class:`SizedSegment` for a
    sizing-only pool); ``identity(segment, token_ids)`` what the KV of a segment whose input
    begins with ``token_ids`` is computed from (the persistent store's key), ``None`` for none.
    """

    def __init__(self, cache: KVCache, manager: MemoryManager, *, block_nbytes: int | None = None,
                 segment: type[Segment] = Segment,
                 identity: Callable[[Segment, list[int]], dict[str, Any] | None] | None = None,
                 scope: str = "tokens", cache_outputs: bool = True) -> None:
        if scope not in SCOPES:
            raise ValueError(f"prefix cache scope {scope!r}: choose one of {', '.join(SCOPES)}")
        self.scope = scope
        self.cache_outputs = cache_outputs
        self.cache = cache
        self.manager = manager
        self.block_nbytes = cache.block_nbytes if block_nbytes is None else block_nbytes
        self.enabled = manager.policy.keep_between_calls
        self._segment = segment
        self._identity = identity
        self._roots: dict[str | None, Children] = {}
        self._keys = itertools.count()
        self._left: list[Segment] = []
        self._seen: set[int] = set()
        #: input tokens computed and inserted again after they had been cached and lost
        self.recomputed_tokens = 0

    # -- reading ------------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """Every segment in the tree, parents before their continuations."""
        out: list[Segment] = []
        stack = [s for root in self._roots.values() for s in root.values()]
        while stack:
            seg = stack.pop()
            out.append(seg)
            stack.extend(seg.children.values())
        return out

    def match(self, adapter: str | None, token_ids: tuple[int, ...],
              max_blocks: int) -> list[tuple[Segment, int]]:
        """The segments along ``token_ids`` (at most ``max_blocks`` blocks of it), each with how
        many of its blocks match: all of them but perhaps the last segment's. A tuple (a
        sequence's :attr:`~runtime.sequence.Sequence.input_tokens`): its slices are the keys."""
        bs = self.cache.block_size
        out: list[tuple[Segment, int]] = []
        children = self._roots.get(adapter)
        pos = 0
        while children and pos < max_blocks:
            seg = children.get(token_ids[pos * bs:(pos + 1) * bs])
            if seg is None:
                break
            n = min(seg.num_blocks, max_blocks - pos)
            if seg.tokens[:n * bs] != token_ids[pos * bs:(pos + n) * bs]:
                n = next(i for i in range(1, n)
                         if seg.tokens[i * bs:(i + 1) * bs]
                         != token_ids[(pos + i) * bs:(pos + i + 1) * bs])
            out.append((seg, n))
            if n < seg.num_blocks:
                break
            children = seg.children
            pos += n
        return out

    def path(self, seq: Sequence) -> list[Segment]:
        """The segments a request would reuse, for the manager to make resident: its match, up
        to the first segment that has neither a device nor a copy below it (that one is
        included: the request's prefill recomputes it)."""
        if not self.enabled:
            return []
        self.sweep()
        out = []
        matched = self.match(seq.request.adapter, seq.input_tokens, self._max_blocks(seq))
        for seg, _ in matched:
            out.append(seg)
            if seg.device is None and not Tiers.copyable(seg):
                return out
        rest = self._persona_rest(seq, matched)
        return out + [rest] if rest is not None else out

    def _persona_rest(self, seq: Sequence,
                      matched: list[tuple[Segment, int]]) -> Segment | None:
        """A segment for the rest of ``seq``'s persona where the tree ends before it at a
        segment boundary and it can be had without computing it: from the persistent store,
        where an earlier run stored exactly that segment, or, under the ``infinite`` bound,
        resident from the start when a model of the hardware makes that free
        (:meth:`SizedSegment.preload`)."""
        bs = self.cache.block_size
        persona = min(len(seq.prefix_ids) // bs, self._max_blocks(seq))
        parent = matched[-1][0] if matched else None
        if parent is not None and matched[-1][1] < parent.num_blocks:
            return None
        start = 0 if parent is None else parent.start + parent.num_blocks
        if start >= persona:
            return None
        store = self.manager.tiers.store
        free = self.manager.policy.resident_from_start and self._segment.preload_free
        if not free and (self._identity is None or store is None):
            return None
        ids = seq.input_tokens
        seg = self._new(parent, seq.request.adapter, start, ids[start * bs:persona * bs],
                        seq.request.agent_id, ids, persona * bs)
        if not free and (seg.identity is None or store is None or not store.has(seg.identity)):
            return None
        siblings = parent.children if parent is not None else \
            self._roots.setdefault(seq.request.adapter, {})
        siblings[seg.tokens[:bs]] = seg
        self.manager.register(seg)  # found in the store, or resident from the start
        return seg

    def chain(self, seq: Sequence) -> list[int]:
        """One hash per full block of ``seq``'s prompt a request could reuse, each of the block
        and every one before it under the adapter (made once per sequence)."""
        if seq.block_chain is None:
            bs, ids = self.cache.block_size, seq.input_tokens
            chain, h = [], hash(seq.request.adapter)
            for k in range(0, (len(ids) - 1) // bs * bs, bs):
                h = hash((h, ids[k:k + bs]))
                chain.append(h)
            seq.block_chain = chain
        return seq.block_chain

    def cached_blocks(self, seq: Sequence) -> int:
        """How many of ``seq``'s leading blocks the tree holds filled now."""
        n = 0
        for seg, blocks in self.match(seq.request.adapter, seq.input_tokens,
                                      self._max_blocks(seq)):
            if not seg.filled:
                break
            n += blocks
        return n

    def _max_blocks(self, seq: Sequence) -> int:
        # One token is always computed: its logits give the next output token.
        return (seq.num_tokens - 1) // self.cache.block_size

    # -- a request's use ----------------------------------------------------------------------

    def attach(self, seq: Sequence) -> None:
        """Give ``seq`` (no blocks yet) the filled blocks of its longest match (the tokens it
        reuses are ``len(seq.block_table) * block_size``)."""
        table: list[int] = []
        for seg, n in self.match(seq.request.adapter, seq.all_tokens, self._max_blocks(seq)):
            if not seg.filled:
                break
            table += seg.blocks[:n]
        seq.block_table = self.cache.share(table)

    def insert(self, seq: Sequence) -> None:
        """Cache the full blocks ``seq`` has computed (after its prompt, and when it finishes)."""
        if not self.enabled:
            return
        self.sweep()
        bs = self.cache.block_size
        ids = seq.all_tokens
        end = min(seq.num_computed, len(ids)) // bs
        if self.scope == "persona":
            end = min(end, len(seq.prefix_ids) // bs)
        elif not self.cache_outputs:
            end = min(end, seq.num_prompt_tokens // bs)
        table, agent, adapter = seq.block_table, seq.request.agent_id, seq.request.adapter
        parent: Segment | None = None
        children = self._roots.setdefault(adapter, {})
        pos = 0
        protect: set[str] = set()
        while pos < end:
            seg = children.get(ids[pos * bs:(pos + 1) * bs])
            if seg is None:
                self._grow(parent, children, seq, ids, pos, end, protect)
                return
            n = min(seg.num_blocks, end - pos)
            if seg.tokens[:n * bs] != ids[pos * bs:(pos + n) * bs]:  # else all n match
                n = next(i for i in range(1, n)
                         if seg.tokens[i * bs:(i + 1) * bs] != ids[(pos + i) * bs:
                                                                   (pos + i + 1) * bs])
            if n < seg.num_blocks:
                head = self._split(seg, n)
                if head is None:
                    return  # being loaded: cached another time
                seg = head
            if not seg.filled:
                if seg.device is None:
                    seg.blocks = self.cache.share(table[pos:pos + n])
                    if not self.manager.install_computed(seg, [agent], protect=protect):
                        self.cache.release(seg.blocks)
                        seg.blocks = []
                        return
                else:  # resident and empty: this request recomputed it
                    seg.blocks = self.cache.share(table[pos:pos + n])
                self.recomputed_tokens += n * bs
            self.manager.register(seg, [agent])
            protect.add(seg.key)
            parent, children, pos = seg, seg.children, pos + n

    def _grow(self, parent: Segment | None, children: Children, seq: Sequence,
              ids: tuple[int, ...], pos: int, end: int, protect: set[str]) -> None:
        """New segments for blocks ``pos:end`` of ``seq`` (whose tokens are ``ids``) below
        ``parent`` (a boundary at the persona's end), each installed as computed while the
        budget allows."""
        bs = self.cache.block_size
        persona = len(seq.prefix_ids) // bs
        cuts = [pos, persona, end] if pos < persona < end else [pos, end]
        agent = seq.request.agent_id
        for a, b in zip(cuts, cuts[1:]):
            seg = self._new(parent, seq.request.adapter, a, ids[a * bs:b * bs], agent, ids,
                            b * bs)
            seg.blocks = self.cache.share(seq.block_table[a:b])
            if seg.path_hash in self._seen:
                self.recomputed_tokens += len(seg.tokens)
            self._seen.add(seg.path_hash)
            children[seg.tokens[:bs]] = seg
            # A persona computed is worth a row of the memory log; other segments are not
            # (nearly every call inserts some).
            cause = "persona" if b == persona else None
            if not self.manager.install_computed(seg, [agent], protect=protect, log=cause):
                del children[seg.tokens[:bs]]
                self.cache.release(seg.blocks)
                seg.blocks = []
                self.manager.forget(seg)
                return
            protect.add(seg.key)
            parent, children = seg, seg.children

    def _new(self, parent: Segment | None, adapter: str | None, start: int,
             tokens: tuple[int, ...], agent: str, source: tuple[int, ...] | list[int],
             end: int) -> Segment:
        """A segment of ``tokens``; its input from the start through it is ``source[:end]``
        (copied only for an identity)."""
        bs = self.cache.block_size
        key = f"prefix_kv:{agent}:{start * bs}-{start * bs + len(tokens)}#{next(self._keys)}"
        seg = self._segment(self, key, parent, adapter, start, tokens)
        seg.creator = agent
        if self._identity is not None:
            seg.identity = self._identity(seg, list(source[:end]))
        return seg

    def _split(self, seg: Segment, at: int) -> Segment | None:
        """Cut ``seg`` after ``at`` blocks into a head and its one continuation, in the tree and
        in the manager; ``None`` (nothing changes) while ``seg`` is being loaded."""
        if seg.key in self.manager.inflight:
            return None
        bs = self.cache.block_size
        agent = seg.creator
        full = _input_of(seg)
        head = self._new(seg.parent, seg.adapter, seg.start, seg.tokens[:at * bs], agent,
                         full, (seg.start + at) * bs)
        tail = self._new(head, seg.adapter, seg.start + at, seg.tokens[at * bs:], agent, full,
                         len(full))
        tail.children = seg.children
        for child in tail.children.values():
            child.parent = tail
        head.children = {tail.tokens[:bs]: tail}
        seg.split_contents(head, tail, at)
        siblings = self._siblings(seg)
        siblings[head.tokens[:bs]] = head
        seg.children = {}
        self.manager.replace(seg, [head, tail])
        return head

    def _siblings(self, seg: Segment) -> Children:
        return seg.parent.children if seg.parent is not None else self._roots[seg.adapter]

    # -- pruning ------------------------------------------------------------------------------

    def left(self, seg: Segment) -> None:
        """``seg`` left the device: if nothing below keeps a copy, :meth:`sweep` removes it."""
        self._left.append(seg)

    def sweep(self) -> None:
        """Remove the dropped segments without continuations (and parents left bare by it)."""
        while self._left:
            seg = self._left.pop()
            if (seg.device is not None or seg.children or seg.pins or Tiers.copyable(seg)
                    or self.manager.objects.get(seg.key) is not seg):
                continue
            siblings = self._siblings(seg)
            if siblings.get(seg.tokens[:self.cache.block_size]) is seg:
                del siblings[seg.tokens[:self.cache.block_size]]
            self.manager.forget(seg)
            if seg.parent is not None and seg.parent.device is None:
                self._left.append(seg.parent)

    def check(self) -> None:
        """Assert the tree's invariants (tests): links, sizes, and that a filled segment's
        blocks are referenced in the pool."""
        bs = self.cache.block_size
        for seg in self.segments():
            assert len(seg.tokens) % bs == 0 and seg.tokens, seg.key
            assert self._siblings(seg)[seg.tokens[:bs]] is seg, seg.key
            for child in seg.children.values():
                assert child.parent is seg and child.start == seg.start + seg.num_blocks
            if seg.blocks:
                assert seg.device is not None and len(seg.blocks) == seg.num_blocks, seg.key
                assert all(self.cache.refs(b) > 0 for b in seg.blocks), seg.key
            assert self.manager.objects.get(seg.key) is seg, seg.key


def _input_of(seg: Segment) -> list[int]:
    """The input tokens from the start through ``seg``."""
    parts = []
    node: Segment | None = seg
    while node is not None:
        parts.append(node.tokens)
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def token_digest(token_ids: list[int]) -> str:
    """A stable digest of token ids (for identities)."""
    return hashlib.sha256(array("i", token_ids).tobytes()).hexdigest()
