"""MedQuAD's question types, and a type for questions that come without one, read from the question's own pattern.

MedQuAD types every question from its templates ("What are the symptoms of X ?" is `symptoms`). The added
datasets either have no type or their own vocabulary (MedicationQA's "Side effects"); a type that matches a
MedQuAD name (case aside) is kept, anything else is inferred here, so per-qtype strata and tables stay comparable.
"""

from __future__ import annotations

import re

# The 39 qtypes of MedQuAD's 12 collections (reports/prepare.json per_qtype).
MEDQUAD_QTYPES = (
    "brand names", "brand names of combination products", "causes", "complications", "considerations",
    "contraindication", "dietary", "dose", "emergency or overdose", "exams and tests", "forget a dose", "frequency",
    "genetic changes", "how can i learn more", "how does it work", "how effective is it", "important warning",
    "indication", "information", "inheritance", "interactions with foods", "interactions with herbs and supplements",
    "interactions with medications", "other information", "outlook", "precautions", "prevention", "research",
    "severe reaction", "side effects", "stages", "storage and disposal", "support groups", "susceptibility",
    "symptoms", "treatment", "usage", "when to contact a medical professional", "why get vaccinated",
)
FALLBACK_QTYPE = "other"

# First match wins, so specific patterns come before general ones ("side effects of the treatment" is about side
# effects; "What is X?" is `information` only when nothing more specific matched).
_PATTERNS = (
    ("side effects", r"\bside[- ]effects?\b|\badverse (effects?|reactions?)\b"),
    ("emergency or overdose", r"\boverdos"),
    ("forget a dose", r"\b(forget|forgot|missed?)\b.*\bdose\b"),
    ("interactions with foods", r"\b(food|foods|alcohol|grapefruit|coffee|eat|drink)\b.*\b(with|and|while)\b"
                                r".*\b(take|taking|on)\b|\b(take|taking)\b.*\bwith (food|alcohol|milk)\b"),
    ("interactions with medications",
     r"\binteract|\b(can|should) i take\b.*\bwith\b"
     r"|\b(take|taking|mix|combine)\b.*\b(with|and)\b.*\b(drug|medicine|medication|pill)s?\b"),
    ("storage and disposal", r"\b(store|storage|dispose|disposal|expire[ds]?|expiration)\b"),
    ("dose", r"\b(dose|doses|dosage|dosing|mg|milligrams?)\b|\bhow (much|many|often)\b.*\b(take|use)\b"),
    ("contraindication", r"\b(contraindicat|should not (take|use)|who should not)"),
    ("when to contact a medical professional",
     r"\b(seek|get|need) (urgent |emergency )?medical (care|help|attention)\b"
     r"|\bwhen (to|should i) (call|see|contact) (a|the|my) (doctor|provider)\b"),
    ("how does it work", r"\bhow does\b.*\bwork\b|\bhow it works\b|\bmechanism\b|\bwhat does\b.*\bdo\b"),
    ("usage", r"\bhow (do|should|can) (i|you) (take|use)\b|\bwhen (do|should) (i|you) take\b"
              r"|\bhow to (take|use|stop)\b"),
    ("indication", r"\b(used|prescribed|given) (for|to treat)\b"),
    ("symptoms", r"\bsymptoms?\b|\bsigns? (of|and)\b"),
    ("causes", r"\bcaus(e|es|ed|ing)\b|\bwhy do(es)? (i|you|people|someone) (get|have|develop)\b"),
    ("exams and tests", r"\bdiagnos|\btests?\b|\bexams?\b|\bscreen(ing)?\b"),
    ("prevention", r"\bprevent"),
    ("complications", r"\bcomplications?\b"),
    ("outlook", r"\boutlook\b|\bprognosis\b|\blife expectancy\b|\bwhat to expect\b|\bsurvival\b"),
    ("susceptibility", r"\bat risk\b|\brisk factors?\b|\bwho (gets|is likely)\b"),
    ("inheritance", r"\binherit|\bpassed down\b|\bhereditary\b"),
    ("genetic changes", r"\bgenetic changes?\b|\bgenes?\b|\bmutations?\b"),
    ("frequency", r"\bhow (common|many people|rare|frequent)\b"),
    ("stages", r"\bstages?\b"),
    ("research", r"\bresearch\b|\bclinical trials?\b"),
    ("support groups", r"\bsupport groups?\b"),
    ("treatment", r"\btreat(s|ed|ing|ment|ments)?\b|\btherap(y|ies)\b|\bcured?\b|\bmanage(ment)?\b"),
    ("information", r"^\s*(what|who) (is|are)\b|\bwhat is \(are\)|\binformation\b|\btell me about\b"),
)
_COMPILED = tuple((qtype, re.compile(pattern, re.IGNORECASE)) for qtype, pattern in _PATTERNS)
# Another dataset's name for a MedQuAD type (MedicationQA's "Question Type"); anything else is read from the question.
ALIASES = {"interaction": "interactions with medications", "overdose": "emergency or overdose",
           "action": "how does it work"}
_CANONICAL = {**ALIASES, **{q.casefold(): q for q in MEDQUAD_QTYPES}}


def canonical_qtype(value: str) -> str | None:
    """The MedQuAD qtype this value names (case and spacing aside, or through ALIASES), or None."""
    return _CANONICAL.get(" ".join((value or "").split()).casefold())


def infer_qtype(question: str) -> str:
    """The MedQuAD qtype the question's wording asks for, or `other`."""
    for qtype, pattern in _COMPILED:
        if pattern.search(question):
            return qtype
    return FALLBACK_QTYPE


def assign_qtypes(records: list[dict]) -> tuple[list[dict], list[bool]]:
    """New records whose qtype is a MedQuAD name: kept when it already is one, else inferred from the question.

    Returns (records, whether each one was typed from its pattern); the input is not modified.
    """
    out, from_pattern = [], []
    for record in records:
        qtype = canonical_qtype(record.get("qtype", ""))
        from_pattern.append(qtype is None)
        out.append({**record, "qtype": qtype or infer_qtype(record["question"])})
    return out, from_pattern
