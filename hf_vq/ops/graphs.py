"""A fixed no-grad update, replayed as one CUDA graph.

A small training step is bound by the host: each of its few dozen launches costs the host more than the GPU. The
codebook update that follows the batch statistics (finiteness flag, EMA steps, Laplace smoothing, codebook from the
EMA) is a fixed sequence of about fifteen such launches whose shapes depend only on the codebooks, not on the batch.
`GraphedUpdate` runs such a function eagerly the first time it sees a signature, captures it as a CUDA graph the
second time, and from then on copies the inputs into the graph's own tensors and replays it: one copy and one
launch instead of the sequence. The kernels are the same, so the results are bit-identical to the eager run.

A signature is the function's scalar arguments, the shape, stride and dtype of its inputs (copied in each call) and
the address as well of every state tensor it writes: a state tensor that moves (`module.to(...)`,
`load_state_dict(assign=True)`) gives a new signature, so a graph never writes to memory its tensors have left.

Eager instead: on the CPU, under torch.compile, while a graph is being captured (the caller's own CUDA graph), and
with `HF_VQ_CUDA_GRAPHS=0`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ENV = "HF_VQ_CUDA_GRAPHS"


def enabled_for(tensors: Sequence[Tensor]) -> bool:
    """Whether an update of `tensors` may be replayed as a graph (see the module docstring)."""
    return (bool(tensors) and tensors[0].is_cuda and os.environ.get(ENV, "1") != "0"
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


def signature(inputs: Sequence[Tensor], state: Sequence[Tensor], *scalars) -> tuple:
    """What a captured graph depends on: the scalars, each input's shape, stride and dtype, and each state tensor's
    address as well."""
    return (*scalars, *((t.shape, t.stride(), t.dtype) for t in inputs),
            *((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in state))


class GraphedUpdate:
    """`fn(inputs, state) -> outputs`, a no-grad function of CUDA tensors that writes `state` in place, replayed as a
    CUDA graph per signature (`signature(inputs, state, *scalars)`; `scalars` are passed on to `fn`). The first
    call with a signature runs `fn` eagerly, the second captures and replays it, later ones replay. The outputs of a
    replay are the graph's own tensors, overwritten by its next replay. At most `max_graphs` are kept, the least
    recently used dropped first."""

    def __init__(self, fn: Callable[..., list[Tensor]], max_graphs: int = 8):
        self.fn, self.max_graphs = fn, max_graphs
        self._seen: set[tuple] = set()
        self._graphs: OrderedDict[tuple, tuple[list[Tensor], torch.cuda.CUDAGraph, list[Tensor]]] = OrderedDict()

    @torch.no_grad()
    def __call__(self, inputs: list[Tensor], state: list[Tensor], *scalars) -> list[Tensor]:
        if not enabled_for(inputs + state):
            return self.fn(inputs, state, *scalars)
        key = signature(inputs, state, *scalars)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first sight: eager (a one-off needs no graph)
                if len(self._seen) > 64 * self.max_graphs:  # (state that moves every call: nothing repeats)
                    self._seen.clear()
                self._seen.add(key)
                return self.fn(inputs, state, *scalars)
            entry = self._capture(inputs, state, scalars)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                dropped, _ = self._graphs.popitem(last=False)
                self._seen.discard(dropped)
        self._graphs.move_to_end(key)
        static_inputs, graph, outputs = entry
        torch._foreach_copy_(static_inputs, inputs)
        if inputs[0].device.index == torch.cuda.current_device():
            graph.replay()
        else:  # (a replay launches on the current device's stream)
            with torch.cuda.device(inputs[0].device):
                graph.replay()
        return outputs

    def _capture(self, inputs: list[Tensor], state: list[Tensor], scalars: tuple):
        """Capture `fn` on tensors of its own (copies of `inputs`) on a side stream; nothing runs until a replay.
        `torch.cuda.graph` is not used: it synchronizes the device and collects garbage before every capture. `fn`
        must be capturable (no host reads, no CPU tensors, no random numbers)."""
        static_inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        side, current = torch.cuda.Stream(device=inputs[0].device), torch.cuda.current_stream(inputs[0].device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = self.fn(static_inputs, state, *scalars)
            finally:
                graph.capture_end()
        current.wait_stream(side)
        return static_inputs, graph, outputs
