"""The ChestX-ray14 findings (Wang et al. 2017) and label parsing shared by every room."""
from __future__ import annotations

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"


def parse_finding_labels(text: str, source: str = "") -> list[int]:
    """'Cardiomegaly|Effusion' -> a 0/1 vector over FINDINGS ('No Finding' -> all zeros). 'No Finding'
    beside a finding is refused: read as the findings alone, it would say nothing of the contradiction."""
    vec = [0] * len(FINDINGS)
    names = [t.strip() for t in str(text).split("|")]
    if NO_FINDING in names and any(n and n != NO_FINDING for n in names):
        raise ValueError(f"Finding Labels {str(text).strip()!r} has '{NO_FINDING}' together with findings; keep one "
                         f"or the other")
    for name in names:
        if not name or name == NO_FINDING:
            continue
        if name not in FINDINGS:
            where = f" in {source}" if source else ""
            raise ValueError(f"unknown finding {name!r}{where}; known: {', '.join(FINDINGS)}, {NO_FINDING}")
        vec[FINDINGS.index(name)] = 1
    return vec


def format_finding_labels(vec) -> str:
    names = [f for f, v in zip(FINDINGS, vec) if int(v)]
    return "|".join(names) if names else NO_FINDING
