"""Interleaved timing of peers and a communicator that times and counts its all-reduces."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from syncbn.comm import Communicator
from syncbn.testing import RecordingCommunicator


class TimingCommunicator(RecordingCommunicator):
    """Records every all-reduce (numel, dtype) and adds up the wall time spent in them.

    The time includes waiting for the slowest rank to arrive. CUDA work is synchronized
    around each call so asynchronous collectives are charged to communication, not compute.
    """

    def __init__(self, inner: Communicator):
        super().__init__(inner)
        self.seconds = 0.0

    def reset(self) -> None:
        self.calls.clear()
        self.seconds = 0.0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        start = time.perf_counter()
        result = super().all_reduce_sum_(tensor)
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        self.seconds += time.perf_counter() - start
        return result


@dataclass
class Peer:
    """One contender: ``step`` runs one forward+backward; ``comm`` is set for syncbn."""

    name: str
    step: Callable[[], None]
    comm: Optional[TimingCommunicator] = None


@dataclass
class PeerSamples:
    seconds: List[float] = field(default_factory=list)
    comm_seconds: List[float] = field(default_factory=list)
    collectives: List[int] = field(default_factory=list)

    def summary(self) -> Dict[str, object]:
        """Medians in milliseconds; the distinct collective counts seen per step."""
        out: Dict[str, object] = {"ms": median_ms(self.seconds)}
        if self.comm_seconds:
            out["comm_ms"] = median_ms(self.comm_seconds)
            out["compute_ms"] = median_ms([t - c for t, c in zip(self.seconds, self.comm_seconds)])
            out["collectives_per_step"] = sorted(set(self.collectives))
        return out


def median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def time_interleaved(peers: Sequence[Peer], warmup: int, reps: int,
                     barrier: Callable[[], None], sync: Callable[[], None]) -> Dict[str, PeerSamples]:
    """Run the peers in turn (A B C A B C ...) so they share the machine's state and load.

    ``barrier`` lines the ranks up before each step, so no peer is charged for another's
    stragglers; ``sync`` waits for the device. The first ``warmup`` rounds are discarded.
    """
    samples = {peer.name: PeerSamples() for peer in peers}
    for round_index in range(warmup + reps):
        for peer in peers:
            barrier()
            if peer.comm is not None:
                peer.comm.reset()
            start = time.perf_counter()
            peer.step()
            sync()
            elapsed = time.perf_counter() - start
            if round_index < warmup:
                continue
            record = samples[peer.name]
            record.seconds.append(elapsed)
            if peer.comm is not None:
                record.comm_seconds.append(peer.comm.seconds)
                record.collectives.append(len(peer.comm.calls))
    return samples
