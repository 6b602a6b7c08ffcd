"""Shared by the decode-graph tests (CPU and GPU): a recorder of host reads (and host-to-device
copies), and a wrapper that records them inside the decode loop only."""

from __future__ import annotations

import contextlib

from torch.utils._python_dispatch import TorchDispatchMode

from mechrl.train import decode_graph

#: aten ops that read a device value on the host (a sync on CUDA, and a capture error inside a graph)
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_dim",
              "aten.unique_consecutive", "aten.repeat_interleave", "aten.equal", "aten.is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records every aten op dispatched while active that reads a device value on the host, or that
    makes a tensor from host data or moves one between devices (a copy a CUDA graph cannot hold)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in HOST_READS or name == "aten.lift_fresh" or (name == "aten._to_copy" and "device" in (kwargs or {})):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads_in_decode_loop(monkeypatch):
    """Patch `DecodeRunner.decode` and `DecodeRunner.step` to record host reads: yields a dict with
    `loop` (reads during every decode loop) and `step` (reads inside the steps themselves)."""
    seen = {"loop": [], "step": []}
    decode, step = decode_graph.DecodeRunner.decode, decode_graph.DecodeRunner.step

    def recording_decode(self, *a, **kw):
        with HostReads() as rec:
            out = decode(self, *a, **kw)
        seen["loop"] += rec.reads
        return out

    def recording_step(self, *a, **kw):
        with HostReads() as rec:
            out = step(self, *a, **kw)
        seen["step"] += rec.reads
        return out

    monkeypatch.setattr(decode_graph.DecodeRunner, "decode", recording_decode)
    monkeypatch.setattr(decode_graph.DecodeRunner, "step", recording_step)
    yield seen
