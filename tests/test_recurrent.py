"""Recurrent backbones: stepping equals the parallel forward, the state stays the same size, bad configs refused."""

from __future__ import annotations

import pytest
import torch

from thrifty.backbones.recurrent import BackendError, RecurrentConfig, build_recurrent, selective_scan, state_bytes

CONFIGS = {
    "xlstm-mlstm": RecurrentConfig("xlstm", d_model=32, layers=2, heads=4, context_length=24),
    "xlstm-slstm": RecurrentConfig("xlstm", d_model=32, layers=2, heads=4, context_length=24, slstm_at=(1,)),
    "mamba": RecurrentConfig("mamba", d_model=32, layers=2, state_size=8),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_by_step_equals_parallel_and_state_is_constant(name):
    torch.manual_seed(0)
    model = build_recurrent(CONFIGS[name]).eval()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        parallel = model(x)
        state, outs, sizes = None, [], []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t:t + 1], state)
            outs.append(y)
            sizes.append(state_bytes(state))
    assert (torch.cat(outs, 1) - parallel).abs().max().item() <= 1e-5
    assert sizes[0] > 0 and len(set(sizes)) == 1  # fixed-size state, whatever the context length


@pytest.mark.parametrize("use_mambapy", [False, True])
def test_selective_scan_equals_transformers_scan_with_gradients(use_mambapy):
    """thrifty's step-wise scan against transformers' own torch scan (sequential and mambapy's parallel one)."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    g = torch.Generator().manual_seed(0)
    b, d, n, length = 2, 6, 4, 9
    leaves = [torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g),
              -torch.rand(d, n, generator=g) - 0.1, torch.randn(b, n, length, generator=g),
              torch.randn(b, n, length, generator=g), torch.randn(d, generator=g),
              torch.randn(b, d, length, generator=g), torch.randn(d, generator=g)]
    results = []
    for fn, extra in ((selective_scan, {}), (mamba_selective_scan, {"use_mambapy": use_mambapy})):
        xs = [t.clone().requires_grad_() for t in leaves]
        u, dt, A, B, C, D, z, bias = xs
        y, last = fn(u, dt, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True, **extra)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), last.detach(), [t.grad for t in xs]))
    (y1, h1, g1), (y2, h2, g2) = results
    assert (y1 - y2).abs().max() <= 1e-5 and (h1 - h2).abs().max() <= 1e-5
    assert all((a - c).abs().max() <= 1e-5 for a, c in zip(g1, g2))


def test_mamba_parallel_forward_runs_through_thrifty_scan(monkeypatch):
    import thrifty.backbones.recurrent as recurrent

    calls = []
    monkeypatch.setattr(recurrent, "selective_scan", lambda *a, **k: calls.append(1) or selective_scan(*a, **k))
    model = build_recurrent(CONFIGS["mamba"])
    model(torch.randn(1, 5, 32))
    assert len(calls) == CONFIGS["mamba"].layers


@pytest.mark.parametrize("cfg", [RecurrentConfig("xlstm", d_model=16, layers=1, heads=2, context_length=8),
                                 RecurrentConfig("mamba", d_model=16, layers=1, state_size=4)], ids=["xlstm", "mamba"])
def test_compiled_steps_equal_eager_steps(cfg):
    """torch.compile'd stepping (fixed-shape state) gives the eager outputs (1-block models keep it quick)."""
    torch.manual_seed(0)
    eager, compiled = build_recurrent(cfg).eval(), build_recurrent(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_step()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        s1 = s2 = None
        for t in range(x.shape[1]):
            y1, s1 = eager.step(x[:, t:t + 1], s1)
            y2, s2 = compiled.step(x[:, t:t + 1], s2)
            assert (y1 - y2).abs().max().item() <= 1e-5, t


def test_compiled_xlstm_builds_one_graph_per_batch_size():
    """The eager first step's state and the compiled steps' state differ in strides, and so do inputs sliced out
    of longer ones; both are made canonical, so a sequence costs one compiled graph per batch size (dynamo's
    recompile limit is 8)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = build_recurrent(RecurrentConfig("xlstm", d_model=16, layers=1, heads=2, context_length=8)).eval()
    model.compile_step()
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for batch in (1, 3):
            state = None
            for n in range(2, 6):  # inputs sliced out of longer ones, as a profile or a chunked read feeds them
                _, state = model.step(torch.randn(batch, n, 16)[:, :1], state)
    assert counters["stats"]["unique_graphs"] - before == 2


def test_canonical_strides_copies_only_what_differs():
    from thrifty.backbones.recurrent import _canonical_strides

    a = torch.zeros(2, 4, 1, 1)
    b = torch.zeros(2, 1, 4, 1).transpose(1, 2)  # shape (2, 4, 1, 1), strides (4, 1, 4, 1)
    out = _canonical_strides({"x": (a, b), "n": 3})
    assert out["x"][0] is a and out["x"][1] is not b and out["n"] == 3
    assert out["x"][1].stride() == a.stride() and torch.equal(out["x"][1], b)


def test_mamba_state_bytes_match_a_hand_count():
    model = build_recurrent(CONFIGS["mamba"]).eval()
    with torch.no_grad():
        _, state = model.step(torch.randn(1, 1, 32), None)
    inner = 2 * 32  # expand x d_model channels; per layer a conv window (kernel 4) and an SSM state (size 8)
    assert state_bytes(state) == 2 * (inner * 4 + inner * 8) * 4


def test_bad_configurations_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown recurrent architecture 'gru'.*xlstm, mamba"):
        RecurrentConfig("gru")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="vanilla"):
            RecurrentConfig("xlstm", slstm_at=(1,), slstm_backend="cuda")
    with pytest.raises(ValueError, match="outside"):
        RecurrentConfig("xlstm", layers=2, slstm_at=(2,))
    model = build_recurrent(CONFIGS["xlstm-mlstm"])
    with pytest.raises(ValueError, match="built for at most 24"):
        model(torch.randn(1, 25, 32))
