"""The backend option: ``"planes"`` (the logits materialised, then the per-plane fused kernel: the CUDA
path the channels-last kernel replaces, kept selectable) against ``"kernel"`` (the op that projects the
logits on the fly) and the reference, forward and every gradient; what ``"auto"`` resolves to per device
type (one constant decides CUDA's default); ``$GSPN_BACKEND``; ``"planes"`` for the ops with one compiled
path; bad values and an unavailable kernel."""

import pytest
import torch

from gspn_lightning.nn import GSPNMixer
from gspn_lightning.ops import (
    DIRECTIONS,
    _backend,
    gspn_propagate,
    gspn_propagate_proj,
    gspn_scan,
    propagate,
    propagate_proj_reference,
)
from gspn_lightning.ops._backend import resolve_backend, resolve_proj_backend

from .test_ops import grads, rand_inputs
from .test_propagate_proj import NAMES, rand_proj_inputs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("GSPN_BACKEND", raising=False)


@pytest.fixture
def count_projections(monkeypatch):
    """How often ``gspn_propagate_proj`` materialised the logits (``project_gates`` called)."""
    calls = []
    real = propagate.project_gates

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(propagate, "project_gates", spy)
    return calls


@pytest.mark.parametrize(
    "directions, chunk, shape",
    [(DIRECTIONS, None, (2, 3, 7, 9)), (("l2r", "t2b"), 3, (1, 4, 11, 5)), (("r2l",), None, (1, 2, 1, 6))],
)
def test_planes_matches_kernel_and_reference(directions, chunk, shape, no_env, count_projections):
    """Forward and the gradients of all five inputs: "planes" == "kernel" == the float64 reference, and
    only "planes" materialises the logits."""
    ins = rand_proj_inputs(shape, 3, directions)
    outs = {}
    for backend in ("planes", "kernel"):
        count_projections.clear()
        out = gspn_propagate_proj(*ins, directions, chunk, backend=backend)
        assert count_projections == ([len(directions)] if backend == "planes" else [])
        outs[backend] = out
    ref = propagate_proj_reference(*ins, directions, chunk)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_grads = grads(ref, ins, go)
    for backend, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for name, a, b in zip(NAMES, grads(out, ins, go), ref_grads):
            torch.testing.assert_close(
                a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name, k=backend: f"{k} {n}: {m}"
            )


def test_planes_in_float32_and_bfloat16(no_env):
    """The 16-bit path of "planes" keeps the input dtype and agrees with "kernel" to rounding."""
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        ins = rand_proj_inputs((1, 5, 6, 8), 2, DIRECTIONS, dtype=dtype)
        a = gspn_propagate_proj(*ins, DIRECTIONS, 4, backend="planes")
        b = gspn_propagate_proj(*ins, DIRECTIONS, 4, backend="kernel")
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_auto_resolves_per_device_type(no_env, monkeypatch):
    """CPU: "auto" is the lane kernel; CUDA: :data:`CUDA_PROJ_DEFAULT` ("planes" until a GPU run shows
    the new kernel correct), and flipping that one constant flips the default.  Explicit values stay."""
    monkeypatch.setattr(_backend, "kernel_available", lambda device: True)  # as if a CUDA build loaded
    assert _backend.CUDA_PROJ_DEFAULT == "planes"
    assert resolve_proj_backend(None, CPU) == resolve_proj_backend("auto", CPU) == "kernel"
    assert resolve_proj_backend(None, CUDA) == resolve_proj_backend("auto", CUDA) == "planes"
    for backend in ("kernel", "planes", "reference"):
        assert resolve_proj_backend(backend, CUDA) == resolve_proj_backend(backend, CPU) == backend
    monkeypatch.setattr(_backend, "CUDA_PROJ_DEFAULT", "kernel")
    assert resolve_proj_backend("auto", CUDA) == "kernel"
    # the ops with one compiled path: "auto" and "planes" are their kernel on either device
    for device in (CPU, CUDA):
        assert resolve_backend("auto", device) == resolve_backend("planes", device) == "kernel"


def test_environment_variable_picks_the_path(monkeypatch, count_projections):
    """``$GSPN_BACKEND`` serves ``backend=None`` (the mixers' default): "planes" materialises the logits,
    "kernel" does not, "reference" is the definition (which materialises them too); an explicit
    argument wins over it."""
    ins = rand_proj_inputs((1, 2, 5, 4), 2, DIRECTIONS)
    ref = propagate_proj_reference(*ins, DIRECTIONS, 2)
    for value, projections in (("planes", 1), ("kernel", 0), ("reference", 1)):
        monkeypatch.setenv("GSPN_BACKEND", value)
        count_projections.clear()
        torch.testing.assert_close(gspn_propagate_proj(*ins, DIRECTIONS, 2), ref, rtol=1e-10, atol=1e-10)
        assert len(count_projections) == projections, value
        assert resolve_proj_backend(None, CPU) == value
    monkeypatch.setenv("GSPN_BACKEND", "planes")
    count_projections.clear()
    gspn_propagate_proj(*ins, DIRECTIONS, 2, backend="kernel")
    assert count_projections == []
    monkeypatch.setenv("GSPN_BACKEND", "")  # empty: auto
    assert resolve_proj_backend(None, CPU) == "kernel"


def test_planes_for_the_single_path_ops_is_their_kernel(no_env):
    """``gspn_scan`` and ``gspn_propagate`` have one compiled path (the per-plane kernel): "planes" runs
    it, so ``GSPN_BACKEND=planes`` selects the per-plane kernels throughout a model."""
    ins = rand_inputs((1, 2, 5, 6), requires_grad=True)
    torch.testing.assert_close(
        gspn_scan(*ins, direction="l2r", chunk_size=2, backend="planes"),
        gspn_scan(*ins, direction="l2r", chunk_size=2, backend="kernel"),
        rtol=0, atol=0,
    )  # fmt: skip
    x, _, weight, bias, merge = rand_proj_inputs((1, 3, 4, 5), 2, DIRECTIONS)
    gates = torch.randn(1, 4, 6, 3, 4, 5, dtype=torch.float64)
    a = gspn_propagate(x, gates, merge, DIRECTIONS, None, backend="planes")
    b = gspn_propagate(x, gates, merge, DIRECTIONS, None, backend="kernel")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mixer_takes_planes(no_env):
    """A mixer built with ``backend="planes"`` (MixerOptions.backend) computes what "kernel" computes."""
    torch.manual_seed(0)
    mixer = GSPNMixer(6, d_state=3, chunk_size=None, backend="planes").double()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    y_planes = mixer(x)
    mixer.backend = "kernel"
    torch.testing.assert_close(y_planes, mixer(x), rtol=1e-10, atol=1e-10)


def test_bad_values_and_unavailable_kernel(no_env, monkeypatch):
    ins = rand_proj_inputs((1, 2, 3, 3), 2, ("t2b",))
    with pytest.raises(ValueError, match=r"'auto', 'kernel', 'planes', 'reference'.*got 'plane'"):
        gspn_propagate_proj(*ins, ("t2b",), backend="plane")
    monkeypatch.setenv("GSPN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="got 'cuda'"):
        gspn_propagate_proj(*ins, ("t2b",))
    with pytest.raises(ValueError, match="got 'cuda'"):
        gspn_scan(*rand_inputs((1, 1, 2, 2)))
    monkeypatch.delenv("GSPN_BACKEND")
    # no compiled kernel: an explicit compiled path fails loudly, "auto" falls back to the reference
    monkeypatch.setattr(_backend, "kernel_available", lambda device: False)
    for backend in ("planes", "kernel"):
        with pytest.raises(
            RuntimeError, match=f"backend='{backend}' asked for, but the GSPN kernel is unavailable"
        ):
            gspn_propagate_proj(*ins, ("t2b",), backend=backend)
    monkeypatch.setattr(_backend, "_warned_fallback", {"cpu"})  # the one warning was given already
    assert resolve_proj_backend("auto", CPU) == "reference"
    torch.testing.assert_close(gspn_propagate_proj(*ins, ("t2b",)), propagate_proj_reference(*ins, ("t2b",)))
