"""Activations on disk: safetensors shards plus an `index.json`, written and read in chunks.

    <dir>/index.json          {"format": "mechrl-activations/1", "n_rows": N, "tensors": {name: {shape, dtype}},
                               "shards": [{"file": "shard-00000.safetensors", "rows": n}, ...], "meta": {...}}
    <dir>/shard-00000.safetensors   name -> (n, ...) tensor, rows in order

Every tensor of a store has the same number of rows; shards split rows, never tensors. The index is
written last, so a directory without one is an unfinished write and refuses to load.

    writer = ActivationWriter("acts", shard_rows=4096); writer.add({"resid_post.0": x}); store = writer.close()
    for shard in ActivationStore("acts"): ...      # dicts of (n, ...) tensors, one shard in memory at a time
    for x in ActivationStore("acts").iter_batches("resid_post.0", 256): ...   # (256, ...) batches
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "mechrl-activations/1"


class ActivationWriter:
    """Buffers rows and writes a shard every `shard_rows` rows; `close()` writes the index."""

    def __init__(self, path: str | Path, shard_rows: int = 4096, meta: Mapping | None = None):
        assert shard_rows > 0, f"shard_rows must be positive, got {shard_rows}"
        self.path = Path(path)
        if (self.path / "index.json").exists():
            raise FileExistsError(f"{self.path} already holds an activation store; choose a new directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.meta = shard_rows, dict(meta or {})
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.buffered = 0
        self.shards: list[dict] = []
        self.specs: dict[str, dict] | None = None
        self.closed = False

    def add(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Append rows: every tensor has the same leading dimension; names and trailing shapes never change."""
        assert not self.closed, "ActivationWriter.add after close"
        n = {k: v.shape[0] for k, v in rows.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"tensors of one add() must have equal row counts, got {n}")
        specs = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in rows.items()}
        if self.specs is None:
            self.specs = specs
        elif specs != self.specs:
            raise ValueError(f"rows do not match the store's tensors: got {specs}, store has {self.specs}")
        for k, v in rows.items():
            self.buffer.setdefault(k, []).append(v.detach().to("cpu"))
        self.buffered += next(iter(n.values()))
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n_rows: int) -> None:
        full = {k: torch.cat(v) for k, v in self.buffer.items()}
        shard = {k: v[:n_rows].contiguous() for k, v in full.items()}
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(shard, str(self.path / name))
        self.shards.append({"file": name, "rows": n_rows})
        self.buffer = {k: [v[n_rows:]] for k, v in full.items()}
        self.buffered -= n_rows

    def close(self) -> "ActivationStore":
        assert not self.closed, "ActivationWriter.close called twice"
        if self.specs is None:
            raise ValueError(f"{self.path}: no rows were added; refusing to write an empty store")
        if self.buffered:
            self._flush(self.buffered)
        index = {"format": FORMAT, "n_rows": sum(s["rows"] for s in self.shards), "tensors": self.specs,
                 "shards": self.shards, "meta": self.meta}
        (self.path / "index.json").write_text(json.dumps(index, indent=1))
        self.closed = True
        return ActivationStore(self.path)


class ActivationStore:
    """Read side of a store: iterate shards, or load whole tensors when they fit in memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.path}: no index.json (not an activation store, or an unfinished write)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file}: format {self.index.get('format')!r}, expected {FORMAT!r}")

    @property
    def names(self) -> list[str]:
        return list(self.index["tensors"])

    @property
    def meta(self) -> dict:
        return self.index["meta"]

    def __len__(self) -> int:
        return self.index["n_rows"]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One dict of (n, ...) tensors per shard, in row order."""
        for shard in self.index["shards"]:
            data = load_file(str(self.path / shard["file"]))
            for k, v in data.items():
                assert v.shape[0] == shard["rows"], f"{shard['file']}:{k} has {v.shape[0]} rows, index says {shard['rows']}"
            if set(data) != set(self.names):
                raise ValueError(f"{shard['file']} holds {sorted(data)}, index lists {sorted(self.names)}")
            yield data

    def iter_batches(self, name: str, batch_size: int) -> Iterator[torch.Tensor]:
        """(batch_size, ...) slices of tensor `name` in row order, across shard boundaries; the last
        batch may be smaller. One shard (plus a partial batch) in memory at a time."""
        if name not in self.index["tensors"]:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has {self.names}")
        assert batch_size > 0, f"batch_size must be positive, got {batch_size}"
        carry = None
        for shard in self:
            x = shard[name] if carry is None else torch.cat([carry, shard[name]])
            n_full = len(x) // batch_size * batch_size
            yield from x[:n_full].split(batch_size)
            carry = x[n_full:]
        if carry is not None and len(carry):
            yield carry

    def load(self, name: str) -> torch.Tensor:
        """The whole (N, ...) tensor `name`."""
        if name not in self.index["tensors"]:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has {self.names}")
        return torch.cat([shard[name] for shard in self])

    def load_all(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for shard in self:
            for k, v in shard.items():
                parts.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in parts.items()}
