"""Every unlearning method, declared once: what it trains on, its loss terms, its default stop
rule, the settings it reads, and whether it edits weights with a task vector.

The config validates against these entries, the trainer builds each row's loss from them, the
report lists the settings they name and the demo labels them. Adding a method is one entry here
plus its loss term in ``losses.py`` (when it needs a term beyond ``descend`` / ``ascend`` /
``npo`` / ``kl``).

Loss terms (``losses.TERMS``), per row:
    descend  the mean token NLL (fine-tuning; retain rows of GradDiff / NPO; pulled-back rows).
    ascend   minus the mean token NLL (gradient ascent).
    npo      NPO's (2/beta) log(1 + (pi_theta / pi_ref)^beta) against the input model's sequence
             log-likelihood (Zhang et al. 2024).
    ascend_capped  minus the NLL of the tokens still below match_token_quantile of the non-members'
             token NLLs (match's rows below their target).
    kl       KL(target || model) per token toward log-probabilities computed once from the input
             model: its own (retain rows of ``kl``), or with the true token's logit lowered by
             ``undial_gamma`` (forget rows of ``undial``; Dong et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One unlearning method.

    Attributes:
        name: the ``--method`` value.
        label: how reports and the demo name it.
        paper: where its definition comes from.
        forget_term: the loss term of a forget row under ascent (``descend`` never: pulled-back
            rows descend whatever the method).
        retain_term: the loss term of a retain row, or None when the method never reads the
            retain set for training.
        needs_retain: whether the method cannot run without ``--retain`` (GradDiff, KL; NPO
            uses a retain set when one is given).
        selects: whether the ascent trains on a selection (``sga_gamma`` / ``select_on`` under
            the per-sequence and mean rules) instead of every memorized row.
        task_vector: (tv_coefficient, tv_switch_ma) defaults for task-vector methods: ascend,
            then fine-tune from theta_base and subtract the coefficient times the task vector
            (Ilharco et al. 2023; TA/TAU of Barbulescu & Triantafillou 2024); None otherwise.
        stop_rule: the default ``--stop_rule``.
        settings: the config fields only this method (and others listing them) reads; a
            non-default value of one under another method is an error.
        loss: the functions of ``losses.py`` that compute its terms, as ``name`` or
            ``name1 + name2`` (forget term first).
        matches: whether the forget rows are driven to rank-matched target losses
            (``selection.rank_matched_targets``) of non-members (``match_holdout``) as the input
            model scores them, ascending or descending by their distance, instead of ascending
            whatever is memorized; those non-members train beside them with KL to the input
            model's distributions (``match_weight``), so what the model knows of text like the
            forget set stays.
        reference: which rows need values from the input model, computed once before training:
            ``"forget_logp"`` (NPO's sequence log-likelihoods), ``"retain_logprobs"`` (KL's
            token distributions on retain rows), ``"forget_logprobs"`` (UNDIAL's adjusted
            distributions on forget rows), or None.
    """

    name: str
    label: str
    paper: str
    forget_term: str = "ascend"
    retain_term: str | None = None
    needs_retain: bool = False
    selects: bool = False
    task_vector: tuple[float, float] | None = None
    stop_rule: str = "band"
    settings: tuple[str, ...] = ()
    loss: str = "per_sequence_nll"
    matches: bool = False
    reference: str | None = None

    @property
    def uses_retain_set(self) -> bool:
        """Whether retain rows take a loss term (when a retain set is given)."""
        return self.retain_term is not None


_SELECTION = ("sga_gamma", "select_on")
_TASK_VECTOR = ("tv_coefficient", "tv_switch_ma")

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "ga",
            "GA",
            "Jang et al. 2023, gradient ascent on every forget sequence",
            stop_rule="per_sequence",
        ),
        Method(
            "sga",
            "SGA",
            "Barbulescu & Triantafillou 2024, Selective Gradient Ascent",
            selects=True,
            settings=_SELECTION,
        ),
        Method(
            "ta",
            "TA",
            "Ilharco et al. 2023, task arithmetic: subtract the forget set's fine-tuning task vector",
            task_vector=(3.0, 0.9),
            stop_rule="per_sequence",
            settings=_TASK_VECTOR,
        ),
        Method(
            "tau",
            "TAU",
            "Barbulescu & Triantafillou 2024, task arithmetic for unlearning (SGA ascent, then TA)",
            selects=True,
            task_vector=(1.0, 0.5),
            stop_rule="per_sequence",
            settings=(*_SELECTION, *_TASK_VECTOR),
        ),
        Method(
            "graddiff",
            "GradDiff",
            "Maini et al. 2024 (TOFU), gradient difference: ascent on forget + descent on retain",
            retain_term="descend",
            needs_retain=True,
            settings=("retain_weight",),
        ),
        Method(
            "npo",
            "NPO",
            "Zhang et al. 2024, Negative Preference Optimization (+ descent on retain when given)",
            forget_term="npo",
            retain_term="descend",
            settings=("npo_beta", "retain_weight"),
            loss="npo_loss + per_sequence_nll",
            reference="forget_logp",
        ),
        Method(
            "kl",
            "GA+KL",
            "Maini et al. 2024 (TOFU), KL minimisation: ascent on forget + KL to the input model on retain",
            retain_term="kl",
            needs_retain=True,
            settings=("retain_weight",),
            loss="per_sequence_nll + per_sequence_kl",
            reference="retain_logprobs",
        ),
        Method(
            "undial",
            "UNDIAL",
            "Dong et al. 2024, self-distillation toward the input model with the true token's logit lowered",
            forget_term="kl",
            settings=("undial_gamma",),
            loss="per_sequence_kl + undial_targets",
            reference="forget_logprobs",
        ),
        Method(
            "match",
            "Match",
            "ds_unlearn: each forget row's loss driven to the loss a never-seen row of its rank gets under the "
            "input model (a retrained model's distribution), those non-members kept at the input model's "
            "distributions by KL, + descent on retain (or KL: match_retain) when given",
            forget_term="ascend_capped",
            retain_term="descend",
            stop_rule="match",
            settings=(
                "retain_weight",
                "match_holdout",
                "match_margin",
                "match_weight",
                "match_token_quantile",
                "match_entropy_quantile",
                "match_z_quantile",
                "match_target",
                "match_judge",
                "match_targets_under",
                "match_retain",
            ),
            loss="per_sequence_capped_nll + per_sequence_kl",
            matches=True,
        ),
    )
}


def method_help() -> str:
    """The ``--method`` help: every method's name and what it is, from the declarations."""
    return "; ".join(f"{m.name} ({m.label}: {m.paper})" for m in METHODS.values()) + "."


def methods_reading(setting: str) -> tuple[str, ...]:
    """The names of the methods that read ``setting`` (a config field name)."""
    return tuple(m.name for m in METHODS.values() if setting in m.settings)


# Config fields some method reads; under any method not listing one, a non-default value is an error.
METHOD_SETTINGS: tuple[str, ...] = tuple(dict.fromkeys(s for m in METHODS.values() for s in m.settings))
