"""CUDA graphs for small calls, whose few dozen launches cost the host more than the GPU.

Two mechanisms, both eager the first time they see a signature, captured the second time and replayed after that
(`_PerSignature`: at most a few graphs per owner, the least recently used dropped):

- `GraphedUpdate`: a fixed no-grad update inside a call, such as the codebook update after the batch statistics
  (finiteness flag, EMA steps, Laplace smoothing, codebook from the EMA: about fifteen launches whose shapes depend
  only on the codebooks). A replay is one copy of the inputs and one launch, with the eager kernels.
- `GraphedCall`: a module's whole call, forward and (in training) backward, entered through
  `QuantizerModel.__call__` for the families that opt in (`replayable`, `call_graphed`). Its outputs are copies;
  the Python bookkeeping of a call runs at every replay through `host_effect`.

A signature holds the address of every state tensor as well as the layouts: a tensor that moves (`module.to(...)`,
`load_state_dict(assign=True)`) gives a new signature, so a graph never writes to memory its tensors have left. A
whole call's signature also holds the module's settings (`settings`): a replay never reads a stale loss weight.

Eager instead: on the CPU, under torch.compile, while a graph is being captured (the caller's own CUDA graph), and
with `HF_VQ_CUDA_GRAPHS=0`.
"""
from __future__ import annotations

import functools
import operator
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

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


class _PerSignature:
    """Graphs kept per signature: a signature's first sight only records it (a one-off call needs no graph), its
    second is captured; at most `max_graphs` are kept, the least recently used dropped first (and forgotten)."""

    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self._seen: set[tuple] = set()
        self._graphs: OrderedDict[tuple, object] = OrderedDict()

    def _lookup(self, key: tuple):
        """The graphs kept for `key` (now the most recently used), or None."""
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
        return entry

    def _first_sight(self, key: tuple) -> bool:
        """Whether `key` is new (it is recorded now)."""
        if key in self._seen:
            return False
        if len(self._seen) > 64 * self.max_graphs:  # (state that moves every call: nothing repeats)
            self._seen.clear()
        self._seen.add(key)
        return True

    def _keep(self, key: tuple, entry) -> None:
        self._graphs[key] = entry
        if len(self._graphs) > self.max_graphs:
            dropped, _ = self._graphs.popitem(last=False)
            self._seen.discard(dropped)


def replay_on(graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """Replay `graph`, captured on `device` (a replay launches on the current device's stream)."""
    if device.index == torch.cuda.current_device():
        graph.replay()
    else:
        with torch.cuda.device(device):
            graph.replay()


class GraphedUpdate(_PerSignature):
    """`fn(inputs, state) -> outputs`, a no-grad function of CUDA tensors that writes `state` in place, replayed as a
    CUDA graph per signature (`signature(inputs, state, *scalars)`; `scalars` are passed on to `fn`). The first
    call with a signature runs `fn` eagerly, the second captures and replays it, later ones replay. The outputs of a
    replay are the graph's own tensors, overwritten by its next replay. At most `max_graphs` are kept, the least
    recently used dropped first."""

    def __init__(self, fn: Callable[..., list[Tensor]], max_graphs: int = 8):
        super().__init__(max_graphs)
        self.fn = fn

    @torch.no_grad()
    def __call__(self, inputs: list[Tensor], state: list[Tensor], *scalars) -> list[Tensor]:
        if not enabled_for(inputs + state):
            return self.fn(inputs, state, *scalars)
        key = signature(inputs, state, *scalars)
        entry = self._lookup(key)
        if entry is None:
            if self._first_sight(key):
                return self.fn(inputs, state, *scalars)
            entry = self._capture(inputs, state, scalars)
            self._keep(key, entry)
        static_inputs, graph, outputs = entry
        torch._foreach_copy_(static_inputs, inputs)
        replay_on(graph, inputs[0].device)
        return outputs

    def _capture(self, inputs: list[Tensor], state: list[Tensor], scalars: tuple):
        """Capture `fn` on tensors of its own (copies of `inputs`) on a side stream; nothing runs until a replay.
        `torch.cuda.graph` is not used: it synchronizes the device and collects garbage before every capture. `fn`
        must be capturable (no host reads, no CPU tensors, no random numbers)."""
        static_inputs = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        side, current = _side_stream(inputs[0].device), torch.cuda.current_stream(inputs[0].device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = self.fn(static_inputs, state, *scalars)
            finally:
                graph.capture_end()
        current.wait_stream(side)
        return static_inputs, graph, outputs


# --------------------------------------------------------------------------------------------------
# a module's whole call (forward, and its backward in training), replayed as CUDA graphs

_recording: list[tuple[bool, Callable[[], None]]] | None = None


def host_effect(fn: Callable[[], None], *, before: bool = False) -> None:
    """Run `fn()`, host-side bookkeeping of a call (reading or handing over a finiteness check), now; while a whole
    call is being captured (`GraphedCall`), at every replay of it instead: before the graph launches with `before`,
    after it otherwise. A replay runs none of the call's Python code, so this is how such bookkeeping survives."""
    if _recording is None:
        fn()
    else:
        _recording.append((before, fn))


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for captures (each new stream would get its own cuBLAS workspace)."""
    stream = _SIDE_STREAMS.get(device.index)
    if stream is None:
        stream = _SIDE_STREAMS[device.index] = torch.cuda.Stream(device=device)
    return stream


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _set_sync_debug_mode(mode: str | int) -> None:
    """`torch.cuda.set_sync_debug_mode` without its warning that the mode is a prototype (it finds the host reads of
    PyTorch's own ops, which is what a capture needs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


class Uncapturable(RuntimeError):
    """A call that read the host while it was being captured (the capture ended cleanly; run it eagerly)."""


class _CallGraphs:
    """The graphs of one signature of a `GraphedCall`: the forward, and (when the call is differentiable) the
    backward of its outputs that require grad, both in one private memory pool; the host effects the forward
    recorded; and `generation`, the number of forward replays, so a backward knows whether its saved tensors were
    overwritten."""

    def __init__(self, fn: Callable[..., object], inputs: list[Tensor], params: list[Tensor]):
        global _recording
        device = inputs[0].device
        self.static_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        self.forward_graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        side, current = _side_stream(device), torch.cuda.current_stream(device)
        side.wait_stream(current)
        effects: list[tuple[bool, Callable[[], None]]] = []
        with torch.cuda.stream(side):
            _recording, sync_mode, refused = effects, torch.cuda.get_sync_debug_mode(), None
            _set_sync_debug_mode("error")  # a host read raises before it reaches the capturing stream
            self.forward_graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn(*self.static_inputs)
            except RuntimeError as error:
                if "synchronizing CUDA operation" not in str(error):
                    raise
                refused = error
            finally:
                self.forward_graph.capture_end()
                _recording = None
                _set_sync_debug_mode(sync_mode)
            if refused is not None:
                raise Uncapturable(f"the call reads the host ({refused})") from refused
            leaves, self.spec = tree_flatten(out)
            unique = {id(t): t for t in leaves if isinstance(t, Tensor)}  # (an output tensor may appear twice)
            slot = {key: i for i, key in enumerate(unique)}
            self.outputs = list(unique.values())
            self.slots = [slot[id(t)] if isinstance(t, Tensor) else t for t in leaves]
            self.is_tensor = [isinstance(t, Tensor) for t in leaves]
            self.differentiable = [i for i, t in enumerate(self.outputs) if t.requires_grad]
            targets = [t for t in self.static_inputs if t.requires_grad] + [p for p in params if p.requires_grad]
            self.backward_graph = None
            if self.differentiable and targets:
                self.grad_outputs = [torch.empty_like(self.outputs[i]) for i in self.differentiable]
                self.backward_graph = torch.cuda.CUDAGraph()
                self.backward_graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    grads = torch.autograd.grad([self.outputs[i] for i in self.differentiable], targets,
                                                self.grad_outputs, allow_unused=True)
                finally:
                    self.backward_graph.capture_end()
                self.grads = spread_grads(grads, [t.requires_grad for t in [*self.static_inputs, *params]])
        current.wait_stream(side)
        self.outputs = [t.detach() for t in self.outputs]
        self.before = [fn for first, fn in effects if first]
        self.after = [fn for first, fn in effects if not first]
        self.device, self.generation, self.awaiting = device, 0, None

    def waits_for_backward(self) -> bool:
        """Whether the last replay's autograd node is alive and its backward has not run: its saved tensors are this
        graph's memory, which a replay now would overwrite."""
        node = self.awaiting() if self.awaiting is not None else None
        return node is not None and not node.backward_ran

    def replay_forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """Copy `inputs` in, replay the forward with its host effects; returns copies of the outputs."""
        for fn in self.before:
            fn()
        torch._foreach_copy_(self.static_inputs, inputs)
        replay_on(self.forward_graph, self.device)
        self.generation += 1
        for fn in self.after:
            fn()
        return copies(self.outputs)

    def replay_backward(self, grads: tuple[Tensor, ...]) -> list[Tensor | None]:
        torch._foreach_copy_(self.grad_outputs, [grads[i] for i in self.differentiable])
        replay_on(self.backward_graph, self.device)
        grads = iter(copies([g for g in self.grads if g is not None]))
        return [next(grads) if g is not None else None for g in self.grads]

    def output(self, tensors: list[Tensor]) -> object:
        leaves = [tensors[s] if is_tensor else s for s, is_tensor in zip(self.slots, self.is_tensor)]
        return tree_unflatten(leaves, self.spec)


def copies(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of `tensors` (same layouts) in one multi-tensor copy rather than a launch each."""
    out = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(out, tensors)
    return out


def end_failed_capture(device: torch.device) -> None:
    """Leave the state a failed capture left behind: PyTorch's CUDA generators stay in capture mode (only a capture
    that ends cleanly runs their epilogue), which fails every later random draw on the device; capturing an empty
    graph ends that mode."""
    with torch.cuda.stream(_side_stream(device)):
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="thread_local")
        graph.capture_end()


def spread_grads(grads: tuple[Tensor | None, ...], wanted: list[bool]) -> list[Tensor | None]:
    """`grads` of the tensors marked in `wanted`, spread over every position of `wanted` (None elsewhere)."""
    it = iter(grads)
    return [next(it) if w else None for w in wanted]


class _Replay(torch.autograd.Function):
    """The autograd node of a replayed forward: its backward replays the backward graph."""

    @staticmethod
    def forward(ctx, graphs: _CallGraphs, n_inputs: int, *inputs_and_params: Tensor):
        outputs = graphs.replay_forward(list(inputs_and_params[:n_inputs]))
        ctx.graphs, ctx.generation, ctx.backward_ran = graphs, graphs.generation, False
        graphs.awaiting = weakref.ref(ctx)
        ctx.mark_non_differentiable(*(t for i, t in enumerate(outputs) if i not in graphs.differentiable))
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        graphs = ctx.graphs
        if graphs.generation != ctx.generation:
            raise RuntimeError("hf_vq: this output's graphed forward was replayed again before its backward ran, "
                               "which overwrote what the backward needs; run backward before the next call, or set "
                               f"{ENV}=0")
        ctx.backward_ran = True
        return (None, None, *graphs.replay_backward(grads))


class GraphedCall(_PerSignature):
    """A module call `fn(*inputs)` replayed as CUDA graphs per signature: eager the first time a signature is seen,
    captured (forward, and the backward of its differentiable outputs) and replayed the second time, replayed after
    that. The caller builds the signature (`key`) from everything the call's control flow and memory depend on, and
    passes the parameters whose gradients the backward returns. Outputs are copies, so a later call never changes
    them. A call whose previous replay still waits for its backward runs eagerly (its saved tensors are the graph's
    memory). At most `max_graphs` signatures are kept (each holds its own memory pool), least recently used dropped.
    """

    def __init__(self, max_graphs: int = 4):
        super().__init__(max_graphs)
        self._refused: set[tuple] = set()

    def __getstate__(self) -> dict:
        """A copy of a model (`copy.deepcopy`, pickling) starts without graphs: they are bound to this one's memory."""
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"])

    def __call__(self, fn: Callable[..., object], inputs: list[Tensor], params: list[Tensor], key: tuple) -> object:
        graphs = self._lookup(key)
        if graphs is None:
            graphs = self._capture(fn, inputs, params, key)
            if graphs is None:
                return fn(*inputs)
        elif graphs.waits_for_backward():
            return fn(*inputs)
        if graphs.backward_graph is None:
            return graphs.output(graphs.replay_forward(inputs))
        return graphs.output(list(_Replay.apply(graphs, len(inputs), *inputs, *params)))

    def _capture(self, fn: Callable[..., object], inputs: list[Tensor], params: list[Tensor],
                 key: tuple) -> _CallGraphs | None:
        """The graphs of `key`, captured now; None (run eagerly) the first time `key` is seen and for a signature
        whose capture failed. A capture that fails otherwise than by a host read (which ends it cleanly) is
        reported by a warning, once per signature."""
        if self._first_sight(key) or key in self._refused:
            return None
        try:
            graphs = _CallGraphs(fn, inputs, params)
        except Uncapturable:
            self._refused.add(key)
            return None
        except Exception as error:
            self._refused.add(key)
            try:
                end_failed_capture(inputs[0].device)
            except Exception:
                raise RuntimeError(f"hf_vq: a call could not be captured as a CUDA graph ({error}); set {ENV}=0 to "
                                   "run every call eagerly, and please report the configuration") from error
            warnings.warn(f"hf_vq: a call could not be captured as a CUDA graph ({type(error).__name__}: "
                          f"{str(error).splitlines()[0]}); calls of this signature run eagerly. Set {ENV}=0 to run "
                          "every call eagerly, and please report the configuration", stacklevel=5)
            return None
        self._keep(key, graphs)
        return graphs


# --------------------------------------------------------------------------------------------------
# which module calls are replayed, and under which signature

MAX_ELEMENTS = 2**25  # larger inputs keep the GPU busier than the host: eager, and no graph memory held for them


def replayable(module: torch.nn.Module, args: tuple, kwargs: dict, allowed_kwargs: frozenset[str]) -> bool:
    """Whether `module(*args, **kwargs)` may be replayed as CUDA graphs: one CUDA tensor argument of at most
    `MAX_ELEMENTS` entries, keyword arguments among `allowed_kwargs` with plain values (they are part of the
    signature), graphs enabled (`enabled_for`), no hook on the module or its submodules (a replay runs no Python
    code) and no `module.compile()` (the compiled call is torch.compile's to run). The module's own conditions
    (`QuantizerModel.graphable`) are the caller's."""
    return (len(args) == 1 and isinstance(x := args[0], Tensor) and x.is_cuda and x.numel() <= MAX_ELEMENTS
            and kwargs.keys() <= allowed_kwargs and all(_plain_value(v) for v in kwargs.values())
            and enabled_for(args) and getattr(module, "_compiled_call_impl", None) is None and not _hooked(module))


def _plain_value(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _hooked(module: torch.nn.Module) -> bool:
    m = torch.nn.modules.module
    if (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
            or m._global_backward_pre_hooks):
        return True
    return any(s._forward_hooks or s._forward_pre_hooks or s._backward_hooks or s._backward_pre_hooks
               for s in module.modules())


def call_graphed(module: torch.nn.Module, x: Tensor, kwargs: dict) -> object:
    """`module(x, **kwargs)` through the module's `GraphedCall`, under a signature of everything its control flow
    and memory depend on: training mode, grad and inference mode, autocast, the keyword arguments, the input's
    layout and whether it requires grad, every parameter's and buffer's address, layout and `requires_grad`, and
    the module's settings (`settings`: a user who sets `vq.commitment_weight` gets a call that reads it)."""
    calls = module.__dict__.get("_graph_calls")
    if calls is None:
        calls = module.__dict__["_graph_calls"] = GraphedCall()
    call = functools.partial(torch.nn.Module.__call__, module, **kwargs)
    values = settings(module)
    try:
        hash(values)
    except TypeError:  # a setting now holds an unhashable value: no signature, so no graph
        return call(x)
    params = list(module.parameters())
    state = [*params, *module.buffers()]
    key = (module.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
           torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), tuple(sorted(kwargs.items())),
           x.shape, x.stride(), x.dtype, x.requires_grad, x.device, values,
           *((t.data_ptr(), t.shape, t.stride(), t.dtype, t.requires_grad) for t in state))
    return calls(call, [x], params, key)


_SETTING_TYPES = (bool, int, float, str, type(None))


def _is_setting(name: str, value) -> bool:
    return not name.startswith("_") and name != "training" and (
        type(value) in _SETTING_TYPES or type(value) is tuple and all(type(v) in _SETTING_TYPES for v in value))


def settings(module: torch.nn.Module) -> tuple:
    """The values of the public plain attributes (numbers, strings, flags, None, tuples of them) of `module` and its
    submodules: what a captured call read as Python constants, such as loss weights, the EMA decay and the flags
    of the options. Which attributes is decided at the first call (kept with the graphs); internal caches that a
    call changes are private (`_name`)."""
    readers = module.__dict__.get("_graph_settings")
    if readers is None:
        readers = []
        for sub in module.modules():
            names = sorted(name for name, value in vars(sub).items() if _is_setting(name, value))
            if names:
                readers.append((sub, operator.attrgetter(*names)))
        module.__dict__["_graph_settings"] = readers
    return tuple(read(sub) for sub, read in readers)


def drop_graphs(module: torch.nn.Module) -> None:
    """Forget `module`'s captured calls (and free their memory pools): its state moved or changed type."""
    module.__dict__.pop("_graph_calls", None)
    module.__dict__.pop("_graph_settings", None)
