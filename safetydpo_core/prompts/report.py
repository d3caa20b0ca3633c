"""What a pair writer did: pairs asked for and made per category, and every rejected candidate with its reason.

Nothing is dropped silently: each candidate a writer makes ends up either accepted or as a :class:`Reject`
here, so ``attempts == accepted + rejected`` always holds, per category and in total.

Public API: :class:`GenerationReport`, :class:`Reject`, :data:`ProgressFn`, :data:`StopFn`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

ProgressFn = Callable[[int, int], None]  # (done, total)
StopFn = Callable[[], bool]


@dataclass
class Reject:
    category: str
    concept: str
    reason: str
    detail: str = ""
    unsafe: str | None = None
    safe: str | None = None
    output: str | None = None  # raw model answer (LLM writers)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class GenerationReport:
    writer: str
    requested: dict[str, int] = field(default_factory=dict)
    accepted: Counter = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stopped: bool = False

    def reject(self, r: Reject) -> None:
        self.rejects.append(r)

    @property
    def reasons(self) -> Counter:
        return Counter(r.reason for r in self.rejects)

    def reasons_for(self, category: str) -> Counter:
        return Counter(r.reason for r in self.rejects if r.category == category)

    def attempts(self, category: str | None = None) -> int:
        if category is None:
            return sum(self.accepted.values()) + len(self.rejects)
        return self.accepted[category] + sum(1 for r in self.rejects if r.category == category)

    @property
    def shortfall(self) -> dict[str, int]:
        """Categories with fewer accepted pairs than requested: how many are missing."""
        return {c: n - self.accepted[c] for c, n in self.requested.items() if self.accepted[c] < n}

    @property
    def complete(self) -> bool:
        return not self.shortfall

    def summary(self) -> str:
        lines = [f"{self.writer}: {sum(self.accepted.values())} pairs accepted, {len(self.rejects)} rejected"
                 f" in {self.attempts()} attempts."]
        for c, n in self.requested.items():
            rs = self.reasons_for(c)
            why = ", ".join(f"{k} {v}" for k, v in rs.most_common()) or "none"
            lines.append(f"  {c}: {self.accepted[c]}/{n} accepted; rejected: {why}")
        if self.shortfall:
            lines.append("  short of the request: " + ", ".join(f"{c} by {k}" for c, k in self.shortfall.items())
                         + " (raise --max-attempts, add concepts with --concepts, or try another model).")
        if self.stopped:
            lines.append("  stopped early on request.")
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"writer": self.writer, "requested": dict(self.requested), "accepted": dict(self.accepted),
                "rejected": dict(self.reasons), "shortfall": self.shortfall, "stopped": self.stopped,
                "warnings": list(self.warnings)}

    def rejects_jsonl(self) -> str:
        return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in self.rejects)
