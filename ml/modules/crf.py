"""Output heads over emission scores: a linear-chain CRF and the seed's per-step softmax.

Both take emissions (B, T, K) and a mask (B, T) whose rows are prefixes, and offer the same three
methods: ``loss`` (negative log-likelihood summed over steps, averaged over the batch), ``decode``
(best tags (B, T), 0 at padding) and ``marginals`` (per-token tag probabilities (B, T, K)).
The CRF knows nothing of tag strings: the scheme's constraints come in as index pairs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Score added to transitions the scheme forbids: large enough that no allowed path loses to a
# forbidden one, finite so that gradients stay defined.
FORBIDDEN = -10000.0
# The sums of the forward and backward recursions are floored here before their log. Each sum is
# taken after shifting by its largest term, so a floored sum belongs to a tag whose every path is
# at least e^69 times less likely than the best one: in float32 that changes no log-partition and
# no marginal, and it keeps log() and its gradient finite.
_TINY = 1e-30


class CRF(nn.Module):
    """``transitions[i, j]`` scores tag ``i`` followed by tag ``j``; ``start[j]`` and ``end[i]`` score
    the first and last tag of a sequence. Forbidden moves carry a fixed ``FORBIDDEN`` penalty."""

    __constants__ = ("tiny",)
    if TYPE_CHECKING:  # buffers registered in __init__, declared for mypy only (TorchScript cannot
        # resolve a class-level annotation written as a string under `from __future__ import annotations`)
        transition_penalty: Tensor
        start_penalty: Tensor
        end_penalty: Tensor

    def __init__(
        self,
        num_tags: int,
        allowed: Optional[Iterable[Tuple[int, int]]] = None,
        allowed_start: Optional[Sequence[int]] = None,
        allowed_end: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if num_tags < 1:
            raise ValueError(f"num_tags must be positive, got {num_tags}")
        self.num_tags = num_tags
        self.tiny = _TINY  # an attribute: TorchScript cannot read module globals
        self.transitions = nn.Parameter(torch.zeros(num_tags, num_tags))
        self.start = nn.Parameter(torch.zeros(num_tags))
        self.end = nn.Parameter(torch.zeros(num_tags))
        self.register_buffer("transition_penalty", _penalty((num_tags, num_tags), allowed))
        self.register_buffer("start_penalty", _penalty((num_tags,), None if allowed_start is None else ((j,) for j in allowed_start)))
        self.register_buffer("end_penalty", _penalty((num_tags,), None if allowed_end is None else ((i,) for i in allowed_end)))
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def _scores(self) -> Tuple[Tensor, Tensor, Tensor]:
        return (
            self.transitions + self.transition_penalty,
            self.start + self.start_penalty,
            self.end + self.end_penalty,
        )

    def _exp_transitions(self) -> Tuple[Tensor, Tensor]:
        """exp(transitions - shift) (K_from, K_to) and the shift: forbidden moves become 0."""
        trans = self._scores()[0]
        shift = trans.max()
        return (trans - shift).exp(), shift

    def _forward_alphas(self, emissions: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """Forward algorithm. Returns alphas (T, B, K), alpha_t(j) = log sum over prefixes ending in j,
        and log Z (B,).

        Each step is the scaled forward recursion: alpha_t(j) = m + shift + emit_t(j)
        + log sum_i exp(alpha_{t-1}(i) - m) exp(trans(i, j) - shift), with m = max_i alpha_{t-1}(i),
        i.e. one (B, K) x (K, K) matmul instead of a logsumexp over (B, K, K) (4x faster on a CPU:
        reductions over a middle dimension and exp of -10^4 are slow paths there)."""
        _, start, end = self._scores()
        exp_trans, shift = self._exp_transitions()
        alpha = start.unsqueeze(0) + emissions[:, 0]  # (B, K)
        alphas = [alpha]
        for t in range(1, emissions.size(1)):
            top = alpha.amax(1, keepdim=True)  # (B, 1)
            summed = torch.mm((alpha - top).exp(), exp_trans)  # (B, K_to): sum over K_from
            step = summed.clamp(min=self.tiny).log() + top + shift + emissions[:, t]
            alpha = torch.where(mask[:, t].unsqueeze(1), step, alpha)
            alphas.append(alpha)
        return torch.stack(alphas, 0), torch.logsumexp(alpha + end, dim=1)

    @torch.jit.export
    def log_partition(self, emissions: Tensor, mask: Tensor) -> Tensor:
        return self._forward_alphas(emissions, mask)[1]

    @torch.jit.export
    def score(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Unnormalised score of the given tag paths (B,)."""
        trans, start, end = self._scores()
        maskf = mask.to(emissions.dtype)
        emitted = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (B, T)
        total = start[tags[:, 0]] + (emitted * maskf).sum(1)
        if tags.size(1) > 1:
            moves = trans[tags[:, :-1], tags[:, 1:]]  # (B, T-1)
            total = total + (moves * maskf[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return total + end[last]

    @torch.jit.export
    def log_likelihood(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """log p(tags | emissions) per sequence (B,)."""
        return self.score(emissions, tags, mask) - self.log_partition(emissions, mask)

    @torch.jit.export
    def loss(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        return -self.log_likelihood(emissions, tags, mask).mean()

    @torch.jit.export
    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """Viterbi: the highest-scoring allowed path (B, T); 0 at padding."""
        trans, start, end = self._scores()
        batch, steps, k = emissions.size(0), emissions.size(1), emissions.size(2)
        best = start.unsqueeze(0) + emissions[:, 0]
        identity = torch.arange(k, device=emissions.device).unsqueeze(0).expand(batch, k)
        pointers: List[Tensor] = []
        to_from = trans.t().contiguous()  # (K_to, K_from): the max runs over the last dimension
        for t in range(1, steps):
            scores, argmax = (best.unsqueeze(1) + to_from).max(dim=2)  # (B, K_to)
            live = mask[:, t].unsqueeze(1)
            best = torch.where(live, scores + emissions[:, t], best)
            # past the end the path stays put, so backtracking from T-1 reaches the real last tag
            pointers.append(torch.where(live, argmax, identity))
        tag = (best + end).argmax(dim=1)  # (B,)
        path = [tag]
        for t in range(len(pointers) - 1, -1, -1):
            tag = pointers[t].gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        path.reverse()
        return torch.stack(path, 1) * mask.long()

    @torch.jit.export
    def marginals(self, emissions: Tensor, mask: Tensor) -> Tensor:
        """Forward-backward: p(tag_t = k | emissions) (B, T, K); rows sum to 1 at real steps."""
        _, _, end = self._scores()
        exp_trans, shift = self._exp_transitions()
        alphas, log_z = self._forward_alphas(emissions, mask)
        steps = emissions.size(1)
        beta = end.unsqueeze(0).expand_as(emissions[:, 0])
        betas = [beta]
        for t in range(steps - 2, -1, -1):
            # beta_t(i) = log sum_j exp(trans(i, j) + emit_{t+1}(j) + beta_{t+1}(j)), scaled as above
            ahead = emissions[:, t + 1] + beta
            top = ahead.amax(1, keepdim=True)
            step = torch.mm((ahead - top).exp(), exp_trans.t()).clamp(min=self.tiny).log() + top + shift
            # at a sequence's last real step (the next one is padding) beta is the end score
            beta = torch.where(mask[:, t + 1].unsqueeze(1), step, end.unsqueeze(0).expand_as(step))
            betas.append(beta)
        betas.reverse()
        log_marginals = alphas.transpose(0, 1) + torch.stack(betas, 1) - log_z.view(-1, 1, 1)
        return log_marginals.exp() * mask.unsqueeze(2).to(emissions.dtype)


class SoftmaxHead(nn.Module):
    """The seed's output layer: an independent softmax per step, cross-entropy summed over time."""

    def __init__(self, num_tags: int):
        super().__init__()
        self.num_tags = num_tags

    @torch.jit.export
    def loss(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        per_step = F.cross_entropy(emissions.transpose(1, 2), tags, reduction="none")  # (B, T)
        return (per_step * mask.to(per_step.dtype)).sum(1).mean()

    @torch.jit.export
    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor:
        return emissions.argmax(2) * mask.long()

    @torch.jit.export
    def marginals(self, emissions: Tensor, mask: Tensor) -> Tensor:
        return emissions.softmax(2) * mask.unsqueeze(2).to(emissions.dtype)


def _penalty(shape: Tuple[int, ...], allowed: Optional[Iterable[Tuple[int, ...]]]) -> Tensor:
    if allowed is None:
        return torch.zeros(shape)
    penalty = torch.full(shape, FORBIDDEN)
    for index in allowed:
        if len(index) != len(shape) or any(not 0 <= i < n for i, n in zip(index, shape, strict=True)):
            raise ValueError(f"allowed transition {index} is outside {shape}")
        penalty[index] = 0.0
    return penalty
