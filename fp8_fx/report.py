"""One record per linear op the backend saw, and the table users read."""
from __future__ import annotations

import dataclasses
from typing import Iterator, List, Literal

Action = Literal["scaled_mm", "weight_only", "emulate", "skipped"]


@dataclasses.dataclass(frozen=True)
class LinearDecision:
    qualname: str  # normalized module path, "" for a bare F.linear outside any module
    action: Action
    reason: str
    in_features: int
    out_features: int

    @property
    def converted(self) -> bool:
        return self.action != "skipped"


class Report:
    """The decisions of every graph compiled by one backend, in graph order."""

    def __init__(self) -> None:
        self._graphs: List[List[LinearDecision]] = []

    def add_graph(self, decisions: List[LinearDecision]) -> None:
        self._graphs.append(list(decisions))

    @property
    def records(self) -> List[LinearDecision]:
        """One record per linear op. A recompiled graph (new shapes, a second model
        instance) repeats its linears; keep the latest record of each (qualname, n-th call)."""
        latest = {}
        for decisions in self._graphs:
            seen: dict = {}
            for d in decisions:
                nth = seen[d.qualname] = seen.get(d.qualname, -1) + 1
                latest[(d.qualname, nth)] = d
        return list(latest.values())

    def __iter__(self) -> Iterator[LinearDecision]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> LinearDecision:
        return self.records[i]

    def by_action(self, action: str) -> List[LinearDecision]:
        return [d for d in self.records if d.action == action]

    def __str__(self) -> str:
        return format_table(self.records)

    def __repr__(self) -> str:
        return f"<fp8_fx Report: {len(self)} linears>\n{self}"


def format_table(decisions: List[LinearDecision]) -> str:
    header = ("qualname", "action", "in", "out", "reason")
    rows = [(d.qualname or "<no module>", d.action, str(d.in_features), str(d.out_features),
             d.reason) for d in decisions]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
             for r in [header, *rows]]
    counts = {}
    for d in decisions:
        counts[d.action] = counts.get(d.action, 0) + 1
    summary = ", ".join(f"{n} {a}" for a, n in counts.items()) or "no linear ops seen"
    return "\n".join([*(line.rstrip() for line in lines), f"({len(decisions)} linears: {summary})"])
