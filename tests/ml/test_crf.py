"""The CRF against brute-force enumeration of every tag sequence, and the softmax head."""
from __future__ import annotations

import itertools

import pytest
import torch

from ml.labels import allowed_transitions, tag_set
from ml.modules.crf import CRF, FORBIDDEN, SoftmaxHead

LENGTHS = [4, 2, 1, 3]


def random_case(num_tags: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    emissions = torch.randn(len(LENGTHS), max(LENGTHS), num_tags, generator=g)
    lengths = torch.tensor(LENGTHS)
    mask = torch.arange(max(LENGTHS)).unsqueeze(0) < lengths.unsqueeze(1)
    return emissions, mask


def brute_force(crf: CRF, emissions, mask, b: int):
    """Every tag sequence of sentence b with its score."""
    n = int(mask[b].sum())
    scores = {}
    for seq in itertools.product(range(crf.num_tags), repeat=n):
        tags = torch.zeros(1, emissions.size(1), dtype=torch.long)
        tags[0, :n] = torch.tensor(seq)
        scores[seq] = crf.score(emissions[b : b + 1], tags, mask[b : b + 1]).item()
    return scores


def constrained_crf(seed: int = 0) -> CRF:
    torch.manual_seed(seed)
    tags = tag_set(["PER"], "bioes")  # O B-PER I-PER E-PER S-PER
    pairs, starts, ends = allowed_transitions(tags, "bioes")
    crf = CRF(len(tags), pairs, starts, ends)
    with torch.no_grad():
        crf.start.uniform_(-1, 1)
        crf.end.uniform_(-1, 1)
    return crf


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_partition_viterbi_and_marginals_equal_brute_force(constrained, seed):
    crf = constrained_crf(seed) if constrained else CRF(4)
    emissions, mask = random_case(crf.num_tags, seed)
    log_z = crf.log_partition(emissions, mask)
    best = crf.decode(emissions, mask)
    marginals = crf.marginals(emissions, mask)
    for b in range(len(LENGTHS)):
        n = LENGTHS[b]
        scores = brute_force(crf, emissions, mask, b)
        values = torch.tensor(list(scores.values()), dtype=torch.float64)
        assert log_z[b].item() == pytest.approx(torch.logsumexp(values, 0).item(), abs=1e-4)
        assert tuple(best[b, :n].tolist()) == max(scores, key=scores.get)
        assert best[b, n:].eq(0).all()
        probs = torch.softmax(values, 0)
        expected = torch.zeros(n, crf.num_tags, dtype=torch.float64)
        for p, seq in zip(probs, scores, strict=True):
            for t, k in enumerate(seq):
                expected[t, k] += p
        torch.testing.assert_close(marginals[b, :n].double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(marginals[b, :n].sum(1), torch.ones(n), atol=1e-5, rtol=0)
        assert marginals[b, n:].eq(0).all()


def test_viterbi_never_uses_a_forbidden_transition():
    crf = constrained_crf()
    tags = tag_set(["PER"], "bioes")
    g = torch.Generator().manual_seed(5)
    emissions = torch.randn(64, 7, len(tags), generator=g) * 5  # strong emissions that want invalid paths
    mask = torch.ones(64, 7, dtype=torch.bool)
    pair_list, start_list, end_list = allowed_transitions(tags, "bioes")
    pairs, starts, ends = set(pair_list), set(start_list), set(end_list)

    def valid(row: list[int]) -> bool:
        return row[0] in starts and row[-1] in ends and all(pair in pairs for pair in itertools.pairwise(row))

    # the emissions alone pick invalid paths, so the CRF's constraints are what is being tested
    assert not all(valid(row) for row in emissions.argmax(2).tolist())
    decoded = crf.decode(emissions, mask).tolist()
    invalid = [row for row in decoded if not valid(row)]
    assert not invalid, f"forbidden transitions in {invalid[:3]}"


def test_batched_equals_single_and_scripted_equals_eager():
    crf = constrained_crf(3)
    scripted = torch.jit.script(crf)
    emissions, mask = random_case(crf.num_tags, 3)
    batched = crf.decode(emissions, mask)
    marginals = crf.marginals(emissions, mask)
    assert torch.equal(scripted.decode(emissions, mask), batched)
    torch.testing.assert_close(scripted.marginals(emissions, mask), marginals)
    torch.testing.assert_close(scripted.loss(emissions, batched, mask), crf.loss(emissions, batched, mask))
    for b, n in enumerate(LENGTHS):
        alone = crf.decode(emissions[b : b + 1, :n], mask[b : b + 1, :n])
        assert torch.equal(alone[0], batched[b, :n])
        torch.testing.assert_close(crf.marginals(emissions[b : b + 1, :n], mask[b : b + 1, :n])[0], marginals[b, :n])


def test_loss_is_negative_log_likelihood_and_trains():
    crf = CRF(3)
    emissions, mask = random_case(3, 4)
    emissions.requires_grad_(True)
    tags = crf.decode(emissions, mask).detach()
    loss = crf.loss(emissions, tags, mask)
    expected = -(crf.score(emissions, tags, mask) - crf.log_partition(emissions, mask)).mean()
    assert loss.item() == pytest.approx(expected.item())
    assert loss.item() > 0
    loss.backward()
    assert emissions.grad is not None and crf.transitions.grad is not None
    assert torch.isfinite(emissions.grad).all() and torch.isfinite(crf.transitions.grad).all()


def test_forbidden_penalty_and_bad_indices():
    crf = CRF(2, allowed=[(0, 0)], allowed_start=[0], allowed_end=[0])
    assert crf.transition_penalty[0, 1].item() == FORBIDDEN and crf.transition_penalty[0, 0].item() == 0
    with pytest.raises(ValueError, match="outside"):
        CRF(2, allowed=[(0, 2)])


def test_softmax_head_is_per_step_cross_entropy_summed_over_time():
    head = SoftmaxHead(3)
    emissions, mask = random_case(3, 6)
    tags = torch.randint(0, 3, mask.shape, generator=torch.Generator().manual_seed(0))
    expected = 0.0
    for b, n in enumerate(LENGTHS):
        expected += torch.nn.functional.cross_entropy(emissions[b, :n], tags[b, :n], reduction="sum").item()
    assert head.loss(emissions, tags, mask).item() == pytest.approx(expected / len(LENGTHS), rel=1e-5)
    torch.testing.assert_close(head.marginals(emissions, mask)[mask].sum(1), torch.ones(int(mask.sum())))
