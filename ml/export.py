"""TorchScript export of the whole inference path: token strings -> features (``ml.vocab``'s
``word_key`` and ``casing``, recomputed over UTF-8 bytes) -> embeddings -> scripted recurrence ->
Viterbi -> tag strings and scores. The archive loads with ``torch.jit.load`` alone, without this
project."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ml.artifact import load_model
from ml.model import Tagger
from ml.modules.scripting import script
from ml.vocab import PAD_ID, UNK_ID, casing_class


def utf8_code_points(s: str) -> Tuple[List[int], List[int]]:
    """TorchScript strings are UTF-8 bytes (``s[i]`` is one byte): decode them to code points.
    Returns the code points and the byte offset where each starts (plus the end offset)."""
    points: List[int] = []
    starts: List[int] = []
    i = 0
    n = len(s)
    while i < n:
        b = ord(s[i])
        size = 1
        cp = b
        if b >= 0xF0:
            size, cp = 4, b & 0x07
        elif b >= 0xE0:
            size, cp = 3, b & 0x0F
        elif b >= 0xC0:
            size, cp = 2, b & 0x1F
        for k in range(1, size):
            cp = (cp << 6) | (ord(s[i + k]) & 0x3F)
        points.append(cp)
        starts.append(i)
        i += size
    starts.append(n)
    return points, starts


def in_ranges(cp: int, ranges: List[int]) -> bool:
    """``ranges`` is flat and sorted: [start0, end0, start1, end1, ...], ends exclusive."""
    lo = 0
    hi = len(ranges) // 2
    while lo < hi:
        mid = (lo + hi) // 2
        if ranges[2 * mid + 1] <= cp:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(ranges) // 2 and ranges[2 * lo] <= cp


def _ranges(predicate) -> List[int]:
    out: List[int] = []
    for cp in range(128, 0x110000):
        if predicate(chr(cp)):
            if out and out[-1] == cp:
                out[-1] = cp + 1
            else:
                out.extend([cp, cp + 1])
    return out


class ExportedTagger(nn.Module):
    """Token strings in, tag strings and marginals out. Features are computed as ``ml.vocab``
    defines them; non-ASCII characters are classified with tables taken from Python's ``str``."""

    def __init__(self, tagger: Tagger, words: Dict[str, int], chars: Dict[str, int], tags: List[str], max_word_length: int, name: str, version: str):
        super().__init__()
        self.tagger = tagger
        self.words = words
        self.chars = chars
        self.tags = tags
        self.max_word_length = max_word_length
        self.name = name
        self.version = version
        # TorchScript cannot read module globals: the ids are copied into attributes
        self.pad_id = PAD_ID
        self.unk_id = UNK_ID
        self.alpha = _ranges(str.isalpha)
        self.upper = _ranges(str.isupper)
        self.digit = _ranges(str.isdigit)
        self.lower: Dict[str, str] = {chr(cp): chr(cp).lower() for cp in range(128, 0x110000) if chr(cp).lower() != chr(cp) and not 0xD800 <= cp < 0xE000}

    @torch.jit.export
    def token_features(self, tok: str) -> Tuple[str, int, List[int]]:
        """(word key, casing class, char ids of the first max_word_length characters)."""
        points, starts = utf8_code_points(tok)
        key: List[str] = []
        char_ids: List[int] = []
        digits = 0
        letters = 0
        uppers = 0
        first_upper = False
        for k in range(len(points)):
            cp = points[k]
            ch = tok[starts[k] : starts[k + 1]]
            if cp < 128:
                is_digit = 48 <= cp <= 57
                is_upper = 65 <= cp <= 90
                is_alpha = is_upper or 97 <= cp <= 122
                low = ch.lower()
            else:
                is_digit = in_ranges(cp, self.digit)
                is_upper = in_ranges(cp, self.upper)
                is_alpha = in_ranges(cp, self.alpha)
                low = self.lower.get(ch, ch)
            if k == 0:
                first_upper = is_upper
            if is_digit:
                digits += 1
                key.append("0")
            else:
                key.append(low)
                if is_alpha:
                    letters += 1
                    if is_upper:
                        uppers += 1
            if k < self.max_word_length:
                char_ids.append(self.chars.get(ch, self.unk_id))
        return "".join(key), casing_class(len(points), digits, letters, uppers, first_upper), char_ids

    def featurize(self, sentences: List[List[str]]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        features: List[List[Tuple[str, int, List[int]]]] = []
        steps = 1
        width = 1
        for tokens in sentences:
            row = [self.token_features(tok) for tok in tokens]
            features.append(row)
            steps = max(steps, len(row))
            for f in row:
                width = max(width, len(f[2]))
        batch = len(sentences)
        words = torch.full([batch, steps], self.pad_id, dtype=torch.long)
        cases = torch.zeros([batch, steps], dtype=torch.long)
        chars = torch.full([batch, steps, width], self.pad_id, dtype=torch.long)
        mask = torch.zeros([batch, steps], dtype=torch.bool)
        for b, row in enumerate(features):
            for t, f in enumerate(row):
                words[b, t] = self.words.get(f[0], self.unk_id)
                cases[b, t] = f[1]
                mask[b, t] = True
                for c, cid in enumerate(f[2]):
                    chars[b, t, c] = cid
        return words, chars, cases, mask

    def forward(self, sentences: List[List[str]]) -> Tuple[List[List[str]], List[List[float]]]:
        """Tags and the marginal probability of each, per sentence."""
        for i, tokens in enumerate(sentences):
            if len(tokens) == 0:
                raise ValueError("sentence " + str(i) + " has no tokens")
            for tok in tokens:
                if len(tok) == 0:
                    raise ValueError("sentence " + str(i) + " has an empty token")
        if len(sentences) == 0:
            return [], []
        words, chars, cases, mask = self.featurize(sentences)
        tag_ids, scores = self.tagger(words, chars, cases, mask)
        out_tags: List[List[str]] = []
        out_scores: List[List[float]] = []
        for b, tokens in enumerate(sentences):
            row: List[str] = []
            probs: List[float] = []
            for t in range(len(tokens)):
                row.append(self.tags[int(tag_ids[b, t])])
                probs.append(float(scores[b, t]))
            out_tags.append(row)
            out_scores.append(probs)
        return out_tags, out_scores


def export_torchscript(model_folder: str | Path, out: str | Path) -> Path:
    """Write ``out`` (a .pt archive). The recurrence is always the scripted backend, whatever the
    model was trained with: the weights are the same."""
    loaded = load_model(model_folder, "cpu", backend="script")
    wrapper = ExportedTagger(
        loaded.model, dict(loaded.vocab.words.stoi), dict(loaded.vocab.chars.stoi), list(loaded.vocab.tags.itos),
        loaded.config.model.max_word_length, loaded.meta.name, loaded.meta.version,
    )
    scripted = script(wrapper.eval())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out))
    return out
