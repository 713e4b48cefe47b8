"""The CPU inference path: the same model and weights as ``Tagger.forward``, fewer operations.

On a CPU the scripted model spends its time in per-operation overhead, not arithmetic: one
sentence of 16 tokens runs about 600 TorchScript operations (a dozen per recurrence step, more per
CRF step). This path computes the same numbers in fewer, larger steps:

* token features (word embedding, character encoder, casing embedding) depend on the token string
  alone, so they are computed once per distinct string and kept in a bounded cache; tensorizing is
  then one dict lookup per token;
* the recurrence is ``torch.nn``'s fused kernel (``nn.LSTM``/``GRU``/``RNN``) loaded with the same
  weights, fed a ``PackedSequence`` built directly from the features (no padding); a single
  sentence goes through an LSTM loop in numpy instead (at batch one, torch's per-step overhead is
  most of the recurrence's time);
* the CRF (Viterbi, forward-backward) runs in numpy, float64, in probability space, on that packed,
  time-major layout, where step t's active sentences are a prefix of the batch (no masks). Should
  the probability-space sums underflow, ``FastPathUnderflow`` tells the caller to use the model's
  log-space CRF.

``tests/ml/test_fast.py`` checks tags and marginals against ``Tagger.forward`` run in float64 (1e-5)
and batched against one by one; ``benchmarks/equivalence.py`` does the same on a whole corpus. The
scripted ``Tagger`` stays the export and the GPU path.

Shapes: N tokens of a batch, S sentences, F feature width, K tags, H hidden size.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from ml.vocab import PAD_ID, UNK_ID, Vocabularies, casing, word_key


class FastPathUnderflow(ArithmeticError):
    """The probability-space forward-backward underflowed (emissions of a step apart by more than
    float64's exponent range, ~700): the caller falls back to the log-space model."""


class Decoded(NamedTuple):
    """Per sentence, in input order: tag ids and the marginal probability of each chosen tag."""

    tags: list[np.ndarray]
    scores: list[np.ndarray]


class FeatureCache:
    """Token string -> its feature row (word embedding, character features, casing embedding).

    Rows live in one float32 matrix; when ``capacity`` distinct strings have been seen the cache
    starts over (frequent words come back at once), so memory stays at capacity x F x 4 bytes.
    ``gather`` is safe to call from several threads (the service tags in two lanes): a lock covers
    the lookup and the copy out of the matrix, so a row is never reused while it is being read."""

    def __init__(self, model: Any, vocab: Vocabularies, max_word_length: int, capacity: int = 50_000):
        if capacity < 1:
            raise ValueError(f"feature cache capacity must be positive, got {capacity}")
        self.model = model
        self.vocab = vocab
        self.max_word_length = max_word_length
        self.capacity = capacity
        self.words = model.word_embedding.weight.detach().numpy()  # (V, word_dim)
        self.cases = model.case_embedding.weight.detach().numpy() if model.case_embedding is not None else None
        self.chars = _CharCNNTables.of(model.char_encoder)
        self.width = self.words.shape[1]
        self.width += model.char_encoder.output_size if model.char_encoder is not None else 0
        self.width += self.cases.shape[1] if self.cases is not None else 0
        self.rows: dict[str, int] = {}
        self.matrix = np.zeros((min(capacity, 1024), self.width), dtype=np.float32)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.rows = {}

    def gather(self, tokens: Sequence[str]) -> np.ndarray:
        """The feature rows (N, F) of a flat token list, a copy."""
        with self._lock:
            index = self.lookup(tokens)  # first: it may grow or replace the matrix
            return self.matrix[index]

    def warm(self, count: int) -> None:
        """Compute the features of the ``count`` most frequent training words ahead of time: word
        keys are stored most frequent first; a key without digits is itself a token (lower case),
        and so is its capitalised form (sentence-initial)."""
        keys = [k for k in self.vocab.words.itos[2 : 2 + count] if not any(ch.isdigit() for ch in k)]
        tokens = list(dict.fromkeys(keys + [k.capitalize() for k in keys]))[: self.capacity]
        for lo in range(0, len(tokens), 2048):
            self.gather(tokens[lo : lo + 2048])

    def compute(self, tokens: Sequence[str]) -> np.ndarray:
        """Features of distinct, non-empty token strings (M, F), as ``Tagger.encode`` builds them
        before the recurrence (eval mode: dropout is the identity)."""
        stoi_w = self.vocab.words.stoi
        parts = [self.words[[stoi_w.get(word_key(t), UNK_ID) for t in tokens]]]
        encoder = self.model.char_encoder
        if encoder is not None:
            width = min(self.max_word_length, max(len(t) for t in tokens))
            stoi_c = self.vocab.chars.stoi
            ids = np.full((len(tokens), width), PAD_ID, dtype=np.int64)
            for m, tok in enumerate(tokens):
                clipped = tok[:width]
                ids[m, : len(clipped)] = [stoi_c.get(ch, UNK_ID) for ch in clipped]
            if self.chars is not None:
                parts.append(self.chars(ids))
            else:  # another character encoder: run the module on the (1, M, C) ids
                parts.append(encoder(torch.from_numpy(ids).unsqueeze(0))[0].detach().numpy())
        if self.cases is not None:
            parts.append(self.cases[[casing(t) for t in tokens]])
        return np.concatenate(parts, 1)

    def lookup(self, tokens: Sequence[str]) -> np.ndarray:
        """Row indices (N,) into ``self.matrix`` for a flat token list; computes the misses. Not
        thread-safe on its own: ``gather`` holds the lock around it."""
        rows = self.rows
        missing = list({t: None for t in tokens if t not in rows})
        if missing:
            if not all(missing):
                raise ValueError(f"token {list(tokens).index('')} of the batch is the empty string")
            if len(rows) + len(missing) > self.capacity:
                rows = self.rows = {}
                missing = list(dict.fromkeys(tokens))
                if len(missing) > self.capacity:  # a batch wider than the whole cache: no caching
                    return self._uncached(tokens, missing)
            start = len(rows)
            need = start + len(missing)
            if need > self.matrix.shape[0]:
                grown = np.zeros((min(self.capacity, max(need, 2 * self.matrix.shape[0])), self.width), dtype=np.float32)
                grown[:start] = self.matrix[:start]
                self.matrix = grown
            self.matrix[start:need] = self.compute(missing)
            for m, tok in enumerate(missing):
                rows[tok] = start + m
        return np.fromiter((rows[t] for t in tokens), dtype=np.int64, count=len(tokens))

    def _uncached(self, tokens: Sequence[str], distinct: list[str]) -> np.ndarray:
        index = {t: m for m, t in enumerate(distinct)}
        self.matrix = self.compute(distinct)
        return np.fromiter((index[t] for t in tokens), dtype=np.int64, count=len(tokens))


class _CharCNNTables:
    """``CharCNN`` as table lookups: the convolution of an embedded character at kernel offset o is
    ``emb[c] @ W[:, :, o].T``, precomputed for every character, so a word's convolution is a sum of
    ``kernel`` gathered rows, then the same padding mask and max over positions."""

    def __init__(self, embedding: np.ndarray, weight: np.ndarray, bias: np.ndarray):
        filters, _, kernel = weight.shape
        self.pad = kernel // 2
        self.kernel = kernel
        # tables[o] (num_chars + 1, filters); the extra last row is the convolution's zero padding
        tables = np.einsum("cd,fdo->ocf", embedding.astype(np.float64), weight.astype(np.float64)).astype(np.float32)
        self.tables = np.concatenate([tables, np.zeros((kernel, 1, filters), dtype=np.float32)], 1)
        self.zero = embedding.shape[0]
        self.bias = bias

    @classmethod
    def of(cls, encoder: Any) -> _CharCNNTables | None:
        conv = getattr(encoder, "conv", None)
        if conv is None or conv.kernel_size[0] % 2 == 0 or conv.padding[0] != conv.kernel_size[0] // 2:
            return None  # not the odd-kernel, same-length CharCNN
        return cls(encoder.embedding.weight.detach().numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy())

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids (M, W) char ids, PAD_ID past each word's end -> (M, filters)."""
        m, w = ids.shape
        padded = np.full((m, w + 2 * self.pad), self.zero, dtype=np.int64)
        padded[:, self.pad : self.pad + w] = ids
        out = self.tables[0][padded[:, :w]] + self.bias
        for o in range(1, self.kernel):
            out += self.tables[o][padded[:, o : o + w]]
        out[ids == PAD_ID] = -1e4  # (M, W, filters)
        return out.max(1)


class FastTagger:
    """Inference for a ``Tagger`` on a CPU; ``__call__`` takes token lists and returns ``Decoded``."""

    def __init__(self, model: Any, vocab: Vocabularies, max_word_length: int, cache_size: int = 50_000, warm_words: int = 5_000):
        encoder = model.encoder
        cell = encoder.cell
        kwargs = {"input_size": _input_size(encoder), "hidden_size": encoder.hidden_size, "num_layers": encoder.num_layers,
                  "bidirectional": encoder.bidirectional, "batch_first": False}
        if cell == "lstm":
            rnn: nn.RNNBase = nn.LSTM(**kwargs)
        elif cell == "gru":
            rnn = nn.GRU(**kwargs)
        else:
            rnn = nn.RNN(nonlinearity=cell[4:], **kwargs)
        state = _torch_state_dict(encoder)
        rnn.load_state_dict(state)
        self.rnn = rnn.eval()
        self.single = _NumpyLSTM(state, encoder.num_layers, encoder.bidirectional, encoder.hidden_size) if cell == "lstm" else None
        # numpy's BLAS (OpenBLAS) to one thread, for the whole process: the matmuls here are small,
        # and OpenBLAS's threads spin while they wait, taking a core from torch and the server
        # (measured: the service's CPU time per one-sentence request 16 ms with them, 4.9 without).
        # Switching it around each call costs as much: the threads wake up each time.
        threadpool_limits(limits=1, user_api="blas")
        self.features = FeatureCache(model, vocab, max_word_length, cache_size)
        self.features.warm(warm_words)
        self.projection_np = model.projection.weight.detach().t().contiguous().numpy()  # (D*H, K)
        self.projection_bias_np = model.projection.bias.detach().numpy()
        head = model.head
        if hasattr(head, "transitions"):  # the CRF (duck-typed: a scripted model has lost its classes)
            with torch.no_grad():
                trans = (head.transitions + head.transition_penalty).double().numpy()
                start = (head.start + head.start_penalty).double().numpy()
                end = (head.end + head.end_penalty).double().numpy()
            self.crf: _NumpyCRF | None = _NumpyCRF(trans, start, end)
        else:  # the per-step softmax
            self.crf = None

    @torch.inference_mode()
    def __call__(self, token_lists: Sequence[Sequence[str]]) -> Decoded:
        if not token_lists:
            return Decoded([], [])
        for i, tokens in enumerate(token_lists):
            if not tokens:
                raise ValueError(f"sentence {i} has no tokens")
            if "" in tokens:
                raise ValueError(f"sentence {i} has an empty token at position {list(tokens).index('')}")
        if len(token_lists) == 1 and self.single is not None:
            tags, probs = self._one(token_lists[0])
            return Decoded([tags], [probs])
        return self._packed(token_lists)

    def _one(self, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One sentence: the recurrence in numpy too (at batch 1 torch's per-step overhead is most
        of the recurrence's time). In a batch of one, packed order is token order."""
        assert self.single is not None
        steps = len(tokens)
        x = self.features.gather(tokens)  # (T, F)
        emissions = (self.single(x) @ self.projection_np + self.projection_bias_np).astype(np.float64)  # (T, K)
        if self.crf is not None:
            tags = self.crf.decode_one(emissions)
            with np.errstate(all="ignore"):  # an underflow is caught by _checked
                marginals = self.crf.marginals_one(emissions)
            return tags, _checked(marginals[np.arange(steps), tags])
        return self._decode(emissions, [1] * steps, list(range(steps + 1)), np.arange(steps - 1, -1, -1))

    def _packed(self, token_lists: Sequence[Sequence[str]]) -> Decoded:
        # sentences longest first: the packed layout keeps the active ones a prefix at every step
        order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        lengths = np.array([len(token_lists[i]) for i in order], dtype=np.int64)
        steps = int(lengths[0])
        batch_sizes = (lengths[None, :] > np.arange(steps)[:, None]).sum(1)  # (T,) active sentences per step
        # packed position of (sentence s, step t) is offsets[t] + s
        offsets = np.zeros(steps, dtype=np.int64)
        np.cumsum(batch_sizes[:-1], out=offsets[1:])
        flat = [tok for i in order for tok in token_lists[i]]
        n_tokens = len(flat)
        starts = np.zeros(len(order), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        sentence = np.repeat(np.arange(len(order)), lengths)
        step = np.arange(n_tokens) - np.repeat(starts, lengths)
        packed_index = offsets[step] + sentence  # (N,) packed position of each flat token
        features = np.empty((n_tokens, self.features.width), dtype=np.float32)
        features[packed_index] = self.features.gather(flat)
        x = torch.from_numpy(features)  # (N, F) packed, time-major
        packed = nn.utils.rnn.PackedSequence(x, torch.from_numpy(batch_sizes))
        out = self.rnn(packed)[0].data.numpy()  # (N, D*H)
        emissions = (out @ self.projection_np + self.projection_bias_np).astype(np.float64)  # (N, K)
        # packed (s, t) -> packed (s, length_s - 1 - t)
        packed_sentence = np.arange(n_tokens) - np.repeat(offsets, batch_sizes)
        packed_step = np.repeat(np.arange(steps), batch_sizes)
        reverse = offsets[lengths[packed_sentence] - 1 - packed_step] + packed_sentence
        tags, probs = self._decode(emissions, batch_sizes.tolist(), [*offsets.tolist(), n_tokens], reverse)
        tags, probs = tags[packed_index], probs[packed_index]  # flat (sentence-major) order
        out_tags: list[np.ndarray] = [np.empty(0)] * len(order)
        out_probs: list[np.ndarray] = [np.empty(0)] * len(order)
        for s, i in enumerate(order):
            a, b = starts[s], starts[s] + lengths[s]
            out_tags[i], out_probs[i] = tags[a:b], probs[a:b]
        return Decoded(out_tags, out_probs)

    def _decode(self, emissions: np.ndarray, sizes: list[int], bounds: list[int], reverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tag ids and chosen-tag marginals (N,), packed order."""
        if self.crf is not None:
            tags = self.crf.decode(emissions, sizes, bounds)
            with np.errstate(all="ignore"):  # an underflow is caught by _checked
                marginals = self.crf.marginals(emissions, sizes, bounds, reverse)
        else:
            marginals = np.exp(emissions - emissions.max(1, keepdims=True))
            marginals /= marginals.sum(1, keepdims=True)
            tags = emissions.argmax(1)
        return tags, _checked(marginals[np.arange(len(tags)), tags])


def _checked(probs: np.ndarray) -> np.ndarray:
    if not np.isfinite(probs).all():
        raise FastPathUnderflow("the CRF's forward-backward underflowed in probability space")
    return probs


class _NumpyLSTM:
    """``nn.LSTM`` (eval, batch of one sequence) in numpy, both directions advancing in one loop.

    Gate rows are reordered to i, f, o, g and the i, f, o rows halved (exact in floating point), so
    that one tanh over all gates gives the three sigmoids as 0.5 * tanh(x / 2) + 0.5."""

    def __init__(self, state: dict[str, Tensor], num_layers: int, bidirectional: bool, hidden: int):
        h = hidden
        order = np.concatenate([np.arange(0, 2 * h), np.arange(3 * h, 4 * h), np.arange(2 * h, 3 * h)])
        scale = np.concatenate([np.full(3 * h, 0.5), np.ones(h)]).astype(np.float32)
        suffixes = ["", "_reverse"] if bidirectional else [""]
        self.hidden = h
        self.layers = []
        for k in range(num_layers):
            w_ih = [state[f"weight_ih_l{k}{s}"].numpy()[order] * scale[:, None] for s in suffixes]  # (4H, I)
            w_hh = [state[f"weight_hh_l{k}{s}"].numpy()[order] * scale[:, None] for s in suffixes]  # (4H, H)
            bias = [(state[f"bias_ih_l{k}{s}"] + state[f"bias_hh_l{k}{s}"]).numpy()[order] * scale for s in suffixes]
            self.layers.append((
                np.ascontiguousarray(np.concatenate(w_ih).T),  # (I, D*4H)
                np.ascontiguousarray(np.stack(w_hh).transpose(0, 2, 1)),  # (D, H, 4H)
                np.concatenate(bias),  # (D*4H,)
            ))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (T, I) float32 -> states (T, D*H), torch.nn's layout (forward, then backward)."""
        h = self.hidden
        steps = x.shape[0]
        for w_ih, w_hh, bias in self.layers:
            d = w_hh.shape[0]
            gates_x = (x @ w_ih + bias).reshape(steps, d, 4 * h)
            if d == 2:  # the backward direction reads the sentence reversed
                gates_x[:, 1] = gates_x[::-1, 1].copy()
            # buffers written in place: at batch one each numpy call costs more than its arithmetic
            out = np.empty((steps, d, 1, h), dtype=np.float32)
            state = np.zeros((d, 1, h), dtype=np.float32)
            cell = np.zeros((d, h), dtype=np.float32)
            gates3 = np.empty((d, 1, 4 * h), dtype=np.float32)
            gates = gates3[:, 0]
            sig = np.empty((d, 3 * h), dtype=np.float32)
            scratch = np.empty((d, h), dtype=np.float32)
            for t in range(steps):
                if t:
                    np.matmul(state, w_hh, out=gates3)  # (D, 1, H) x (D, H, 4H)
                    gates += gates_x[t]
                else:  # the initial state is zero: no recurrent term (exactly as adding 0)
                    gates[:] = gates_x[0]
                np.tanh(gates, out=gates)
                np.multiply(gates[:, : 3 * h], 0.5, out=sig)
                sig += 0.5  # input, forget, output gates
                cell *= sig[:, h : 2 * h]
                np.multiply(sig[:, :h], gates[:, 3 * h :], out=scratch)
                cell += scratch
                np.tanh(cell, out=scratch)
                state = out[t]
                np.multiply(sig[:, 2 * h :], scratch, out=state[:, 0])
            out = out[:, :, 0]
            if d == 2:
                out[:, 1] = out[::-1, 1].copy()
            x = out.reshape(steps, d * h)
        return x


class _NumpyCRF:
    """Viterbi and forward-backward of ``ml.modules.crf.CRF`` on a packed batch.

    Packed layout: emissions (N, K) time-major; ``sizes[t]`` sentences are active at step t, always
    the first ones (sentences sorted longest first), and step t's rows start at ``bounds[t]``.
    ``trans[i, j]`` scores tag i followed by tag j; ``start`` and ``end`` the first and last tag."""

    def __init__(self, trans: np.ndarray, start: np.ndarray, end: np.ndarray):
        self.start, self.end = start, end
        self.to_from = np.ascontiguousarray(trans.T)
        exp_trans = np.exp(trans - trans.max())  # (K_from, K_to); forbidden moves are 0
        # forward and backward recursions as one batched matmul per step: (2, n, K) x (2, K, K)
        self.exp_both = np.stack([exp_trans, exp_trans.T])
        self.exp_first = np.stack([np.exp(start - start.max()), np.exp(end - end.max())])[:, None, :]  # (2, 1, K)
        self.exp_end = self.exp_first[1, 0]
        self.ones = np.ones((len(start), 1))

    def decode(self, emissions: np.ndarray, sizes: list[int], bounds: list[int]) -> np.ndarray:
        """Viterbi: the best allowed tag path, (N,) packed."""
        steps, (n_tokens, k) = len(sizes), emissions.shape
        to_from, end = self.to_from, self.end
        to_from_t = torch.from_numpy(to_from)
        chunk = max(1, 30_000 // (k * k))
        pointers = np.empty((n_tokens, k), dtype=np.int64)  # best previous tag for each tag
        last = np.empty(sizes[0], dtype=np.int64)  # each sentence's best final tag
        best = self.start + emissions[: sizes[0]]
        for t in range(1, steps):
            n, prev = sizes[t], sizes[t - 1]
            if n < prev:  # sentences whose last step was t-1
                last[n:prev] = (best[n:prev] + end).argmax(1)
                best = best[:n]
            if n < 16:
                scores = best[:, None, :] + to_from  # (n, K_to, K_from): reduce the contiguous axis
                pointers[bounds[t] : bounds[t + 1]] = scores.argmax(2)
                best = scores.max(2) + emissions[bounds[t] : bounds[t + 1]]
            else:  # numpy's max over a short axis loops per row; torch's kernel is 3x faster here
                values = np.empty((n, k))
                for lo in range(0, n, chunk):  # chunks under torch's grain size: no thread pool
                    scores_t = torch.from_numpy(best[lo : lo + chunk]).unsqueeze(1) + to_from_t
                    torch.max(scores_t, 2, out=(torch.from_numpy(values[lo : lo + chunk]), torch.from_numpy(pointers[bounds[t] + lo : bounds[t] + min(n, lo + chunk)])))
                best = values + emissions[bounds[t] : bounds[t + 1]]
        last[: sizes[-1]] = (best + end).argmax(1)
        tags = np.empty(n_tokens, dtype=np.int64)
        current = last.copy()
        for t in range(steps - 1, -1, -1):
            n = sizes[t]
            ending = sizes[t + 1] if t + 1 < steps else 0
            current[ending:n] = last[ending:n]  # sentences whose last step is t
            tags[bounds[t] : bounds[t + 1]] = current[:n]
            if t > 0:
                current[:n] = pointers[bounds[t] + np.arange(n), current[:n]]
        return tags

    def decode_one(self, emissions: np.ndarray) -> np.ndarray:
        """``decode`` for one sentence (T, K): buffers written in place, backtracking on ints."""
        steps, k = emissions.shape
        best = self.start + emissions[0]
        scores = np.empty((k, k))
        top = np.empty(k)
        pointers = np.empty((steps, k), dtype=np.int64)
        for t in range(1, steps):
            np.add(self.to_from, best, out=scores)  # (K_to, K_from)
            scores.argmax(1, out=pointers[t])
            scores.max(1, out=top)
            np.add(top, emissions[t], out=best)
        tag = int((best + self.end).argmax())
        back = pointers.tolist()
        tags = [tag]
        for t in range(steps - 1, 0, -1):
            tag = back[t][tag]
            tags.append(tag)
        return np.array(tags[::-1], dtype=np.int64)

    def marginals_one(self, emissions: np.ndarray, every: int = 4) -> np.ndarray:
        """``marginals`` for one sentence (T, K). The running sums are rescaled every ``every``
        steps, not each step: a step scales them by at most K (every factor is at most 1) and by at
        least the exp of minus the emissions' spread, so four steps stay far inside float64's range
        for any spread under 170; should a sum still underflow, every step is rescaled instead."""
        steps, k = emissions.shape
        weights = np.exp(emissions - emissions.max(1, keepdims=True))  # (T, K)
        both = np.stack([weights, weights[::-1]])  # (2, T, K): forward, and backward in reversed time
        alphas = np.empty((steps, k))
        betas = np.empty((steps, k))  # reversed time
        state = self.exp_first[:, 0] * both[:, 0]  # (2, K)
        state /= state @ self.ones
        alphas[0] = state[0]
        betas[0] = self.exp_end
        ahead = np.empty((2, 1, k))
        for t in range(1, steps):
            np.matmul(state[:, None, :], self.exp_both, out=ahead)
            betas[t] = ahead[1, 0]
            np.multiply(ahead[:, 0], both[:, t], out=state)
            if t % every == 0:
                state /= state @ self.ones
            alphas[t] = state[0]
        joint = alphas * betas[::-1]
        sums = joint @ self.ones
        if every > 1 and not (np.isfinite(sums).all() and (sums > 0).all()):
            return self.marginals_one(emissions, every=1)
        return joint / sums

    def marginals(self, emissions: np.ndarray, sizes: list[int], bounds: list[int], reverse: np.ndarray) -> np.ndarray:
        """p(tag | emissions) (N, K) packed, by forward-backward in probability space, each step
        rescaled to sum 1 (float64; emissions are shifted per token, so exp stays in range).

        ``reverse`` maps packed (sentence, t) to (sentence, length - 1 - t): read through it, the
        backward recursion has the same active prefixes as the forward one, and both advance in
        one loop. Backward state u (reversed step r, position p) = beta_p * w_p, and
        u_r = (u_{r-1} @ exp_trans.T) * w_p; beta_p itself is that matmul's result."""
        steps = len(sizes)
        weights = np.exp(emissions - emissions.max(1, keepdims=True))  # (N, K)
        both = np.stack([weights, weights[reverse]])  # (2, N, K)
        alphas = np.empty_like(weights)
        betas = np.empty_like(weights)  # in reversed packed order
        ones = self.ones  # sums over K as a matmul: numpy's reduction over a short axis loops per row
        state = self.exp_first * both[:, : sizes[0]]
        state /= state @ ones
        alphas[: sizes[0]] = state[0]
        betas[: sizes[0]] = self.exp_end
        for t in range(1, steps):
            lo, hi = bounds[t], bounds[t + 1]
            ahead = np.matmul(state[:, : sizes[t]], self.exp_both)  # (2, n, K)
            betas[lo:hi] = ahead[1]
            state = ahead * both[:, lo:hi]
            state /= state @ ones
            alphas[lo:hi] = state[0]
        joint = alphas * betas[reverse]
        return joint / joint.sum(1, keepdims=True)


def _torch_state_dict(encoder: Any) -> dict[str, Tensor]:
    """The encoder's weights under ``torch.nn.RNNBase`` names. An eager encoder's state dict already
    uses them (a hook); a ``torch.jit.script``-ed one has lost the hook and keeps its own layout,
    ``layers.{k}.weight_ih`` (D, G*H, I)."""
    state = {k: v.detach() for k, v in encoder.state_dict().items()}
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        match = re.match(r"^layers\.(\d+)\.(weight_ih|weight_hh|bias_ih|bias_hh)$", key)
        if match is None:
            converted[key] = value
            continue
        for d in range(value.size(0)):
            converted[f"{match.group(2)}_l{match.group(1)}{'_reverse' if d else ''}"] = value[d]
    return converted


def _input_size(encoder: Any) -> int:
    if hasattr(encoder, "layers"):
        return int(encoder.layers[0].input_size)
    return int(encoder.rnn.input_size)
