"""Knowledge distillation from an ensemble of trained taggers (Hinton et al. 2015), in the
posterior form Wang et al. 2020 found best for CRF taggers: each training sequence's target is, at
every step, the mean over the teachers of their tag marginals p(tag_t = k | sentence) (the CRF's
forward-backward, ``ml.modules.crf.CRF.marginals``), and the student's loss adds the cross-entropy
between that distribution and its own marginals (``Tagger.loss``'s ``soft_targets``).

By default (``train.distill_view = "cased"``) the teachers see each sequence as it is in the
corpus, before the training-time recasing of ``train.case_*``: the student learns to give a
lower-cased or upper-cased sentence the ensemble's reading of the cased one. With ``"same"`` they
see the recasing the student sees (the classic ensemble distillation). Either way the marginals are
computed once per casing, before the first epoch, and kept on the CPU (4 bytes x tags per training
token and casing)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ml.artifact import LoadedModel, load_model
from ml.config import TrainConfig
from ml.data import Example
from ml.data.tensorize import tensorize
from ml.labels import Span
from ml.vocab import Vocabularies


def distill_casings(tc: TrainConfig) -> list[str]:
    """The casings the teachers read: the sequences as they are, and with ``train.distill_view =
    "same"`` each recasing the training may draw (``train.case_*`` above zero)."""
    casings = ["as_is"]
    if tc.distill_view == "same":
        casings += [c for c, p in (("lower", tc.case_lower), ("upper", tc.case_upper), ("title", tc.case_title)) if p > 0]
    return casings


def load_teachers(folders: Sequence[str | Path], vocab: Vocabularies) -> list[LoadedModel]:
    """The teacher models, each checked to tag with the student's tag set in the same order."""
    if not folders:
        raise ValueError("distillation needs at least one teacher model folder")
    teachers = []
    for folder in folders:
        teacher = load_model(folder)
        if teacher.vocab.tags.itos != vocab.tags.itos:
            raise ValueError(
                f"teacher {folder} tags with {teacher.vocab.tags.itos}, the student with {vocab.tags.itos}: "
                "distillation needs the same tags (the same entity types and train.tag_scheme)"
            )
        teachers.append(teacher)
    return teachers


@torch.no_grad()
def teacher_marginals(
    teachers: Sequence[LoadedModel], sequences: Sequence[Example], batch_size: int = 64, log: Callable[[str], None] | None = None,
) -> list[Tensor]:
    """For each sequence, a (len, K) tensor: the teachers' mean tag marginals at each token."""
    if not teachers:
        raise ValueError("teacher_marginals needs at least one teacher")
    out: list[Tensor | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))  # little padding
    for n, teacher in enumerate(teachers, 1):
        model, limit = teacher.model.eval(), teacher.config.model.max_word_length
        for start in range(0, len(order), batch_size):
            chunk = [i for i in order[start : start + batch_size] if sequences[i].tokens]
            if not chunk:
                continue
            batch = tensorize([sequences[i].tokens for i in chunk], teacher.vocab, limit)
            probs = model.marginals(*batch.inputs) / len(teachers)
            for row, i in enumerate(chunk):
                mine = probs[row, : len(sequences[i].tokens)]
                previous = out[i]
                out[i] = mine.clone() if previous is None else previous + mine
        if log is not None:
            log(f"distillation: teacher {n}/{len(teachers)} ({teacher.path}) read {len(sequences)} sequences")
    num_tags = len(teachers[0].vocab.tags)
    return [t if t is not None else torch.zeros(0, num_tags) for t in out]


def pad_targets(targets: Sequence[Tensor], width: int) -> Tensor:
    """(B, width, K): each (len, K) target at the start of its row, zeros after."""
    if not targets:
        raise ValueError("pad_targets needs at least one target")
    out = torch.zeros(len(targets), width, targets[0].shape[1])
    for row, target in enumerate(targets):
        if target.shape[0] > width:
            raise ValueError(f"target {row} has {target.shape[0]} steps, more than the batch's {width}")
        out[row, : target.shape[0]] = target
    return out


@torch.no_grad()
def ensemble_spans(teachers: Sequence[LoadedModel], sentences: Sequence[Example]) -> list[list[Span]]:
    """What the ensemble itself predicts (to measure what a student could reach): for each sentence,
    the allowed tag path with the highest sum of log mean marginals (Viterbi over them, with the
    tag scheme's transition constraints and no learnt transition scores), as entity spans."""
    from ml.labels import allowed_transitions, tags_to_spans
    from ml.modules.crf import CRF

    itos = teachers[0].vocab.tags.itos
    scheme = teachers[0].config.model.tag_scheme
    pairs, starts, ends = allowed_transitions(itos, scheme)
    path = CRF(len(itos), pairs, starts, ends)
    for p in (path.transitions, path.start, path.end):
        p.zero_()
    out: list[list[Span]] = []
    for target in teacher_marginals(teachers, sentences):
        if not len(target):
            out.append([])
            continue
        best = path.decode(target.clamp(min=1e-12).log().unsqueeze(0), torch.ones(1, len(target), dtype=torch.bool))[0]
        out.append(tags_to_spans([itos[k] for k in best.tolist()], scheme))
    return out
