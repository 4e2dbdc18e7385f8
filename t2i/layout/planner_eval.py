"""Does a planned layout obey its prompt? The judge's own check (`t2i.eval.shapes_judge.check` on the
claims of `t2i.data.shapes.prompts.parse_prompt`), applied to the plan's boxes instead of an image's
detections: counts exact where the prompt counts, every mentioned kind present, regions and relations
by the world's rules, plus boxes inside the canvas and apart. For tests and reports only: nothing at
generation time reads the judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from t2i.data.shapes.phrasings import uses_heldout_phrasing
from t2i.data.shapes.prompts import family_of, parse_prompt
from t2i.eval.shapes_judge import Detection, Verdict, accuracy_by_family, check, size_word
from t2i.layout.planner import LayoutPlanner, Plan


def plan_detections(plan: Plan) -> list[Detection]:
    """The plan's objects as the judge would detect them if drawn exactly (size read from the box side,
    as the judge reads it from pixels)."""
    return [Detection(o.colour, o.shape, size_word(o.s), tuple(float(v) for v in o.box), o.centre, o.s * o.s, 1.0)
            for o in plan.objects]


def check_plan(prompt: str, plan: Plan) -> Verdict:
    """The judge's verdict on a plan; a plan invalid on geometry fails whatever it holds."""
    verdict = check(parse_prompt(prompt), plan.background, plan_detections(plan))
    if not plan.valid:
        verdict = Verdict(ok=False, reasons=[*verdict.reasons, "boxes outside the canvas or closer than MIN_GAP"])
    return verdict


def evaluate_planner(planner: LayoutPlanner, prompts: Sequence[str], families: Sequence[str] | None = None,
                     seed: int = 0, temperature: float = 1.0, batch_size: int = 100,
                     text_encoder: torch.nn.Module | None = None) -> dict:
    """Plan one layout per prompt (seeded) and judge it. Returns {"overall", "accuracy": {family: acc},
    "count": {family: n}, "valid": share valid on geometry, "failures": [(prompt, reasons)...]}; the
    prompts written with a held-out phrasing are also scored as the family 'unseen phrasing'."""
    families = list(families) if families is not None else [family_of(p) for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    plans: list[Plan] = []
    for i in range(0, len(prompts), batch_size):
        plans += planner.plan(list(prompts[i:i + batch_size]), generator=gen, temperature=temperature,
                              text_encoder=text_encoder)
    verdicts = [check_plan(p, plan) for p, plan in zip(prompts, plans, strict=True)]
    oks = [v.ok for v in verdicts]
    overall, acc, cnt = accuracy_by_family(families, oks)
    unseen = [ok for p, ok in zip(prompts, oks, strict=True) if uses_heldout_phrasing(p)]
    if unseen:
        acc["unseen phrasing"], cnt["unseen phrasing"] = sum(unseen) / len(unseen), len(unseen)
    return {"overall": overall, "accuracy": acc, "count": cnt, "valid": sum(p.valid for p in plans) / len(plans),
            "failures": [(p, v.reasons) for p, v in zip(prompts, verdicts, strict=True) if not v.ok]}
