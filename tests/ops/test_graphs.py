"""`ops.graphs`: a no-grad update (`GraphedUpdate`) and a module's whole call (`GraphedCall`) replayed as CUDA graphs,
with the results of eager runs."""

import copy

import pytest
import torch
from test_vq_plan import BASE, FIELDS, NON_DEFAULT, _input
from torch.utils._pytree import tree_flatten

import hf_vq
from hf_vq.models import sgm_ema
from hf_vq.ops import ema, graphs

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _scaled_add(inputs, state, scale):
    """state[0] += scale * inputs[0]; returns [state[0].sum()]."""
    state[0].add_(inputs[0], alpha=scale)
    return [state[0].sum()]


def test_signature_follows_state_addresses_not_input_addresses():
    a, b = torch.zeros(4), torch.zeros(4)
    assert graphs.signature([a], [b], 1.0) == graphs.signature([torch.ones(4)], [b], 1.0)
    assert graphs.signature([a], [b], 1.0) != graphs.signature([a], [torch.zeros(4)], 1.0)
    assert graphs.signature([a], [b], 1.0) != graphs.signature([a], [b], 2.0)
    assert graphs.signature([a], [b], 1.0) != graphs.signature([torch.zeros(5)], [b], 1.0)


def test_cpu_and_disabled_updates_run_eagerly(monkeypatch):
    update = graphs.GraphedUpdate(_scaled_add)
    state = [torch.zeros(3)]
    for _ in range(3):
        (total,) = update([torch.ones(3)], state, 2.0)
    assert torch.equal(state[0], torch.full((3,), 6.0)) and total.item() == 18.0
    assert not update._graphs and not graphs.enabled_for(state)
    if torch.cuda.is_available():
        monkeypatch.setenv(graphs.ENV, "0")
        assert not graphs.enabled_for([torch.zeros(1, device="cuda")])


def test_graphed_update_keeps_one_graph_per_signature_from_its_second_sight(monkeypatch):
    """The bookkeeping of `GraphedUpdate` on the CPU: captures stand in for graphs that re-run the function."""
    captured = []

    def capture(self, inputs, state, scalars):
        static = [t.clone() for t in inputs]
        captured.append(scalars)
        return static, lambda: self.fn(static, state, *scalars), [None]

    monkeypatch.setattr(graphs, "enabled_for", lambda tensors: True)
    monkeypatch.setattr(graphs.GraphedUpdate, "_capture", capture)
    monkeypatch.setattr(graphs, "replay_on", lambda graph, device: graph())
    update, state = graphs.GraphedUpdate(_scaled_add, max_graphs=1), [torch.zeros(3)]
    for scale in (1.0, 1.0, 1.0, 2.0, 2.0, 1.0):
        update([torch.ones(3)], state, scale)
    assert captured == [(1.0,), (2.0,)] and list(update._graphs) == [graphs.signature([torch.ones(3)], state, 2.0)]
    assert torch.equal(state[0], torch.full((3,), 1.0 * 4 + 2.0 * 2))  # every call applied once, graphed or not


@needs_gpu
def test_graphed_update_replays_and_recaptures_when_state_moves():
    update = graphs.GraphedUpdate(_scaled_add, max_graphs=2)
    state = [torch.zeros(3, device="cuda")]
    for step in range(1, 5):
        (total,) = update([torch.full((3,), float(step), device="cuda")], state, 0.5)
        # eager on first sight, captured on the second call, then replayed
        assert len(update._graphs) == (0 if step == 1 else 1)
    expected = 0.5 * (1 + 2 + 3 + 4)
    assert torch.equal(state[0].cpu(), torch.full((3,), expected)) and total.item() == 3 * expected
    moved = [state[0].clone()]  # new address: a new signature, never the old graph
    for _ in range(2):
        update([torch.ones(3, device="cuda")], moved, 1.0)
    assert torch.equal(moved[0].cpu(), torch.full((3,), expected + 2)) and len(update._graphs) == 2
    assert torch.equal(state[0].cpu(), torch.full((3,), expected))  # the old tensor untouched
    third = [torch.zeros(3, device="cuda")]
    for _ in range(2):
        update([torch.ones(3, device="cuda")], third, 1.0)
    assert len(update._graphs) == 2  # least recently used dropped


def _models(kind: str):
    kw = dict(dim=16, codebook_size=64, decay=0.9)
    if kind == "residual":
        return hf_vq.ResidualVQ(num_quantizers=3, **kw)
    if kind == "grouped":
        return hf_vq.GroupedResidualVQ(groups=2, num_quantizers=2, **kw)
    if kind == "sgm_ema":
        return hf_vq.EMAVectorQuantizer(n_embed=64, embedding_dim=16, decay=0.9)
    if kind == "heads":
        return hf_vq.VectorQuantize(heads=2, separate_codebook_per_head=True, **kw)
    return hf_vq.VectorQuantize(use_cosine_sim=kind == "cosine", affine_param=kind == "affine", **kw)


@needs_gpu
@pytest.mark.parametrize("kind", ["vq", "cosine", "heads", "affine", "residual", "grouped", "sgm_ema"])
def test_graphed_training_steps_equal_eager_ones(kind, monkeypatch):
    """Training steps whose codebook update (or whole call) is replayed as a CUDA graph give the outputs, gradients
    and state of eager steps, also after the model moves (new buffer addresses)."""
    torch.manual_seed(0)
    graphed = _models(kind).cuda().train()
    eager = copy.deepcopy(graphed)
    shape = (2, 16, 5, 8) if kind == "sgm_ema" else (2, 40, 16)
    inputs = [torch.randn(shape, device="cuda") for _ in range(7)]
    assert_same_steps(graphed, eager, inputs[:3], monkeypatch)
    graphed, eager = graphed.cpu().cuda(), eager.cpu().cuda()
    assert_same_steps(graphed, eager, inputs[3:], monkeypatch, train=lambda step: step != 2)
    steps = sgm_ema._EMA_STEPS if kind == "sgm_ema" else ema.PLAIN_EMA_STEPS
    replayed = graphed.__dict__.get("_graph_calls")
    assert steps._graphs or (replayed and replayed._graphs), "nothing was replayed as a graph"


# -- whole calls (`GraphedCall`, `QuantizerModel.__call__`) ------------------------------------------


def test_host_effects_run_at_once_outside_a_capture_and_at_each_replay_inside_one(monkeypatch):
    ran = []
    graphs.host_effect(lambda: ran.append("now"))
    recorded = []
    monkeypatch.setattr(graphs, "_recording", recorded)
    graphs.host_effect(lambda: ran.append("before"), before=True)
    graphs.host_effect(lambda: ran.append("after"))
    assert ran == ["now"] and [before for before, _ in recorded] == [True, False]


def test_output_copies_keep_values_and_layouts_and_gradients_go_back_to_their_tensors():
    tensors = [torch.randn(3, 4), torch.arange(5), torch.randn(4, 3).t(), torch.zeros(())]
    for t, c in zip(tensors, graphs.copies(tensors)):
        assert torch.equal(t, c) and t.stride() == c.stride() and t.data_ptr() != c.data_ptr()
    a, b = torch.ones(2), torch.zeros(2)
    assert graphs.spread_grads((a, b), [True, False, True, False]) == [a, None, b, None]


class _FakeGraphs:
    """Stands in for `graphs._CallGraphs` on the CPU: "captures" by keeping `fn`, "replays" by calling it."""

    made: list = []
    fail_with: Exception | None = None

    def __init__(self, fn, inputs, params):
        if _FakeGraphs.fail_with is not None:
            raise _FakeGraphs.fail_with
        self.fn, self.backward_graph, self.replays = fn, None, 0
        _FakeGraphs.made.append(self)

    def waits_for_backward(self):
        return False

    def replay_forward(self, inputs):
        self.replays += 1
        return [self.fn(*inputs)]

    def output(self, tensors):
        return tensors[0]


def test_a_signature_runs_eagerly_then_is_captured_then_replayed_and_old_ones_are_dropped(monkeypatch):
    monkeypatch.setattr(graphs, "_CallGraphs", _FakeGraphs)
    monkeypatch.setattr(_FakeGraphs, "made", [])
    calls, eager = graphs.GraphedCall(max_graphs=2), []

    def fn(x):
        eager.append(x)
        return x + 1

    x = torch.zeros(2)
    for key in ("a", "a", "a", "b", "b", "c", "c"):
        assert torch.equal(calls(fn, [x], [], (key,)), x + 1)
    a, b, c = _FakeGraphs.made
    assert a.replays == 2 and b.replays == 1 and c.replays == 1  # captured on the second call, replayed after
    assert list(calls._graphs) == [("b",), ("c",)] and ("a",) not in calls._seen  # least recently used dropped


def test_a_failed_capture_runs_eagerly_and_is_not_tried_again(monkeypatch):
    monkeypatch.setattr(graphs, "_CallGraphs", _FakeGraphs)
    ended = []
    monkeypatch.setattr(graphs, "end_failed_capture", lambda device: ended.append(device))
    calls, x = graphs.GraphedCall(), torch.zeros(2)
    monkeypatch.setattr(_FakeGraphs, "fail_with", graphs.Uncapturable("the call reads the host"))
    for _ in range(3):  # a host read ends the capture cleanly: eager, silently, from then on
        assert torch.equal(calls(lambda t: t + 1, [x], [], ("read",)), x + 1)
    assert not ended and ("read",) in calls._refused
    monkeypatch.setattr(_FakeGraphs, "fail_with", RuntimeError("operation not permitted when stream is capturing"))
    calls(lambda t: t, [x], [], ("broken",))
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph .*operation not permitted"):
        assert torch.equal(calls(lambda t: t * 2, [x], [], ("broken",)), x * 2)
    assert ended == [x.device] and not calls._graphs
    calls(lambda t: t, [x], [], ("broken",))  # refused: no second attempt, no second warning
    assert ended == [x.device]
    monkeypatch.setattr(graphs, "end_failed_capture", lambda device: (_ for _ in ()).throw(RuntimeError("stuck")))
    calls(lambda t: t, [x], [], ("worse",))
    with pytest.raises(RuntimeError, match="could not be captured as a CUDA graph"):
        calls(lambda t: t, [x], [], ("worse",))


def test_a_changed_setting_is_a_new_signature(monkeypatch):
    """A replay reads the Python constants of its capture: a setting changed after it (a loss weight, the EMA decay
    of a submodule) must give a new signature, so the call is eager and captured again, never a stale replay."""
    monkeypatch.setattr(graphs, "_CallGraphs", _FakeGraphs)
    monkeypatch.setattr(_FakeGraphs, "made", [])
    vq = hf_vq.VectorQuantize(dim=8, codebook_size=16, decay=0.9)
    x = torch.randn(2, 5, 8)
    for _ in range(3):  # eager, captured, replayed
        graphs.call_graphed(vq, x, {})
    assert len(_FakeGraphs.made) == 1 and _FakeGraphs.made[0].replays == 2  # (a capture replays once)
    for module, name, value in ((vq, "commitment_weight", 2.0), (vq._codebook, "decay", 0.5),
                                (vq, "freeze_codebook", True)):
        before = graphs.settings(vq)
        setattr(module, name, value)
        assert graphs.settings(vq) != before, name
        made = len(_FakeGraphs.made)
        graphs.call_graphed(vq, x, {})  # first sight of the new signature: eager
        graphs.call_graphed(vq, x, {})
        assert len(_FakeGraphs.made) == made + 1, name
    vq.commitment_weight = [1.0]  # no signature for an unhashable setting: eager, not an error
    assert torch.equal(graphs.call_graphed(vq.eval(), x, {}).indices, vq(x).indices)
    vq.float()
    assert "_graph_settings" not in vq.__dict__


def test_cpu_calls_hooked_modules_and_other_arguments_are_not_replayed():
    vq = hf_vq.VectorQuantize(dim=8, codebook_size=16)
    x = torch.randn(2, 5, 8)
    assert vq.graphable()  # the config allows it; a CPU tensor does not
    assert not graphs.replayable(vq, (x,), {}, vq.graph_kwargs)
    assert not graphs._hooked(vq)
    handle = vq.project_in.register_forward_hook(lambda *a: None)
    assert graphs._hooked(vq)
    handle.remove()
    if torch.cuda.is_available():
        xc = x.cuda()
        assert graphs.replayable(vq, (xc,), {"return_dict": False}, vq.graph_kwargs)
        assert not graphs.replayable(vq, (xc,), {"mask": torch.ones(2, 5, dtype=torch.bool)}, vq.graph_kwargs)
        assert not graphs.replayable(vq, (xc, None), {}, vq.graph_kwargs)
        compiled = copy.deepcopy(vq)
        compiled.compile()
        assert not graphs.replayable(compiled, (xc,), {}, vq.graph_kwargs)


def test_models_with_graphs_copy_without_them():
    vq = hf_vq.VectorQuantize(dim=8, codebook_size=16)
    vq.__dict__["_graph_calls"] = graphs.GraphedCall(max_graphs=3)
    vq.__dict__["_graph_calls"]._seen.add(("a signature",))
    copied = copy.deepcopy(vq)
    assert copied._graph_calls is not vq._graph_calls and not copied._graph_calls._seen
    assert copied._graph_calls.max_graphs == 3
    vq.float()  # a moved or retyped model forgets its graphs
    assert "_graph_calls" not in vq.__dict__


def _step(model, x, train: bool, flag: str, monkeypatch):
    """One eval call, or one training call and the backward of a loss of every output that has a gradient (the
    same random numbers for both models: k-means samples, stochastic codes)."""
    monkeypatch.setenv(graphs.ENV, flag)
    model.train(train)
    xi = x.clone().requires_grad_(train)
    torch.manual_seed(1)
    if not train:
        with torch.no_grad():
            return model(xi), None
    out = model(xi)
    graded = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    sum(t.float().square().sum() if i == 0 else t.float().sum() for i, t in enumerate(graded)).backward()
    return out, xi.grad


def _close(a, b, what):
    assert type(a) is type(b), what
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def assert_same_steps(graphed, eager, inputs, monkeypatch, train=lambda step: step not in (3, 4)):
    """Steps of `graphed` (whole calls replayed) and `eager` (HF_VQ_CUDA_GRAPHS=0) from equal copies agree: the
    same codes, every output, the input and parameter gradients and the state (float32 rounding: the EMA statistics
    sum with atomics, whose order differs from run to run)."""
    for step, x in enumerate(inputs):
        (out_g, grad_g), (out_e, grad_e) = (_step(m, x, train(step), flag, monkeypatch)
                                            for m, flag in ((graphed, "1"), (eager, "0")))
        leaves_g, spec_g = tree_flatten(out_g)
        leaves_e, spec_e = tree_flatten(out_e)
        assert spec_g == spec_e, step
        for i, (a, b) in enumerate(zip(leaves_g + [grad_g], leaves_e + [grad_e])):
            _close(a, b, f"step {step}, output {i}")
        for (name, a), b in zip(graphed.named_parameters(), eager.parameters()):
            _close(a.grad, b.grad, f"step {step}, grad of {name}")
        for (name, a), b in zip(graphed.state_dict().items(), eager.state_dict().values()):
            _close(a, b, f"step {step}, {name}")


WHOLE_CALL_CONFIGS = {
    "plain": dict(),
    "cosine": dict(use_cosine_sim=True),
    "heads, separate codebooks": dict(heads=2, codebook_dim=8, separate_codebook_per_head=True),
    "learnable codebook": dict(learnable_codebook=True, ema_update=False),
    "k-means init": dict(kmeans_init=True),
    "image input": dict(accept_image_fmap=True),
}


@needs_gpu
@pytest.mark.parametrize("name", list(WHOLE_CALL_CONFIGS))
def test_replayed_calls_equal_eager_ones(name, monkeypatch):
    torch.manual_seed(0)
    kw = WHOLE_CALL_CONFIGS[name]
    graphed = hf_vq.VectorQuantize(dim=16, codebook_size=64, decay=0.9, **kw).cuda()
    eager = copy.deepcopy(graphed)
    shape = (2, 16, 6, 7) if kw.get("accept_image_fmap") else (2, 40, 16)
    assert_same_steps(graphed, eager, [torch.randn(shape, device="cuda") for _ in range(7)], monkeypatch)
    assert len(graphed._graph_calls._graphs) == 2  # training and eval: captured, then replayed


@needs_gpu
def test_replayed_outputs_stay_and_a_second_forward_before_backward_runs_eagerly(monkeypatch):
    torch.manual_seed(0)
    vq = hf_vq.VectorQuantize(dim=16, codebook_size=64, decay=0.9).cuda().train()
    reference = copy.deepcopy(vq)
    xs = [torch.randn(2, 40, 16, device="cuda", requires_grad=True) for _ in range(4)]
    outs = []
    for model, flag in ((vq, "1"), (reference, "0")):
        monkeypatch.setenv(graphs.ENV, flag)
        for x in xs[:2]:  # first sight (eager), then captured
            model(x).quantized.sum().backward()
        first, second = model(xs[2]), model(xs[3])  # two forwards, then one backward of both
        (first.quantized.square().sum() + second.quantized.sum()).backward()
        outs.append((first.quantized.detach().clone(), second.indices.clone(), xs[2].grad.clone(), xs[3].grad))
        kept = first.quantized.detach().clone()
        model(torch.randn(2, 40, 16, device="cuda", requires_grad=True)).quantized.sum().backward()
        assert torch.equal(first.quantized, kept)  # a later replay does not write into an earlier output
        for x in xs:
            x.grad = None
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_a_backward_after_a_later_replay_is_refused(monkeypatch):
    monkeypatch.setenv(graphs.ENV, "1")
    vq = hf_vq.VectorQuantize(dim=16, codebook_size=64, decay=0.9).cuda().train()
    x = torch.randn(2, 40, 16, device="cuda", requires_grad=True)
    for _ in range(2):
        vq(x).quantized.sum().backward()
    out = vq(x)
    out.quantized.sum().backward(retain_graph=True)
    vq(x).quantized.sum().backward()  # a replay: the first output's saved tensors are overwritten
    with pytest.raises(RuntimeError, match="replayed again before its backward"):
        out.quantized.sum().backward()


@needs_gpu
def test_a_replayed_call_refuses_a_nan_batch_at_the_next_call(monkeypatch):
    monkeypatch.setenv(graphs.ENV, "1")
    vq = hf_vq.VectorQuantize(dim=16, codebook_size=64, decay=0.9, check_inputs=False).cuda().train()
    x = torch.randn(2, 40, 16, device="cuda")
    for _ in range(3):
        vq(x)
    assert vq._graph_calls._graphs
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.full_like(x, float("nan")))  # replayed: the device skips the update, the host learns it next call
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="NaN or Inf"):
        vq(x)


@needs_gpu
def test_a_moved_model_is_captured_again(monkeypatch):
    monkeypatch.setenv(graphs.ENV, "1")
    torch.manual_seed(0)
    vq = hf_vq.VectorQuantize(dim=16, codebook_size=64, decay=0.9).cuda().eval()
    reference = copy.deepcopy(vq).cpu()
    x = torch.randn(2, 40, 16, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            vq(x)
        vq = vq.cpu().cuda()
        assert "_graph_calls" not in vq.__dict__
        for _ in range(3):
            out = vq(x)
        assert torch.equal(out.indices.cpu(), reference(x.cpu()).indices)


@needs_gpu
@pytest.mark.parametrize("field", FIELDS)
def test_each_field_keeps_an_equal_graphed_call_or_eager_calls(field, monkeypatch):
    """With each field at a non-default value, a model whose plan keeps `graphed_call` trains and evaluates through
    replayed CUDA graphs with the results of eager calls; one whose plan drops it is never captured."""
    torch.manual_seed(0)
    model = hf_vq.VectorQuantize(**{**BASE, **copy.deepcopy(NON_DEFAULT[field])}).cuda()
    eager = copy.deepcopy(model)
    x = _input(model, many=True).cuda()
    assert_same_steps(model, eager, [x + 0.1 * torch.randn_like(x) for _ in range(5)], monkeypatch)
    calls = model.__dict__.get("_graph_calls")
    assert bool(calls and calls._graphs) == model.plan.graphed_call, field



class _HostReading(torch.nn.Module):
    """A call that cannot be captured: it queries its stream, which a capture forbids (and no sync check sees)."""

    def forward(self, x):
        torch.cuda.current_stream().query()
        return x * 2


@needs_gpu
def test_a_failed_capture_is_reported_once_and_the_call_runs_eagerly():
    calls, module = graphs.GraphedCall(), _HostReading()
    x = torch.ones(4, device="cuda")
    key = ("a signature",)
    assert torch.equal(calls(module, [x], [], key), x * 2)  # first sight: eager
    with pytest.warns(UserWarning, match="could not be captured"):
        assert torch.equal(calls(module, [x], [], key), x * 2)
    assert torch.equal(calls(module, [x], [], key), x * 2) and not calls._graphs
    torch.randn(4, device="cuda")  # the device's random generator left capture mode
