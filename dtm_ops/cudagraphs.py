"""CUDA graphs for calls repeated on the same buffers: the matcher's per-call host work, gone.

A GPU scan matches batch after batch of one shape against the same templates. Each call of
:func:`dtm_ops.matching.best_matches` issues a dozen-odd kernels and as many small tensor
operations, and on an H200 the host needs about 0.4 ms for them: more than the GPU needs
for one 2x4 template over 239 frames of 256x68x120 features (0.28 ms). Calls streamed back
to back then run at the host's pace: 525k frames/s, where the same calls through this
cache ran at 793k, 82% of the HBM read bandwidth measured in the same run
(``benchmarks/results/speed/h200/matcher-graphs.txt``). A graph records the call's kernels
once and replays them all with one launch.

A graph reads and writes the addresses it was captured on. :class:`GraphCache` therefore
keys each graph on its inputs' addresses, shapes, strides and dtypes, so a replay computes
on whatever the caller's tensors hold now, and returns copies of the graph's outputs. It
captures the second time it sees a key (a batch buffer that PyTorch's caching allocator
hands out again), so that inputs seen once never pay for a capture, and it keeps at most
``max_graphs`` graphs, since each holds its own intermediate memory; other calls run as
they are.

A capture is not free: :func:`torch.cuda.graph` synchronises the device and empties
PyTorch's device and pinned-host memory caches first. The scan uses graphs only when asked
(``Searcher(cuda_graphs=True)``): a scan from storage waits on its reads, and with graphs
on, scans of four steps ran slower (README "Matcher speed").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class GraphCache:
    """``fn(*inputs)`` replayed from CUDA graphs for inputs seen before.

    Args:
        fn: takes tensors, returns a tuple of tensors. It must do the same work for every
            call with inputs of one shape, and not synchronise with the host once it has run
            once for that shape (what it decides on first use, such as
            :func:`dtm_ops.matching.best_matches`' method pick, it must remember).
        max_graphs: graphs kept; calls with other inputs run ``fn`` directly.
        copied: positions of small inputs copied into the graph's own buffers on each call
            (keyed on shape and dtype, not address), for inputs made afresh for every call.

    Calls with any input off CUDA run ``fn`` directly; so do all calls after a capture
    fails (logged once, the reason kept in ``failed``). Outputs are copies: they stay valid
    across later calls.
    """

    def __init__(
        self, fn: Callable[..., tuple[torch.Tensor, ...]], *, max_graphs: int = 4, copied: Sequence[int] = ()
    ) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.copied = frozenset(copied)
        # key -> (replay, the graph's copies of the `copied` inputs by position, outputs)
        self.graphs: dict[tuple, tuple[Callable[[], None], dict[int, torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self.seen: set[tuple] = set()  # keys met once, not captured
        self.replays = 0
        self.failed = ""  # why a capture failed: no more are tried

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._usable(inputs):
            return self.fn(*inputs)
        key = tuple((None if i in self.copied else (t.data_ptr(), t.stride()), tuple(t.shape), t.dtype, t.device)
                    for i, t in enumerate(inputs))
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs or self.failed:
                if len(self.seen) >= 64 * self.max_graphs:  # addresses that never come back
                    self.seen.clear()
                self.seen.add(key)
                return self.fn(*inputs)
            self.seen.discard(key)
            try:
                entry = self._capture(inputs)
            except Exception as e:  # noqa: BLE001 - the calls stay correct without graphs
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed, running without graphs: %s", self.failed)
                return self.fn(*inputs)
            self.graphs[key] = entry
        replay, buffers, outputs = entry
        for i, buffer in buffers.items():
            buffer.copy_(inputs[i])
        replay()
        self.replays += 1
        return tuple(o.clone() for o in outputs)

    def _usable(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        return all(t.is_cuda for t in inputs)

    def _capture(
        self, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[Callable[[], None], dict[int, torch.Tensor], tuple[torch.Tensor, ...]]:
        """Record ``fn(*inputs)`` (:func:`capture`): ``(replay, buffers, outputs)``: the
        graph's copies of the ``copied`` inputs, which the caller fills before each replay,
        and the outputs that each replay writes."""
        buffers = {i: inputs[i].clone(memory_format=torch.contiguous_format) for i in self.copied}
        graph, outputs = capture(self.fn, *(buffers.get(i, t) for i, t in enumerate(inputs)))
        return graph.replay, buffers, tuple(outputs)


def capture(fn: Callable, *inputs: torch.Tensor):
    """``fn(*inputs)`` recorded as a CUDA graph: ``(graph, what the recorded call returned)``;
    each ``graph.replay()`` reruns its kernels on the same memory, outputs included.

    A run on a side stream first, as :func:`torch.cuda.graph` asks (lazy set-up such as
    cuBLAS workspaces stays out of the graph). Other threads may keep using CUDA during the
    capture (the store's reader threads pin memory): ``thread_local`` mode."""
    device = inputs[0].device if inputs else torch.device("cuda", torch.cuda.current_device())
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        fn(*inputs)
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = fn(*inputs)
    return graph, outputs
