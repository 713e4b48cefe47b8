"""Length-aware recurrences: the seed's basic RNN, GRU and LSTM, bidirectional and stacked.

One ``RecurrentLayer`` runs both directions of one layer together:

* the input projection ``W_ih x_t + b_ih`` of every step and both directions is one matmul before
  the loop (PyTorch's "premul" custom LSTM);
* the reverse direction reads each sequence reversed *within its own length* (a gather), so it
  starts at the sequence's last real token and padding never reaches a real position;
* per step, one batched matmul ``(D, B, H) x (D, H, G*H)`` advances both directions;
* a step past a sequence's end leaves its state unchanged (``torch.where`` on the mask), so the
  final state is the state at the last real token, as with packed sequences in ``torch.nn``;
* the loop has no ``.item()`` and no host-side length logic: nothing synchronises with the device.

Parameters are stored per layer as ``(D, G*H, in)`` so the loop needs no stacking; the state dict
of ``RecurrentEncoder`` uses ``torch.nn.RNN/GRU/LSTM`` names and shapes (``weight_ih_l0``,
``weight_hh_l0_reverse``, ...), so weights load into and from those modules directly.

Shapes: B batch, T steps, I input width, H hidden width per direction, D directions (1 or 2),
G gates (1 for the basic RNN, 3 for GRU, 4 for LSTM, in torch's order: r,z,n / i,f,g,o).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.modules.scripting import script

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
BACKENDS = ("script", "native")
# older model folders and configs name the torch.nn backend "cudnn" (it is torch.nn's fused kernels,
# cuDNN on a GPU and the native ones on a CPU); they still load
BACKEND_ALIASES = {"cudnn": "native"}
_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def canonical_backend(backend: str) -> str:
    """The backend's current name (an old alias mapped to it); an unknown name is an error."""
    backend = BACKEND_ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown recurrence backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def _check_cell(cell: str) -> str:
    if cell not in CELLS:
        raise ValueError(f"unknown recurrent cell {cell!r}; expected one of {', '.join(CELLS)}")
    return cell


# One time step of each cell, as PyTorch's custom_lstms.py keeps one cell per class. Each takes the
# precomputed input and recurrent projections of both directions, gates_x and gates_h (D, B, G*H),
# and the state and cell (D, B, H), and returns the new (state, cell); only the LSTM has a cell, the
# others return theirs unchanged. The gate order is torch.nn's.


class Step(nn.Module):
    gates = 0  # G: blocks of H rows in weight_ih / weight_hh


class TanhStep(Step):
    gates = 1

    def forward(self, gates_x: Tensor, gates_h: Tensor, state: Tensor, cell: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.tanh(gates_x + gates_h), cell


class ReluStep(Step):
    gates = 1

    def forward(self, gates_x: Tensor, gates_h: Tensor, state: Tensor, cell: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.relu(gates_x + gates_h), cell


class GRUStep(Step):
    gates = 3  # r, z, n

    def forward(self, gates_x: Tensor, gates_h: Tensor, state: Tensor, cell: Tensor) -> Tuple[Tensor, Tensor]:
        xr, xz, xn = gates_x.chunk(3, 2)
        hr, hz, hn = gates_h.chunk(3, 2)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)  # the reset gate scales the recurrent part only, as in torch.nn
        return n + z * (state - n), cell


class LSTMStep(Step):
    gates = 4  # i, f, g, o

    def forward(self, gates_x: Tensor, gates_h: Tensor, state: Tensor, cell: Tensor) -> Tuple[Tensor, Tensor]:
        i, f, g, o = (gates_x + gates_h).chunk(4, 2)
        new_cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(new_cell), new_cell


STEPS: Dict[str, Type[Step]] = {"rnn_tanh": TanhStep, "rnn_relu": ReluStep, "gru": GRUStep, "lstm": LSTMStep}


class RecurrentLayer(nn.Module):
    """One recurrent layer: one or two directions advancing in one loop over a cell's step."""

    __constants__ = ("has_cell", "hidden_size", "num_directions")

    def __init__(self, cell: str, input_size: int, hidden_size: int, bidirectional: bool = True):
        super().__init__()
        step = STEPS[_check_cell(cell)]
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
        self.cell = cell
        self.step = step()
        # a constant, so the scripted loop has no cell-state update for cells without one
        self.has_cell = cell == "lstm"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_directions = 2 if bidirectional else 1
        d, gh = self.num_directions, step.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(d, gh, input_size))
        self.weight_hh = nn.Parameter(torch.empty(d, gh, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(d, gh))
        self.bias_hh = nn.Parameter(torch.empty(d, gh))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The seed's remedies for vanishing gradients: orthogonal recurrent weights, Xavier input
        weights, and (LSTM) a forget-gate bias of 1 so the cell state is kept by default."""
        h = self.hidden_size
        for d in range(self.num_directions):
            for g in range(self.weight_ih.size(1) // h):
                nn.init.xavier_uniform_(self.weight_ih[d, g * h : (g + 1) * h])
                nn.init.orthogonal_(self.weight_hh[d, g * h : (g + 1) * h])
        self.bias_ih.zero_()
        self.bias_hh.zero_()
        if self.cell == "lstm":
            self.bias_ih[:, h : 2 * h] = 1.0

    @torch.no_grad()
    def make_echo_state(self, spectral_radius: float, generator: torch.Generator | None = None) -> None:
        """The seed's echo-state network: random recurrent weights scaled to a spectral radius
        below 1 (so the state fades instead of exploding), then frozen."""
        if self.cell not in ("rnn_tanh", "rnn_relu"):
            raise ValueError(f"the echo-state variant is defined for the basic RNN, not {self.cell}")
        if not 0.0 < spectral_radius < 1.0:
            raise ValueError(f"spectral_radius must lie in (0, 1), got {spectral_radius}")
        h = self.hidden_size
        for d in range(self.num_directions):
            w = torch.randn(h, h, generator=generator) / math.sqrt(h)
            radius = torch.linalg.eigvals(w).abs().max().item()
            self.weight_hh[d].copy_(w * (spectral_radius / radius))
        self.weight_hh.requires_grad_(False)

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, I); mask: (B, T) bool, True at real steps, each row a prefix.

        Returns output (B, T, D*H), zero at padding; h_n and c_n (D, B, H), the states at each
        sequence's last real step (c_n is zeros except for the LSTM)."""
        batch, steps = x.size(0), x.size(1)
        d, h = self.num_directions, self.hidden_size
        gh = self.weight_ih.size(1)
        lengths = mask.sum(1)
        # rev[b, t]: where step t of sequence b's reversed reading comes from; an involution
        position = torch.arange(steps, device=x.device).unsqueeze(0)
        rev = torch.where(mask, lengths.unsqueeze(1) - 1 - position, position)

        # all input projections in one matmul: (B*T, I) x (I, D*G*H)
        xp = torch.addmm(self.bias_ih.reshape(-1), x.reshape(batch * steps, -1), self.weight_ih.reshape(d * gh, -1).t())
        xp = xp.view(batch, steps, d, gh)
        if d == 2:
            backward = xp[:, :, 1].gather(1, rev.unsqueeze(2).expand(batch, steps, gh))
            xp = torch.stack([xp[:, :, 0], backward], 2)
        xp = xp.permute(1, 2, 0, 3).contiguous()  # (T, D, B, G*H)

        w_hh = self.weight_hh.transpose(1, 2)  # (D, H, G*H)
        b_hh = self.bias_hh.unsqueeze(1)  # (D, 1, G*H)
        live = mask.t().reshape(steps, 1, batch, 1)  # (T, 1, B, 1)
        state = x.new_zeros(d, batch, h)
        cell = x.new_zeros(d, batch, h)
        outputs: List[Tensor] = []
        # unbind, not xp[t]: the backward of indexing would zero-fill a full (T, D, B, G*H) gradient
        # per step (quadratic in T); unbind's backward stacks the step gradients once
        inputs = xp.unbind(0)
        for t in range(steps):
            gates_x = inputs[t]
            gates_h = torch.baddbmm(b_hh, state, w_hh)  # one matmul for both directions
            new_state, new_cell = self.step(gates_x, gates_h, state, cell)
            # past a sequence's end the state (and the LSTM's cell) stays as it was at its last real step
            if self.has_cell:
                cell = torch.where(live[t], new_cell, cell)
            state = torch.where(live[t], new_state, state)
            outputs.append(state)

        out = torch.stack(outputs, 0).permute(2, 0, 1, 3)  # (B, T, D, H)
        if d == 2:
            backward = out[:, :, 1].gather(1, rev.unsqueeze(2).expand(batch, steps, h))
            out = torch.stack([out[:, :, 0], backward], 2)
        out = out.reshape(batch, steps, d * h) * mask.unsqueeze(2).to(out.dtype)
        return out, state, cell


class EncoderBase(nn.Module):
    """What both backends share: the arguments, their checks, and the sizes the Tagger reads.
    Subclasses take (x (B, T, I), mask (B, T)) and return output (B, T, D*H), h_n and c_n (L*D, B, H),
    with torch.nn.RNN/GRU/LSTM state-dict names."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = True, dropout: float = 0.0):
        super().__init__()
        _check_cell(cell)
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size} and {hidden_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.output_size = self.num_directions * hidden_size
        self.dropout = dropout

    def make_echo_state(self, spectral_radius: float, generator: torch.Generator | None = None) -> None:
        raise NotImplementedError


class RecurrentEncoder(EncoderBase):
    """Stacked recurrent layers with dropout between them; ``torch.nn.LSTM``-compatible state dict."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = True, dropout: float = 0.0):
        super().__init__(cell, input_size, hidden_size, num_layers, bidirectional, dropout)
        self.layers = nn.ModuleList(
            [RecurrentLayer(cell, input_size if k == 0 else self.output_size, hidden_size, bidirectional) for k in range(num_layers)]
        )
        self.register_state_dict_post_hook(_to_torch_names)
        self.register_load_state_dict_pre_hook(_from_torch_names)

    def make_echo_state(self, spectral_radius: float, generator: torch.Generator | None = None) -> None:
        for layer in self.layers:
            if not isinstance(layer, RecurrentLayer):  # a scripted layer has lost its Python methods
                raise RuntimeError("make_echo_state must run before the layers are scripted (build_encoder does it in that order)")
            layer.make_echo_state(spectral_radius, generator)

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, I), mask: (B, T) -> output (B, T, D*H), h_n and c_n (L*D, B, H) as in torch.nn."""
        states: List[Tensor] = []
        cells: List[Tensor] = []
        for k, layer in enumerate(self.layers):
            if k > 0:
                x = F.dropout(x, self.dropout, self.training)
            x, h, c = layer(x, mask)
            states.append(h)
            cells.append(c)
        return x, torch.cat(states, 0), torch.cat(cells, 0)


_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(weight_ih|weight_hh|bias_ih|bias_hh)$")
_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)(_reverse)?$")


def _to_torch_names(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str, local_metadata) -> None:
    # layers.{k}.weight_ih (D, G*H, I) -> weight_ih_l{k} and weight_ih_l{k}_reverse (G*H, I)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _LAYER_KEY.match(key[len(prefix) :])
        if m:
            value = state_dict.pop(key)
            for d in range(value.size(0)):
                state_dict[f"{prefix}{m.group(2)}_l{m.group(1)}{'_reverse' if d else ''}"] = value[d]


def _from_torch_names(module: nn.Module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    groups: Dict[Tuple[str, str], Dict[int, Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        m = _TORCH_KEY.match(key[len(prefix) :])
        if m:
            groups.setdefault((m.group(2), m.group(1)), {})[1 if m.group(3) else 0] = state_dict.pop(key)
    for (layer, name), parts in groups.items():
        state_dict[f"{prefix}layers.{layer}.{name}"] = torch.stack([parts[d] for d in sorted(parts)], 0)


class TorchRecurrentEncoder(EncoderBase):
    """The ``native`` backend (called ``cudnn`` before): ``torch.nn.RNN/GRU/LSTM`` over packed
    sequences, fused kernels (cuDNN on a GPU, torch's own on a CPU), same interface and state dict
    as ``RecurrentEncoder``. Packing needs the lengths on the host, so this backend synchronises once
    per call; it is for training speed, and exports fall back to ``RecurrentEncoder`` with the same
    weights."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = True, dropout: float = 0.0):
        super().__init__(cell, input_size, hidden_size, num_layers, bidirectional, dropout)
        rnn_dropout = dropout if num_layers > 1 else 0.0
        if cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, dropout=rnn_dropout, bidirectional=bidirectional)
        elif cell == "gru":
            self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True, dropout=rnn_dropout, bidirectional=bidirectional)
        else:
            self.rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity=cell[4:], batch_first=True, dropout=rnn_dropout, bidirectional=bidirectional)
        # same initialisation as the scripted encoder
        self.rnn.load_state_dict(RecurrentEncoder(cell, input_size, hidden_size, num_layers, bidirectional).state_dict())
        self.register_state_dict_post_hook(_strip_rnn_prefix)
        self.register_load_state_dict_pre_hook(_add_rnn_prefix)

    def make_echo_state(self, spectral_radius: float, generator: torch.Generator | None = None) -> None:
        scripted = RecurrentEncoder(self.cell, self.input_size, self.hidden_size, self.num_layers, self.bidirectional)
        scripted.load_state_dict(self.state_dict())
        scripted.make_echo_state(spectral_radius, generator)
        self.load_state_dict(scripted.state_dict())
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.requires_grad_(False)

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        steps = x.size(1)
        lengths = mask.sum(1)
        # packing rejects empty sequences; their outputs are masked to zero and their states reset below
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=steps)
        if isinstance(state, tuple):
            h, c = state
        else:
            h, c = state, torch.zeros_like(state)
        nonempty = (lengths > 0).to(x.dtype).view(1, -1, 1)
        out = out * mask.unsqueeze(2).to(out.dtype)
        return out, h * nonempty, c * nonempty


def _strip_rnn_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "rnn.")]:
        state_dict[prefix + key[len(prefix) + 4 :]] = state_dict.pop(key)


def _add_rnn_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and _TORCH_KEY.match(k[len(prefix) :])]:
        state_dict[prefix + "rnn." + key[len(prefix) :]] = state_dict.pop(key)


def build_encoder(
    backend: str,
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bidirectional: bool = True,
    dropout: float = 0.0,
    echo_state_radius: float = 0.0,
    generator: torch.Generator | None = None,
) -> EncoderBase:
    """The one factory: ``script`` gives ``RecurrentEncoder`` with each layer ``torch.jit.script``-ed,
    ``native`` (old name ``cudnn``) gives ``TorchRecurrentEncoder``. Both take (x, mask) and share
    state-dict names. ``echo_state_radius > 0`` makes the basic RNN an echo-state network (frozen
    recurrent weights)."""
    encoder: EncoderBase
    if canonical_backend(backend) == "script":
        encoder = RecurrentEncoder(cell, input_size, hidden_size, num_layers, bidirectional, dropout)
    else:
        encoder = TorchRecurrentEncoder(cell, input_size, hidden_size, num_layers, bidirectional, dropout)
    if echo_state_radius > 0:
        encoder.make_echo_state(echo_state_radius, generator)
    if isinstance(encoder, RecurrentEncoder):
        # script after any weight surgery: Python-only methods are gone from a ScriptModule
        encoder.layers = nn.ModuleList([script(layer) for layer in encoder.layers])
    return encoder
