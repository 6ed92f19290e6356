"""ConceptTrie: the catalog's concept IDs as a prefix tree in CSR arrays.

Layout (mirrors ``csrc/trie.h``): nodes are the distinct code prefixes, numbered breadth-first
in lexicographic order (node 0 = root). The children of node ``v`` are the node ids
``offsets[v] .. offsets[v+1]-1`` and their codes ``codes[offsets[v]:offsets[v+1]]`` are strictly
increasing. Depth-``L`` nodes (leaves) map to item indices through ``leaf_items``. A beam's trie
state is a node id (``-1`` = dead); one decode step gathers the state's children directly.

Example:
    >>> import numpy as np
    >>> from recbase import ConceptTrie
    >>> trie = ConceptTrie(np.array([[0, 1], [0, 2], [3, 0]]), codebook_size=4)
    >>> trie.num_items, trie.depth, trie.num_nodes
    (3, 2, 6)
    >>> trie.lookup(np.array([[0, 2], [1, 1]])).tolist()
    [1, -1]
    >>> trie.subset([2, 0]).lookup(np.array([[0, 2], [3, 0]])).tolist()
    [-1, 2]
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from recbase._native import C

__all__ = ["ConceptTrie", "TrieTensors"]


class TrieTensors(NamedTuple):
    """The trie's arrays as int64 tensors on one device (what the beam-step op consumes)."""

    offsets: torch.Tensor  # [num_nodes + 1]
    codes: torch.Tensor  # [num_nodes]
    leaf_items: torch.Tensor  # [num_items]
    root_table: torch.Tensor  # [K]
    level_start: torch.Tensor  # [depth + 2]
    leaf_start: int  # first leaf node id
    trie_id: int


def _as_int64_matrix(codes, name: str) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (N, L), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


class ConceptTrie:
    """Prefix tree of concept IDs; ``ConceptTrie(codes)`` with ``codes`` shaped (N, L), row i = item i.

    Args:
        codes: integer array/tensor (N, L) of codes in ``[0, codebook_size)``; rows must be unique.
        codebook_size: K; defaults to ``codes.max() + 1``.

    Raises ValueError on an empty catalog, codes out of range or duplicate rows (naming both items).
    """

    def __init__(self, codes, codebook_size: int | None = None):
        arr = _as_int64_matrix(codes, "codes")
        if arr.shape[0] == 0:
            raise ValueError("codes: empty catalog (expected at least one item row)")
        if codebook_size is None:
            codebook_size = int(arr.max()) + 1
        self._init_native(C.ConceptTrie.build(arr, int(codebook_size)))

    def _init_native(self, native) -> None:
        self._native = native
        self._tensors: dict[str, TrieTensors] = {}

    @classmethod
    def _wrap(cls, native) -> "ConceptTrie":
        obj = cls.__new__(cls)
        obj._init_native(native)
        return obj

    # ------------------------------------------------------------------ properties
    @property
    def num_items(self) -> int:
        return self._native.num_items

    @property
    def depth(self) -> int:
        """L, the number of levels (codes per item)."""
        return self._native.depth

    @property
    def codebook_size(self) -> int:
        return self._native.codebook_size

    @property
    def num_nodes(self) -> int:
        return self._native.num_nodes

    @property
    def item_space(self) -> int:
        """Item indices lie in ``[0, item_space)`` (the original catalog size; kept by ``subset``)."""
        return self._native.item_space

    @property
    def trie_id(self) -> int:
        """64-bit fingerprint of the trie's arrays; equal tries have equal ids."""
        return self._native.fingerprint

    @property
    def memory_bytes(self) -> int:
        return self._native.memory_bytes

    @property
    def offsets(self) -> np.ndarray:
        """[num_nodes + 1]: children of node v are the node ids offsets[v] .. offsets[v+1]-1."""
        return self._native.offsets

    @property
    def codes(self) -> np.ndarray:
        """[num_nodes]: code of the edge into each node (root: -1). Not the item rows: see
        :meth:`item_codes`."""
        return self._native.codes

    @property
    def leaf_items(self) -> np.ndarray:
        """[num_items]: item index of leaf node ``level_start[depth] + j``."""
        return self._native.leaf_items

    @property
    def root_table(self) -> np.ndarray:
        """[K]: dense first level, the root's child node for each code, or -1."""
        return self._native.root_table

    @property
    def level_start(self) -> np.ndarray:
        """First node id of each depth 0..L, then num_nodes."""
        return self._native.level_start

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"ConceptTrie(num_items={self.num_items}, depth={self.depth}, "
                f"codebook_size={self.codebook_size}, num_nodes={self.num_nodes}, "
                f"memory_bytes={self.memory_bytes})")

    # ------------------------------------------------------------------ queries
    def lookup(self, codes):
        """Item index of each code row (M, L), or -1 for rows not in the catalog.

        Returns a LongTensor for tensor input, else a numpy array.
        """
        is_tensor = isinstance(codes, torch.Tensor)
        arr = _as_int64_matrix(codes, "codes")
        if arr.shape[1] != self.depth:
            raise ValueError(f"codes: expected shape (M, {self.depth}), got {arr.shape}")
        out = self._native.lookup(arr)
        return torch.from_numpy(out).to(codes.device) if is_tensor else out

    def subset(self, item_indices) -> "ConceptTrie":
        """The trie restricted to ``item_indices`` (original item numbering kept); O(num_nodes)."""
        if isinstance(item_indices, torch.Tensor):
            item_indices = item_indices.detach().cpu().numpy()
        arr = np.asarray(item_indices)
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(f"item_indices: expected integers, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)
        return ConceptTrie._wrap(self._native.subset(arr))

    def children(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes, node ids) of the children of trie node ``state`` (for inspection)."""
        return self._native.children(int(state))

    def node_depth(self, state: int) -> int:
        return self._native.node_depth(int(state))

    def item_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(items [N], codes [N, L]) of all items, in lexicographic code order."""
        return self.leaf_items, self._native.leaf_codes()

    def items_of(self, states: torch.Tensor) -> torch.Tensor:
        """Item index of leaf states (any shape); -1 where the state is -1 (dead)."""
        t = self.tensors(states.device)
        live = states >= t.leaf_start
        idx = (states - t.leaf_start).clamp(0, self.num_items - 1)
        return torch.where(live, t.leaf_items[idx], torch.full_like(states, -1))

    # ------------------------------------------------------------------ tensors / serialisation
    def tensors(self, device: torch.device | str = "cpu") -> TrieTensors:
        """The CSR arrays as int64 tensors on ``device`` (cached per device)."""
        device = torch.device(device)
        key = str(device)
        if key not in self._tensors:
            def to(a):
                return torch.from_numpy(np.ascontiguousarray(a)).to(device)
            ls = self.level_start
            self._tensors[key] = TrieTensors(
                to(self.offsets), to(self.codes), to(self.leaf_items), to(self.root_table), to(ls),
                int(ls[self.depth]), self.trie_id)
        return self._tensors[key]

    def to_dict(self, prefix: str = "trie.") -> dict[str, np.ndarray]:
        """Arrays for ``safetensors.numpy.save_file`` (keys prefixed by ``prefix``)."""
        meta = np.array([self.depth, self.codebook_size, self.item_space], dtype=np.int64)
        return {f"{prefix}offsets": self.offsets, f"{prefix}codes": self.codes,
                f"{prefix}leaf_items": self.leaf_items, f"{prefix}meta": meta}

    @classmethod
    def from_dict(cls, arrays: dict, prefix: str = "trie.") -> "ConceptTrie":
        """Inverse of :meth:`to_dict`; validates the arrays' structure."""
        def get(name):
            key = f"{prefix}{name}"
            if key not in arrays:
                raise KeyError(f"from_dict: missing array {key!r} (have {sorted(arrays)[:8]})")
            a = arrays[key]
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu().numpy()
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1:
                raise ValueError(f"from_dict: {key!r} must be a 1-d integer array")
            return np.ascontiguousarray(a, dtype=np.int64)
        meta = get("meta")
        if meta.shape[0] != 3:
            raise ValueError(f"from_dict: {prefix}meta must hold [depth, codebook_size, item_space]")
        native = C.ConceptTrie.from_arrays(get("offsets"), get("codes"), get("leaf_items"),
                                           int(meta[0]), int(meta[1]), int(meta[2]))
        return cls._wrap(native)

    def __getstate__(self):
        return self.to_dict()

    def __setstate__(self, state):
        self._init_native(ConceptTrie.from_dict(state)._native)
