"""Loss math of sequence-level training, as pure functions of logits, labels and per-row terms.

Every training row carries a *term* (what its loss is) and a non-negative *weight* (its share of
the optimizer step, see ``selection.plan_epoch``); the step's objective is
``sum(weight_i * row_loss_i)``:

- ``descend``: the row's mean NLL (fine-tuning; retain rows of GradDiff/NPO; the pull-back of an
  over-unlearned forget row towards the holdout level).
- ``ascend``: minus the row's mean NLL (gradient ascent: GA, SGA, GradDiff's forget side).
- ``npo``: Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868) on the forget
  row, against reference log-likelihoods computed once before training.
- ``kl``: KL(reference || model) on a row, averaged over its positions, against target
  log-probabilities computed once before training: the original model's on a retain row (KL), or
  UNDIAL's adjusted ones on a forget row (``undial_targets``).
- ``ascend_capped``: minus the row's NLL over the positions whose token NLL is still below a cap
  (``per_sequence_capped_nll``; the match method's forget rows below their target).
- ``match_profile``: the gap between a row's sorted token statistics and a target profile
  (``per_sequence_profile_gap``; match's ``tokens`` / ``tokens_z`` targets).
- ``kl_gap``: ``kl`` plus the squared gap between each true token's NLL and its NLL under the
  targets (``per_sequence_true_token_gap``; match's ``undial_z`` target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.mia import SIGMA_FLOOR
from ..core.passes import logprob_moments

IGNORE = -100
TERMS = ("descend", "ascend", "npo", "kl", "ascend_capped", "match_profile", "kl_gap")
TERM_CODE = {name: code for code, name in enumerate(TERMS)}


def _token_nll(logits: torch.Tensor, labels: torch.Tensor):
    """The positions that predict ``labels[:, 1:]``: their logits [B, T-1, V] (half precision
    upcast), targets [B, T-1], validity mask and token NLLs [B, T-1]."""
    logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    targets = labels[:, 1:]
    token_nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(targets)
    return logits, targets, targets != IGNORE, token_nll


def per_sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL of each row, and each row's teacher-forced accuracy (MA).

    ``logits`` [B, T, V] (any float dtype; half precision is upcast), ``labels`` [B, T] long: the
    input ids with IGNORE at padding; position j predicts ``labels[j+1]``. Returns two [B]
    tensors (NLL in the logits' upcast dtype, MA as float). Every sequence counts once, whatever
    its length (unlearning is judged per sequence).
    """
    logits, targets, valid, token_nll = _token_nll(logits, labels)
    counts = valid.sum(-1).clamp(min=1)
    nll = (token_nll * valid).sum(-1) / counts
    hits = ((logits.argmax(-1) == targets) & valid).sum(-1)
    return nll, hits.float().detach() / counts


def per_sequence_capped_nll(logits: torch.Tensor, labels: torch.Tensor, cap: float) -> torch.Tensor:
    """Each row's NLL summed over the positions whose token NLL is below ``cap`` (nats), divided
    by all its predicted positions.

    ``logits`` [B, T, V], ``labels`` [B, T] long (IGNORE at padding). Returns [B]. Ascending it
    raises a token's loss up to the cap and no further, so tokens already as unlikely as unseen
    text gets them are left where they are. Ascending the whole NLL instead pushes those furthest,
    since the gradient of -log p grows as p falls, until the row's worst tokens sit below
    anything unseen (what the Min-K%++ attack reads). ``cap`` = inf is the whole NLL."""
    _, _, valid, token_nll = _token_nll(logits, labels)
    below = (token_nll.detach() < cap) & valid
    return (token_nll * below).sum(-1) / valid.sum(-1).clamp(min=1)


def per_sequence_entropy_shortfall(logits: torch.Tensor, labels: torch.Tensor, floor: float) -> torch.Tensor:
    """How far each row's confidently wrong positions sit below an entropy floor: the sum over
    positions whose argmax is not the true token of ``max(0, floor - H_t)`` (nats; ``H_t`` the
    entropy of the next-token distribution), divided by the row's predicted positions.

    ``logits`` [B, T, V], ``labels`` [B, T] long (IGNORE at padding); returns [B]. Ascending a true
    token hands its mass to the runner-up, so an unlearned position ends peaked on a wrong token:
    there the Min-K%++ score (``(log p - mu) / sigma``, sigma near 0) of the true token is far
    below anything unseen text shows, which is what that attack reads. Subtracting this from the
    ascended NLL spreads such a position's mass until its entropy reaches what unseen text gets.
    ``floor`` = 0 gives zeros. Which positions count is decided without gradient."""
    logits, targets, valid, _ = _token_nll(logits, labels)
    logp = F.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    wrong = (logits.detach().argmax(-1) != targets) & valid
    shortfall = torch.where(wrong, (floor - entropy).clamp(min=0), torch.zeros_like(entropy))
    return shortfall.sum(-1) / valid.sum(-1).clamp(min=1)


def per_sequence_z_shortfall(
    logits: torch.Tensor, labels: torch.Tensor, floor: float, sigma_floor: float = 1e-2
) -> torch.Tensor:
    """How far each row's Min-K%++ token scores sit below a floor: the sum over positions of
    ``log(1 + max(0, floor - z_t))``, divided by the row's predicted positions.

    ``z_t = (log p(x_t) - mu_t) / sigma_t`` is Min-K%++'s token score (Zhang et al. 2024;
    ``token_surprise(.., "z")`` negated), with ``sigma_t`` floored at ``sigma_floor`` here: a
    near one-hot row's sigma cancels to noise in float32, and the floor bounds the gradient.
    ``logits`` [B, T, V], ``labels`` [B, T] long (IGNORE at padding); ``floor`` a z value (unitless,
    e.g. a low quantile of unseen text's token scores); returns [B]. The attack averages a
    record's lowest scores, and unlearning by ascent leaves a few forget tokens orders of magnitude
    below anything unseen (confidently wrong positions). The logarithm keeps one such token from
    outweighing the rest: its pull is ``1 / (1 + floor - z)`` per unit of z."""
    logits, _, valid, token_nll = _token_nll(logits, labels)
    logprobs = F.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    # The variance as E[(log p - mu)^2], floored before the square root: a flat or one-hot row has
    # variance 0, where the root's gradient is infinite (and NaN through any later floor).
    variance = (probs * (logprobs - mu.unsqueeze(-1)).square()).sum(-1)
    z = -(token_nll + mu) / variance.clamp(min=sigma_floor**2).sqrt()
    shortfall = torch.log1p((floor - z).clamp(min=0))
    return (shortfall * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def token_surprise(logits: torch.Tensor, labels: torch.Tensor, statistic: str = "nll"):
    """Per predicted position, how unlikely the true token is, as a membership attack reads it.
    ``nll``: -log p(x_t) (nats; the loss attack's token term). ``z``: minus Min-K%++'s token score
    (Zhang et al. 2024), ``-(log p(x_t) - mu_t) / sigma_t`` with mu_t, sigma_t the mean and
    standard deviation of log p(.) under the model's own next-token distribution
    (``passes.logprob_moments``; sigma floored at ``mia.SIGMA_FLOOR``): high where the true token
    is unlikely for how peaked the distribution is. ``logits`` [B, T, V], ``labels`` [B, T].
    Returns (validity mask, statistic), both [B, T-1]; differentiable in the logits."""
    logits, targets, valid, token_nll = _token_nll(logits, labels)
    if statistic == "nll":
        return valid, token_nll
    if statistic != "z":
        raise ValueError(f"unknown token statistic {statistic!r}")
    logprobs = F.log_softmax(logits, dim=-1)
    mu, sigma = logprob_moments(logprobs)
    return valid, (token_nll + mu) / sigma.clamp(min=SIGMA_FLOOR)


def per_sequence_profile_gap(
    logits: torch.Tensor, labels: torch.Tensor, profile: torch.Tensor, statistic: str = "nll"
) -> torch.Tensor:
    """Half the mean squared gap between each row's sorted token statistics (``token_surprise``:
    NLL, or Min-K%++'s negated z) and a target profile.

    ``logits`` [B, T, V], ``labels`` [B, T] long (IGNORE at padding and prompts); ``profile``
    [B, T-1] float: per row, its ``n`` predicted positions' targets ascending in the first ``n``
    entries (``selection.profile_targets``), anything after. Returns [B]:
    ``0.5 * mean_j (sort(s)_j - profile_j)^2`` over the row's positions. Its gradient raises each
    token below its place in the profile and lowers each above it, matched by rank: the row ends
    with the profile's share of unlikely tokens (what MA, Min-K% and Min-K%++ read) and its mean
    (what the loss attack reads), whichever tokens carry them."""
    valid, token_nll = token_surprise(logits, labels, statistic)
    n = valid.sum(-1)
    ordered = torch.sort(token_nll.masked_fill(~valid, float("inf")), dim=-1).values  # predicted positions first
    first = torch.arange(ordered.shape[-1], device=ordered.device) < n.unsqueeze(-1)
    gap = torch.where(first, ordered - profile.to(ordered.device, ordered.dtype), torch.zeros_like(ordered))
    return 0.5 * (gap**2).sum(-1) / n.clamp(min=1)


def predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """[B] number of predicted (non-padding) positions of each row: what turns a mean NLL into a
    sequence log-likelihood, ``log pi(y) = -nll * count``."""
    return (labels[:, 1:] != IGNORE).sum(-1)


def npo_loss(seq_logp: torch.Tensor, ref_seq_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, eq. 3) per sequence: ``(2/beta) log(1 + (pi_theta(y)/pi_ref(y))^beta)``.

    ``seq_logp``, ``ref_seq_logp``: [B] sequence log-likelihoods (sums over predicted tokens,
    nats). Written as ``(2/beta) softplus(beta * (logp - ref))`` so a large ratio cannot
    overflow. Equals ``(2/beta) ln 2`` where the model still agrees with the reference; its
    gradient is GA's, scaled by ``2 sigmoid(beta * log ratio)``, which fades as the sequence's
    likelihood falls below the reference's (NPO's answer to GA's collapse)."""
    return (2.0 / beta) * F.softplus(beta * (seq_logp - ref_seq_logp.to(seq_logp.dtype)))


def per_sequence_kl(logits: torch.Tensor, ref_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) of each row, summed over the vocabulary and averaged over the row's
    predicted positions (the retain term of open-unlearning's GradDiff-KL, per sequence).

    ``logits`` [B, T, V]; ``ref_logprobs`` [B, T-1, V] (the reference's log-softmax at the
    positions that predict ``labels[:, 1:]``; padding positions may hold anything);
    ``labels`` [B, T]. Returns [B]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ref = ref_logprobs.to(logp.device, torch.float32)
    token_kl = (ref.exp() * (ref - logp)).sum(-1)  # [B, T-1]
    valid = labels[:, 1:] != IGNORE
    return (token_kl * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def per_sequence_true_token_gap(logits: torch.Tensor, ref_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Half the mean squared gap between each true token's NLL under the model and under the
    targets ``ref_logprobs``, over a row's predicted positions (nats^2).

    ``logits`` [B, T, V]; ``ref_logprobs`` [B, T-1, V] (target log-softmax at the positions that
    predict ``labels[:, 1:]``); ``labels`` [B, T] (IGNORE at padding). Returns [B]. Beside
    ``per_sequence_kl`` toward the same targets: KL's pull on a true token's logit is the
    probability gap ``p - q``, which fades as ``p`` falls, so distillation alone leaves a token
    targeted at ``e^-5`` far above it (UNDIAL's records stay member-like); this term's pull is the
    gap in log-probability, which does not fade."""
    _, targets, valid, token_nll = _token_nll(logits, labels)
    ref = ref_logprobs.to(token_nll.device, token_nll.dtype)
    target_nll = -ref.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    gap = torch.where(valid, token_nll - target_nll, torch.zeros_like(token_nll))
    return 0.5 * gap.square().sum(-1) / valid.sum(-1).clamp(min=1)


def undial_targets(logprobs: torch.Tensor, tokens: torch.Tensor, gamma: float) -> torch.Tensor:
    """UNDIAL's distillation targets (Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted
    Logits for Robust Unlearning"): the original model's next-token distribution with the true
    token's logit lowered by ``gamma``, renormalised.

    ``logprobs`` [T-1, V] float: the original model's log-softmax at the positions predicting
    ``tokens`` [T-1] long (a sequence's ids from position 1). Returns [T-1, V] log-probabilities in
    ``logprobs``' dtype. Log-softmax is shift-invariant, so lowering the logit equals lowering the
    log-probability before renormalising. Every other token keeps its relative probability, so a
    forget sequence is drawn toward what the model would predict if it had not seen that token,
    never below it (the true token's new probability is p e^-gamma / (1 - p + p e^-gamma))."""
    adjusted = logprobs.clone()
    adjusted[torch.arange(tokens.shape[0]), tokens] -= gamma
    return torch.log_softmax(adjusted, dim=-1)


def lowered_logit_z(logprobs: torch.Tensor, tokens: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Min-K%++'s token score (Zhang et al. 2024) of each true token once its logit is lowered by
    ``gamma``: ``(log q(x_t) - mu_t) / sigma_t`` under ``q = undial_targets(logprobs, tokens, gamma)``
    (sigma floored at ``mia.SIGMA_FLOOR``), in closed form from the unlowered moments, so a search
    over ``gamma`` never rebuilds the [T-1, V] distribution.

    ``logprobs`` [T-1, V] float (a log-softmax), ``tokens`` [T-1] long, ``gamma`` [T-1] float
    (nats, >= 0). Returns float64 [T-1]. Lowering the logit moves only the true token's mass: with
    ``p`` its probability and ``e = p exp(-gamma)``, every other log-probability shifts by
    ``-log(1 - p + e)``, so the new mean and variance follow from the others' first two moments."""
    logprobs = logprobs.double()
    gamma = gamma.to(logprobs)
    positions = torch.arange(tokens.shape[0])
    true = logprobs[positions, tokens]
    others = torch.ones_like(logprobs, dtype=torch.bool)
    others[positions, tokens] = False
    mass = torch.where(others, logprobs.exp(), torch.zeros_like(logprobs))
    rest = mass.sum(-1)  # their mass (not 1 - p: that rounds to 0 where p is close to 1)
    weights = mass / rest.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(-1)
    values = torch.where(others, logprobs, torch.zeros_like(logprobs))
    others_mean = (weights * values).sum(-1)
    others_var = (weights * (values - others_mean.unsqueeze(-1)).square()).sum(-1)
    # q is a two-part mixture: the others (mass rest / norm, their moments unchanged up to a common
    # shift, which cancels in the score) and the true token (mass e / norm, value true - gamma).
    e = torch.exp(true - gamma)
    norm = rest + e
    gap = (true - gamma) - others_mean
    var = (rest * others_var + rest * e * gap.square() / norm) / norm
    return (rest * gap / norm) / var.sqrt().clamp(min=SIGMA_FLOOR)


def z_matched_gamma(
    logprobs: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor, max_gamma: float = 60.0, steps: int = 48
) -> torch.Tensor:
    """Per position, how far to lower the true token's logit (UNDIAL's ``gamma``, nats) for its
    Min-K%++ token score (``lowered_logit_z``) to fall to ``target``: 0 where it is already at or
    below it (no token is made more likely), ``max_gamma`` where even that leaves it above.

    ``logprobs`` [T-1, V], ``tokens`` [T-1] long, ``target`` [T-1] float (scores, as Min-K%++'s
    ``(log p - mu) / sigma``). Bisection over [0, max_gamma] (``steps`` halvings; the score falls
    as gamma grows). Returns float64 [T-1]. The match method's ``undial_z`` target: a forget
    row's token scores end where its rank-matched non-member's sit, so Min-K%++ reads it as it reads
    unseen text, while every other token keeps its relative probability (UNDIAL's property)."""
    target = target.double()
    low = torch.zeros_like(target)
    high = torch.full_like(target, max_gamma)
    for _ in range(steps):
        mid = (low + high) / 2
        above = lowered_logit_z(logprobs, tokens, mid) > target
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    unchanged = lowered_logit_z(logprobs, tokens, torch.zeros_like(target)) <= target
    return torch.where(unchanged, torch.zeros_like(target), high)


def on_rows(fn, index: torch.Tensor, size: int, *batch: torch.Tensor, **kwargs) -> torch.Tensor:
    """``fn``'s per-row values computed on the rows ``index`` of a batch only, placed back at
    those rows of a [``size``] vector (zeros elsewhere, no gradient there).

    ``fn`` maps [k, ...] tensors to [k]; ``index`` [k] long row positions on the batch tensors'
    device; each of ``batch`` is [size, ...] and is cut to those rows (``kwargs`` pass through
    whole). A term that only some rows of a step take (KL toward a reference, the capped ascent
    and its floors) then costs its [k, T, V] tensors, not [B, T, V]: the same values at those
    rows, since every such term is computed row by row, with less memory and time."""
    values = fn(*(t.index_select(0, index) for t in batch), **kwargs)
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_copy(0, index, values)


def row_losses(
    terms: torch.Tensor,
    nll: torch.Tensor,
    npo: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    capped: torch.Tensor | None = None,
    profile: torch.Tensor | None = None,
    kl_gap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's loss by its term code (``TERM_CODE``): ``nll`` for descend, ``-nll`` for ascend,
    ``npo`` / ``kl`` / ``-capped`` for ascend_capped / ``profile`` for match_profile / ``kl_gap`` (each [B],
    needed only when some row has that term). All [B]."""
    out = torch.where(terms == TERM_CODE["ascend"], -nll, nll)
    negated = None if capped is None else -capped
    for name, values in (
        ("npo", npo),
        ("kl", kl),
        ("ascend_capped", negated),
        ("match_profile", profile),
        ("kl_gap", kl_gap),
    ):
        rows = terms == TERM_CODE[name]
        if bool(rows.any()):
            if values is None:
                raise ValueError(f"a row has term {name!r} but no {name} values were given")
            out = torch.where(rows, values.to(out.dtype), out)
    return out


def weighted_objective(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weights * losses)`` over rows. The weights (see ``selection.plan_epoch``) already
    hold the normalization over ranks and micro-batches; a filler row has weight 0."""
    return (weights.to(losses.dtype) * losses).sum()


def negated_task_vector(current: torch.Tensor, base: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``base - coefficient * (current - base)``: subtract what fine-tuning on the forget set added."""
    return base - coefficient * (current - base)
