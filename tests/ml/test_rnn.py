"""The scripted recurrence against torch.nn.RNN/GRU/LSTM with copied weights (outputs, final states,
gradients), scripted == eager, padding invariance, the cudnn backend, and the echo-state variant."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ml.modules.rnn import CELLS, RecurrentEncoder, RecurrentLayer, build_encoder

I, H = 7, 5  # noqa: E741 (input and hidden width: the shape letters of ml.modules.rnn)
LENGTHS = [6, 3, 1, 4]


def reference(cell: str, layers: int, bidirectional: bool) -> nn.RNNBase:
    kwargs = {"input_size": I, "hidden_size": H, "num_layers": layers, "bidirectional": bidirectional, "batch_first": True}
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    return nn.RNN(nonlinearity=cell[4:], **kwargs)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(len(LENGTHS), max(LENGTHS), I, generator=g)
    mask = torch.arange(max(LENGTHS)).unsqueeze(0) < lengths.unsqueeze(1)
    return x, mask, lengths


def run_reference(ref: nn.RNNBase, x, lengths):
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, state = ref(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    h, c = state if isinstance(state, tuple) else (state, None)
    return out, h, c


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_matches_torch_nn_outputs_states_and_gradients(cell, layers, bidirectional):
    torch.manual_seed(1)
    ours = RecurrentEncoder(cell, I, H, layers, bidirectional)
    ref = reference(cell, layers, bidirectional)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # our weights into torch.nn

    x, mask, lengths = batch()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out, h, c = ours(x1, mask)
    r_out, r_h, r_c = run_reference(ref, x2, lengths)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, r_h, atol=1e-5, rtol=0)
    if cell == "lstm":
        torch.testing.assert_close(c, r_c, atol=1e-5, rtol=0)

    weights = torch.randn_like(out)  # a loss that weighs every output differently
    ((out * weights).sum() + h.pow(2).sum()).backward()
    ((r_out * weights).sum() + r_h.pow(2).sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(_layer_grad(ours, name), p.grad, atol=1e-5, rtol=1e-5)


def _layer_grad(encoder: RecurrentEncoder, torch_name: str) -> torch.Tensor:
    # weight_ih_l1_reverse -> layers[1].weight_ih.grad[1]
    base, _, rest = torch_name.partition("_l")
    layer, _, reverse = rest.partition("_")
    return getattr(encoder.layers[int(layer)], base).grad[1 if reverse else 0]


@pytest.mark.parametrize("cell", CELLS)
def test_weights_copy_back_from_torch_nn(cell):
    ref = reference(cell, 2, True)
    ours = RecurrentEncoder(cell, I, H, 2, True)
    ours.load_state_dict(ref.state_dict())
    x, mask, lengths = batch(1)
    torch.testing.assert_close(ours(x, mask)[0], run_reference(ref, x, lengths)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_scripted_equals_eager(cell):
    eager = RecurrentEncoder(cell, I, H, 2, True)
    scripted = build_encoder("script", cell, I, H, 2, True)
    scripted.load_state_dict(eager.state_dict())
    assert isinstance(scripted, RecurrentEncoder)
    assert all(isinstance(layer, torch.jit.ScriptModule) for layer in scripted.layers)
    whole = torch.jit.script(eager)
    x, mask, _ = batch(2)
    for a, b, c in zip(eager(x, mask), scripted(x, mask), whole(x, mask), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_cudnn_backend_gives_identical_results(cell):
    scripted = build_encoder("script", cell, I, H, 2, True)
    native = build_encoder("cudnn", cell, I, H, 2, True)
    assert set(native.state_dict()) == set(scripted.state_dict())
    native.load_state_dict(scripted.state_dict())
    x, mask, _ = batch(3)
    for a, b in zip(scripted(x, mask), native(x, mask), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_leaks_into_real_positions(cell):
    encoder = RecurrentEncoder(cell, I, H, 2, True).eval()
    x, mask, lengths = batch(4)
    x_noisy = x.clone()
    x_noisy[~mask] = 1e3  # garbage in the padding
    out, h, _ = encoder(x, mask)
    out2, h2, _ = encoder(x_noisy, mask)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    torch.testing.assert_close(h, h2, atol=0, rtol=0)
    assert out[~mask].abs().max() == 0
    # each sequence alone, without padding, gives the same outputs and states
    for b, n in enumerate(lengths.tolist()):
        alone, h_alone, _ = encoder(x[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(alone[0], out[b, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(h_alone[:, 0], h[:, b], atol=1e-6, rtol=0)


def test_reverse_direction_starts_at_each_sequences_last_token():
    layer = RecurrentLayer("rnn_tanh", 1, 1, bidirectional=True)
    with torch.no_grad():
        layer.weight_ih.fill_(1.0)
        layer.weight_hh.fill_(0.0)  # no memory: output_t = tanh(x_t) in both directions
        layer.bias_ih.zero_()
        layer.bias_hh.zero_()
        layer.weight_hh[1].fill_(1.0)  # the reverse direction accumulates what it has read
    x = torch.tensor([[[1.0], [2.0], [0.0]]])
    mask = torch.tensor([[True, True, False]])
    out, _, _ = layer(x, mask)
    # reverse reads 2.0 first: at position 1 it has seen only the last real token
    assert out[0, 1, 1].item() == pytest.approx(torch.tanh(torch.tensor(2.0)).item())


def test_loop_has_no_host_device_synchronisation():
    scripted = torch.jit.script(RecurrentLayer("lstm", I, H, True))
    graph = str(scripted.graph)
    for op in ("aten::item", "aten::Int", "aten::tolist", "aten::cpu", "aten::nonzero"):
        assert op not in graph, f"{op} in the scripted recurrence"


def test_initialisation_follows_the_seed_remedies():
    layer = RecurrentLayer("lstm", I, H, True)
    for d in range(2):
        for g in range(4):
            w = layer.weight_hh[d, g * H : (g + 1) * H]
            torch.testing.assert_close(w @ w.t(), torch.eye(H), atol=1e-5, rtol=0)  # orthogonal
    assert torch.all(layer.bias_ih[:, H : 2 * H] == 1.0)  # forget gate
    assert torch.all(layer.bias_ih[:, :H] == 0.0)


@pytest.mark.parametrize("backend", ["script", "cudnn"])
def test_echo_state_network_is_frozen_with_spectral_radius_below_one(backend):
    encoder = build_encoder(backend, "rnn_tanh", I, H, 1, True, echo_state_radius=0.9)
    state = encoder.state_dict()
    for key in ("weight_hh_l0", "weight_hh_l0_reverse"):
        radius = torch.linalg.eigvals(state[key]).abs().max().item()
        assert radius == pytest.approx(0.9, abs=1e-4)
    frozen = [n for n, p in encoder.named_parameters() if not p.requires_grad]
    assert frozen and all("weight_hh" in n for n in frozen)
    with pytest.raises(ValueError, match="basic RNN"):
        build_encoder(backend, "lstm", I, H, 1, True, echo_state_radius=0.9)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown recurrent cell 'lstmm'"):
        RecurrentEncoder("lstmm", I, H)
    with pytest.raises(ValueError, match="unknown recurrence backend"):
        build_encoder("fast", "lstm", I, H)
    with pytest.raises(ValueError, match="num_layers"):
        RecurrentEncoder("gru", I, H, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_matches_torch_nn(cell):
    ours = build_encoder("script", cell, I, H, 2, True).cuda()
    ref = reference(cell, 2, True).cuda()
    ref.load_state_dict(ours.state_dict())
    x, mask, lengths = batch(5)
    out, h, _ = ours(x.cuda(), mask.cuda())
    r_out, r_h, _ = run_reference(ref, x.cuda(), lengths)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, r_h, atol=1e-5, rtol=0)


def test_native_backend_is_named_for_what_it_is_and_the_old_name_still_works():
    from ml.config import Config
    from ml.modules.rnn import TorchRecurrentEncoder, canonical_backend

    assert canonical_backend("cudnn") == canonical_backend("native") == "native"
    assert isinstance(build_encoder("native", "gru", I, H), TorchRecurrentEncoder)
    assert isinstance(build_encoder("cudnn", "gru", I, H), TorchRecurrentEncoder)
    assert Config.from_dict({"model": {"backend": "cudnn"}}).model.backend == "native"


def test_each_cell_is_one_scripted_step_of_the_same_loop():
    for cell in CELLS:
        layer = RecurrentLayer(cell, I, H, True)
        gates = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
        assert layer.weight_ih.shape == (2, gates * H, I) and layer.step.gates == gates
        torch.jit.script(layer.step)  # each step compiles on its own
