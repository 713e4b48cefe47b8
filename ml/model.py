"""The tagger: token features -> bidirectional recurrence -> per-step emission scores -> CRF or softmax.

Many-to-many with T_x = T_y, as in the seed's NER example: one output per input token. Everything
here maps ids to ids; strings live in ``ml.vocab`` and ``ml.predictor``.
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.config import ModelConfig
from ml.modules.crf import CRF, SoftmaxHead
from ml.modules.rnn import STEPS, build_encoder
from ml.vocab import NUM_CASES, PAD_ID

# The parts a Tagger is assembled from, by what they do (any nn.Module with these members fits;
# ml.modules.rnn's encoders, CharCNN / CharRNN, and ml.modules.crf's CRF / SoftmaxHead do).


class Encoder(Protocol):
    """A sequence encoder: x (B, T, input_size), mask (B, T) -> states (B, T, output_size) and two
    final-state tensors (as torch.nn's h_n, c_n; the Tagger uses only the states)."""

    @property
    def input_size(self) -> int: ...

    @property
    def output_size(self) -> int: ...

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]: ...

    def __call__(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]: ...


class CharEncoder(Protocol):
    """Character features per word: chars (B, T, C) -> (B, T, output_size)."""

    @property
    def output_size(self) -> int: ...

    def __call__(self, chars: Tensor) -> Tensor: ...


class Head(Protocol):
    """Turns emission scores (B, T, K) and a mask (B, T) into a loss, tag ids and marginals."""

    def loss(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean over sentences of the summed per-step loss; tags (B, T) ids."""
        ...

    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """Best tag ids (B, T)."""
        ...

    def marginals(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """Probability of each tag at each step (B, T, K); zero at padding."""
        ...


class CharCNN(nn.Module):
    """Character convolution + max over the word (Ma & Hovy 2016): features for unseen words."""

    def __init__(self, num_chars: int, char_dim: int, filters: int, kernel: int):
        super().__init__()
        self.embedding = nn.Embedding(num_chars, char_dim, padding_idx=PAD_ID)
        self.conv = nn.Conv1d(char_dim, filters, kernel, padding=kernel // 2)
        self.output_size = filters

    def forward(self, chars: Tensor) -> Tensor:
        """chars: (B, T, C) -> (B, T, filters). Char id 0 is padding (ml.vocab.PAD_ID, written
        as a literal because TorchScript cannot read module globals)."""
        b, t, c = chars.size(0), chars.size(1), chars.size(2)
        flat = chars.reshape(b * t, c)
        x = self.conv(self.embedding(flat).transpose(1, 2))  # (B*T, filters, C)
        x = x.masked_fill((flat == 0).unsqueeze(1), -1e4)
        x = x.max(dim=2).values
        # a word with no characters (padding) gets zeros, not -1e4
        x = x * (flat[:, 0] != 0).unsqueeze(1).to(x.dtype)
        return x.view(b, t, -1)


class CharRNN(nn.Module):
    """Character BiLSTM (Lample et al. 2016) on the same scripted recurrence: final forward state
    and final backward state of each word, concatenated."""

    def __init__(self, num_chars: int, char_dim: int, hidden: int, backend: str):
        super().__init__()
        self.embedding = nn.Embedding(num_chars, char_dim, padding_idx=PAD_ID)
        self.encoder = build_encoder(backend, "lstm", char_dim, hidden, 1, True)
        self.output_size = 2 * hidden

    def forward(self, chars: Tensor) -> Tensor:
        b, t, c = chars.size(0), chars.size(1), chars.size(2)
        flat = chars.reshape(b * t, c)
        _, h, _ = self.encoder(self.embedding(flat), flat != 0)  # h: (2, B*T, H)
        return h.transpose(0, 1).reshape(b, t, -1)


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence and feature, the same at every time step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, D)."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty(x.size(0), 1, x.size(2), dtype=x.dtype, device=x.device).bernoulli_(keep) / keep
        return x * mask


class Tagger(nn.Module):
    """Word embedding + char encoder + casing embedding -> dropout -> recurrence -> linear -> head."""

    def __init__(
        self,
        word_embedding: nn.Embedding,
        char_encoder: Optional[CharEncoder],
        case_embedding: Optional[nn.Embedding],
        encoder: Encoder,
        head: Head,
        num_tags: int,
        dropout: float,
        lm_head: Optional[LanguageModelHead] = None,
        locked_dropout: bool = False,
        truecase_head: Optional[nn.Linear] = None,
    ):
        super().__init__()
        width = word_embedding.embedding_dim
        width += char_encoder.output_size if char_encoder is not None else 0
        width += case_embedding.embedding_dim if case_embedding is not None else 0
        if width != encoder.input_size:
            raise ValueError(f"token features are {width} wide but the recurrent encoder expects {encoder.input_size}")
        self.word_embedding = word_embedding
        self.char_encoder = char_encoder
        self.case_embedding = case_embedding
        self.encoder = encoder
        self.dropout: nn.Module = LockedDropout(dropout) if locked_dropout else nn.Dropout(dropout)
        self.projection = nn.Linear(encoder.output_size, num_tags)
        self.head = head
        self.lm_head = lm_head
        self.truecase_head = truecase_head
        self.num_tags = num_tags

    @classmethod
    def from_config(
        cls, config: ModelConfig, num_words: int, num_chars: int, num_tags: int, transitions=None,
        generator: Optional[torch.Generator] = None, init_words: bool = True,
    ) -> Tagger:
        """``init_words=False`` leaves the word table uninitialised (its weights are about to be
        loaded: drawing 20 million random numbers twice was a third of loading the shipped model)."""
        config.validate()
        if init_words:  # (nn.Embedding's own init runs first, as always: seeded trainings keep their random stream)
            words = nn.Embedding(num_words, config.word_dim, padding_idx=PAD_ID)
            nn.init.uniform_(words.weight, -0.1, 0.1)
            with torch.no_grad():
                words.weight[PAD_ID].zero_()
        else:
            words = nn.Embedding(num_words, config.word_dim, padding_idx=PAD_ID, _weight=torch.empty(num_words, config.word_dim))
        chars: Optional[CharCNN | CharRNN] = None
        if config.char_encoder == "cnn":
            chars = CharCNN(num_chars, config.char_dim, config.char_hidden, config.char_kernel)
        elif config.char_encoder == "lstm":
            chars = CharRNN(num_chars, config.char_dim, config.char_hidden, config.backend)
        cases = nn.Embedding(NUM_CASES, config.case_dim, padding_idx=0) if config.case_dim else None
        width = config.word_dim + (chars.output_size if chars is not None else 0) + config.case_dim
        encoder = build_encoder(
            config.backend, config.cell, width, config.hidden_size, config.num_layers, config.bidirectional,
            config.dropout, config.echo_state_radius, generator,
        )
        if config.head == "crf":
            allowed, starts, ends = transitions if transitions is not None else (None, None, None)
            head: CRF | SoftmaxHead = CRF(num_tags, allowed, starts, ends)
        else:
            head = SoftmaxHead(num_tags)
        lm = LanguageModelHead(config.hidden_size, config.lm_vocab) if config.lm_weight > 0 else None
        truecase = nn.Linear(encoder.output_size, NUM_CASES) if config.truecase_weight > 0 else None
        return cls(words, chars, cases, encoder, head, num_tags, config.dropout, lm, config.locked_dropout, truecase)

    def encode(self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids, (B, T, C) char ids, (B, T) casing classes, (B, T) mask -> states (B, T, D*H)."""
        features = [self.word_embedding(words)]
        if self.char_encoder is not None:
            features.append(self.char_encoder(chars))
        if self.case_embedding is not None:
            features.append(self.case_embedding(cases))
        x = self.dropout(torch.cat(features, 2))
        states, _, _ = self.encoder(x, mask)
        return self.dropout(states)

    def emissions(self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor) -> Tensor:
        return self.projection(self.encode(words, chars, cases, mask))  # (B, T, K)

    def marginals(self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor) -> Tensor:
        """p(tag_t = k | sentence) (B, T, K), zero at padding (the head's forward-backward)."""
        return self.head.marginals(self.emissions(words, chars, cases, mask), mask)

    def loss(
        self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor, tags: Tensor, lm_targets: Optional[Tensor] = None, lm_weight: float = 0.0,
        truecase_targets: Optional[Tensor] = None, truecase_weight: float = 0.0,
        soft_targets: Optional[Tensor] = None, soft_weight: float = 0.0,
    ) -> Tensor:
        """Tagging loss (summed over steps, averaged over sentences), plus the weighted auxiliary
        language-model loss when an LM head and targets are given, and the weighted truecasing loss
        (cross-entropy of each token's original casing class, summed over steps, averaged over
        sentences) when a truecasing head and targets are given. With ``soft_targets`` (B, T, K), the
        tagging loss becomes (1 - soft_weight) * itself + soft_weight * the cross-entropy between
        those distributions and the head's marginals, summed over steps and averaged over sentences
        (distillation, ml.distill)."""
        states = self.encode(words, chars, cases, mask)
        emissions = self.projection(states)
        loss = self.head.loss(emissions, tags, mask)
        if soft_targets is not None and soft_weight > 0:  # distillation: cross-entropy to the teachers' marginals
            log_p = self.head.marginals(emissions, mask).clamp(min=1e-12).log()
            per_step = -(soft_targets * log_p).sum(2)  # (B, T)
            loss = (1.0 - soft_weight) * loss + soft_weight * (per_step * mask.to(per_step.dtype)).sum(1).mean()
        lm = self.lm_head
        if lm is not None and lm_targets is not None and lm_weight > 0:
            loss = loss + lm_weight * lm(states, lm_targets, mask)
        truecase = self.truecase_head
        if truecase is not None and truecase_targets is not None and truecase_weight > 0:
            per_token = F.cross_entropy(truecase(states).transpose(1, 2), truecase_targets, reduction="none")
            loss = loss + truecase_weight * (per_token * mask.to(states.dtype)).sum(1).mean()
        return loss

    def forward(self, words: Tensor, chars: Tensor, cases: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Inference: best tag ids (B, T) and each chosen tag's marginal probability (B, T)."""
        emissions = self.emissions(words, chars, cases, mask)
        tags = self.head.decode(emissions, mask)
        scores = self.head.marginals(emissions, mask).gather(2, tags.unsqueeze(2)).squeeze(2)
        return tags, scores


def _recurrent_shapes(prefix: str, cell: str, input_size: int, hidden: int, layers: int, bidirectional: bool) -> dict[str, tuple[int, ...]]:
    gh = STEPS[cell].gates * hidden
    directions = 2 if bidirectional else 1
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(layers):
        width = input_size if k == 0 else directions * hidden
        for suffix in ("", "_reverse")[:directions]:
            shapes[f"{prefix}weight_ih_l{k}{suffix}"] = (gh, width)
            shapes[f"{prefix}weight_hh_l{k}{suffix}"] = (gh, hidden)
            shapes[f"{prefix}bias_ih_l{k}{suffix}"] = (gh,)
            shapes[f"{prefix}bias_hh_l{k}{suffix}"] = (gh,)
    return shapes


def state_shapes(config: ModelConfig, num_words: int, num_chars: int, num_tags: int) -> dict[str, tuple[int, ...]]:
    """The shape of every saved tensor of ``Tagger.from_config`` (without the training-only LM and
    truecasing heads), computed without building anything, so a model folder can be checked before its model
    is allocated. Kept equal to the built model's state dict by a test."""
    shapes: dict[str, tuple[int, ...]] = {"word_embedding.weight": (num_words, config.word_dim)}
    width = config.word_dim
    if config.char_encoder == "cnn":
        shapes["char_encoder.embedding.weight"] = (num_chars, config.char_dim)
        shapes["char_encoder.conv.weight"] = (config.char_hidden, config.char_dim, config.char_kernel)
        shapes["char_encoder.conv.bias"] = (config.char_hidden,)
        width += config.char_hidden
    elif config.char_encoder == "lstm":
        shapes["char_encoder.embedding.weight"] = (num_chars, config.char_dim)
        shapes.update(_recurrent_shapes("char_encoder.encoder.", "lstm", config.char_dim, config.char_hidden, 1, True))
        width += 2 * config.char_hidden
    if config.case_dim:
        shapes["case_embedding.weight"] = (NUM_CASES, config.case_dim)
        width += config.case_dim
    shapes.update(_recurrent_shapes("encoder.", config.cell, width, config.hidden_size, config.num_layers, config.bidirectional))
    shapes["projection.weight"] = (num_tags, (2 if config.bidirectional else 1) * config.hidden_size)
    shapes["projection.bias"] = (num_tags,)
    if config.head == "crf":
        for name in ("transitions", "transition_penalty"):
            shapes[f"head.{name}"] = (num_tags, num_tags)
        for name in ("start", "end", "start_penalty", "end_penalty"):
            shapes[f"head.{name}"] = (num_tags,)
    return shapes


class LanguageModelHead(nn.Module):
    """Rei (2017)'s auxiliary objective, the seed's language model run inside the tagger: the forward
    state at t predicts word t+1, the backward state predicts word t-1. Used only in training."""

    def __init__(self, hidden_size: int, vocab_size: int, width: int = 50):
        super().__init__()
        self.hidden_size = hidden_size
        self.forward_proj = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, vocab_size))
        self.backward_proj = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, vocab_size))

    def forward(self, states: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """states (B, T, 2H) of the last layer; targets (B, T) LM ids; mean per sentence of summed
        cross-entropy, with no target past either end of a sentence."""
        h = self.hidden_size
        fwd, bwd = states[:, :-1, :h], states[:, 1:, h:]
        next_mask = mask[:, 1:].to(states.dtype)
        fwd_loss = F.cross_entropy(self.forward_proj(fwd).transpose(1, 2), targets[:, 1:], reduction="none")
        bwd_loss = F.cross_entropy(self.backward_proj(bwd).transpose(1, 2), targets[:, :-1], reduction="none")
        return ((fwd_loss + bwd_loss) * next_mask).sum(1).mean()
