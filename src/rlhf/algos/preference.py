"""The implicit preference accuracy of a policy on held-out preference pairs (issue 15).

DPO reads a reward off any policy and its reference: ``r(x, y) = beta log pi(y|x) / pi_ref(y|x)``
(Rafailov et al. 2023, eq. 5; seed 002 Part 6). On held-out pairs, the fraction where the
chosen reply gets the higher implicit reward says whether the policy's drift from the
reference goes towards what people preferred. The online recipes log it as an
over-optimisation signal that needs no gold labeller: a policy that games its reward model
drifts away from the chosen replies, and the accuracy falls.
"""

from __future__ import annotations

import torch


def implicit_preference_accuracy(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                                 ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of pairs whose chosen reply has the higher implicit reward, and the mean margin.

    ``margin_i = (log pi(chosen_i) - log pi_ref(chosen_i)) - (log pi(rejected_i) - log pi_ref(rejected_i))``,
    each log-prob summed over the reply's tokens. DPO's reward is ``beta`` times the log-ratio,
    and any ``beta > 0`` leaves the sign of the margin as it is, so none is taken. A tie
    (margin exactly 0) counts half: at step 0 the policy is its reference, every margin is 0
    and the accuracy is 0.5, chance, not 0 (DPO's ``rewards/accuracies`` counts ties as wrong).

    Shape:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: (N,) -> two scalars
        ``(accuracy, margin)``.
    """
    margins = (chosen_logps.float() - ref_chosen_logps.float()) - (rejected_logps.float() - ref_rejected_logps.float())
    accuracy = ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()
    return accuracy.detach(), margins.mean().detach()
