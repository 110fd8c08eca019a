import math

import pytest
import torch
import torch.nn.functional as F

from orpo.errors import OrpoError
from orpo.loss import MAX_MEAN_LOGP, log1mexp, log_odds, orpo_loss


def random_batch(num_pairs=5, seed=0, dtype=torch.float64):
    """Flat scored tokens of `num_pairs` pairs: chosen prompt tokens, chosen and rejected responses."""
    g = torch.Generator().manual_seed(seed)
    logps, pair, chosen, response = [], [], [], []
    for p in range(num_pairs):
        for is_chosen, is_response, n in ((True, False, 3), (True, True, 2 + p), (False, True, 4)):
            logps.append(-torch.rand(n, generator=g, dtype=dtype) * 3)
            pair += [p] * n
            chosen += [is_chosen] * n
            response += [is_response] * n
    return torch.cat(logps), torch.tensor(pair), torch.tensor(chosen), torch.tensor(response)


def paper_formula(logps, pair, chosen, response, num_pairs, alpha, beta, include_prompt):
    """Independent transcription of the paper's loss in plain Python floats."""
    items = list(zip(logps.tolist(), pair.tolist(), chosen.tolist(), response.tolist(), strict=True))
    nll_tokens = [lp for lp, _, c, r in items if c and (r or include_prompt)]
    nll = -sum(nll_tokens) / len(nll_tokens)
    or_terms = []

    def mean(p, side):
        vals = [lp for lp, q, c, r in items if q == p and c == side and r]
        return sum(vals) / len(vals)

    for p in range(num_pairs):
        p_w, p_l = math.exp(mean(p, True)), math.exp(mean(p, False))
        log_or = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
        or_terms.append(-math.log(1 / (1 + math.exp(-beta * log_or))))
    return nll + alpha * sum(or_terms) / num_pairs


def trl_formula(logps, pair, chosen, response, num_pairs, trl_beta):
    """TRL's ORPOTrainer: NLL over chosen prompt+response tokens, odds_ratio_loss with log1p(-exp)."""
    nll = -logps[chosen].mean()

    def seq_mean(side):
        sel = (chosen == side) & response
        return torch.stack([logps[sel & (pair == p)].mean() for p in range(num_pairs)])

    c, r = seq_mean(True), seq_mean(False)
    log_odds_ = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    losses = trl_beta * F.logsigmoid(log_odds_)
    return nll - losses.mean()


@pytest.mark.parametrize("a", [-1e-12, -1e-7, -1e-3, -0.3, -math.log(2), -0.7, -5.0, -40.0, -800.0])
def test_log1mexp_matches_exact_float64(a):
    exact = math.log(-math.expm1(a)) if a > -0.69 else math.log1p(-math.exp(a))
    got = log1mexp(torch.tensor(a, dtype=torch.float64)).item()
    assert got == pytest.approx(exact, rel=1e-12, abs=1e-300)


def test_log1mexp_fp32_is_accurate_where_naive_form_fails():
    a = torch.tensor([-1e-7, -1e-5], dtype=torch.float32)
    exact = torch.log(-torch.expm1(a.double()))
    assert torch.allclose(log1mexp(a).double(), exact, rtol=1e-6)
    naive = torch.log(1 - torch.exp(a))
    assert not torch.allclose(naive.double(), exact, rtol=1e-2)  # what we must never do


def test_log1mexp_gradient_is_finite_on_both_branches():
    a = torch.tensor([-1e-6, -0.5, -0.9, -30.0], requires_grad=True)
    log1mexp(a).sum().backward()
    assert torch.isfinite(a.grad).all()
    expected = -torch.exp(a.detach()) / (-torch.expm1(a.detach()))
    assert torch.allclose(a.grad, expected, rtol=1e-5)


@pytest.mark.parametrize("include_prompt", [False, True])
@pytest.mark.parametrize("alpha,beta", [(0.1, 1.0), (1.0, 0.1), (0.25, 2.0), (0.0, 1.0)])
def test_orpo_loss_equals_paper_formula(include_prompt, alpha, beta):
    logps, pair, chosen, response = random_batch()
    keep = response | chosen if include_prompt else response
    loss, stats = orpo_loss(logps[keep], pair[keep], chosen[keep], response[keep], 5, alpha=alpha, beta=beta)
    expected = paper_formula(logps, pair, chosen, response, 5, alpha, beta, include_prompt)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32


def test_orpo_loss_equals_trl_with_prompt_in_nll_and_beta_one():
    logps, pair, chosen, response = random_batch(num_pairs=4, seed=3)
    loss, _ = orpo_loss(logps, pair, chosen, response, 4, alpha=0.1, beta=1.0)
    assert loss.item() == pytest.approx(trl_formula(logps, pair, chosen, response, 4, 0.1).item(), rel=1e-6)


def test_metrics_use_trl_names_and_definitions():
    logps, pair, chosen, response = random_batch(num_pairs=3)
    _, stats = orpo_loss(logps[response], pair[response], chosen[response], response[response], 3, alpha=0.5)
    m = stats.metrics()
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    ):
        assert name in m
    assert m["rewards/chosen"] == pytest.approx(0.5 * m["logps/chosen"], rel=1e-6)
    assert m["rewards/margins"] == pytest.approx(
        m["rewards/chosen"] - m["rewards/rejected"], rel=1e-5, abs=1e-7
    )
    log_or = stats.log_odds_ratio
    assert m["log_odds_chosen"] == pytest.approx(log_or.mean().item(), rel=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(F.logsigmoid(log_or).mean().item(), rel=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(
        (stats.chosen_logps > stats.rejected_logps).float().mean().item()
    )


def test_swapping_chosen_and_rejected_flips_log_odds():
    logps, pair, chosen, response = random_batch()
    sel = response
    _, a = orpo_loss(logps[sel], pair[sel], chosen[sel], response[sel], 5)
    _, b = orpo_loss(logps[sel], pair[sel], ~chosen[sel], response[sel], 5)
    assert torch.allclose(a.log_odds_ratio, -b.log_odds_ratio)
    assert a.metrics()["log_odds_chosen"] == pytest.approx(-b.metrics()["log_odds_chosen"], rel=1e-6)


def test_token_order_does_not_matter():
    logps, pair, chosen, response = random_batch()
    perm = torch.randperm(len(logps), generator=torch.Generator().manual_seed(1))
    a, _ = orpo_loss(logps, pair, chosen, response, 5)
    b, _ = orpo_loss(logps[perm], pair[perm], chosen[perm], response[perm], 5)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("value", [0.0, -1e-9, -1e4])
def test_extreme_mean_logps_give_finite_loss_and_gradients(value):
    logps = torch.tensor([value, value, -1.0, -2.0], requires_grad=True)
    pair = torch.tensor([0, 0, 0, 0])
    chosen = torch.tensor([True, True, False, False])
    response = torch.ones(4, dtype=torch.bool)
    loss, stats = orpo_loss(logps, pair, chosen, response, 1, alpha=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert torch.isfinite(stats.log_odds_ratio).all()


def test_log_odds_is_large_and_finite_at_p_one():
    assert torch.isfinite(log_odds(torch.tensor(0.0)))
    assert log_odds(torch.tensor(0.0)).item() == pytest.approx(
        -math.log(-math.expm1(MAX_MEAN_LOGP)), rel=1e-3
    )


def test_fully_masked_response_is_a_clear_error():
    logps = torch.tensor([-1.0, -2.0])
    with pytest.raises(OrpoError, match="no scored token"):
        orpo_loss(logps, torch.tensor([0, 1]), torch.tensor([True, False]), torch.tensor([True, True]), 2)


def test_step_normalizers_make_micro_batches_add_up_to_the_full_batch():
    logps, pair, chosen, response = random_batch(num_pairs=6, seed=2)
    full, _ = orpo_loss(logps, pair, chosen, response, 6, alpha=0.3)
    total_tokens, total_pairs = chosen.sum(), 6
    parts = []
    for first, last in ((0, 2), (2, 6)):  # unequal micro-batches: 2 and 4 pairs, different token counts
        sel = (pair >= first) & (pair < last)
        loss, _ = orpo_loss(
            logps[sel],
            pair[sel] - first,
            chosen[sel],
            response[sel],
            last - first,
            alpha=0.3,
            nll_normalizer=total_tokens,
            pair_normalizer=total_pairs,
        )
        parts.append(loss)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)


def test_sft_only_rewards_are_the_log_probs_so_margins_and_accuracies_agree():
    """At orpo_alpha 0 (SFT only) rewards are reported at alpha 1 (the log-probs): margins and accuracies then
    describe the same ranking (they were a flat 0 beside a rising accuracy)."""
    logps = torch.tensor([-1.0, -1.0, -3.0, -3.0, -2.0, -2.0, -1.0, -1.0])
    pair = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    chosen = torch.tensor([True, True, False, False, True, True, False, False])
    response = torch.ones(8, dtype=torch.bool)
    _, stats = orpo_loss(logps, pair, chosen, response, alpha=0.0)
    metrics = stats.metrics()
    assert metrics["rewards/chosen"] == pytest.approx(metrics["logps/chosen"])
    assert metrics["rewards/margins"] == pytest.approx(metrics["logps/chosen"] - metrics["logps/rejected"])
    assert metrics["rewards/margins"] == pytest.approx(0.5) and metrics["rewards/accuracies"] == 0.5
    _, scaled = orpo_loss(logps, pair, chosen, response, alpha=0.25)
    assert scaled.metrics()["rewards/margins"] == pytest.approx(0.25 * 0.5)
