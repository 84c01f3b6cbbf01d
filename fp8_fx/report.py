"""One record per linear op (and per attention call) per compiled graph, and the tables
users read.

Records are never merged across graphs: under regional compilation of a model with two
kinds of blocks, or with two models on one backend (Wan 2.2's experts), graphs hold
different layers under the same names. Each record says which graph it belongs to: the
backend's running graph number, Dynamo's compile id, the class Dynamo traced (the model,
or the block under regional compilation) and the backend's `name`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Literal, Optional, Sequence

Action = Literal["scaled_mm", "weight_only", "emulate", "skipped"]


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    index: int  # the backend's n-th graph, from 0
    compile_id: str  # Dynamo's, e.g. "0/1" (frame 0, its second compile: a recompile)
    root: str  # the module class Dynamo traced ("" if none)
    model: str = ""  # the backend's name, if given (make_fp8_backend(name=...))
    preset: str = ""  # the target preset the graph was matched against ("": the config's own targets)
    preset_why: str = ""  # "from FluxTransformer2DModel", "FP8Config(preset='flux')" or the fallback's reason

    def __str__(self) -> str:
        name = f"{self.model}: " if self.model else ""
        return f"graph {self.index} ({name}{self.root or 'no module'}, compile {self.compile_id})"

    @property
    def preset_line(self) -> str:
        """The line above the graph's table that names its preset. Empty for the Wan preset:
        fp8_fx's only targets before presets, its tables read as they always did (the
        fallback to it warns when it happens)."""
        if not self.preset or self.preset == "wan":
            return ""
        return f"preset: {self.preset} ({self.preset_why})" if self.preset_why else f"preset: {self.preset}"


@dataclasses.dataclass(frozen=True)
class LinearDecision:
    qualname: str  # normalized module path, "" for a bare F.linear outside any module
    action: Action
    reason: str
    in_features: int
    out_features: int
    graph: Optional[GraphInfo] = None  # None for records made outside a backend (convert_to_fp8)

    @property
    def converted(self) -> bool:
        return self.action != "skipped"


@dataclasses.dataclass(frozen=True)
class AttentionDecision:
    qualname: str  # the attention module's path ("blocks.0.attn1"), "" outside any module
    action: Literal["cudnn", "triton", "emulate", "skipped"]  # the kernel, or skipped
    reason: str
    recipe: str
    graph: Optional[GraphInfo] = None

    @property
    def converted(self) -> bool:
        return self.action != "skipped"


class Records:
    """A sequence of linear records: iterate, index, count, filter. Subclasses give `records`."""

    records: List[LinearDecision]

    def __iter__(self) -> Iterator[LinearDecision]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> LinearDecision:
        return self.records[i]

    def by_action(self, action: str) -> List[LinearDecision]:
        return [d for d in self.records if d.action == action]


class Report(Records):
    """The decisions of every graph compiled by one backend, in graph order."""

    def __init__(self) -> None:
        self._infos: List[GraphInfo] = []
        self._graphs: List[List[LinearDecision]] = []
        self._attention: List[List[AttentionDecision]] = []

    def add_graph(self, info: GraphInfo, decisions: List[LinearDecision],
                  attention: Sequence[AttentionDecision] = ()) -> None:
        self._infos.append(info)
        self._graphs.append([dataclasses.replace(d, graph=info) for d in decisions])
        self._attention.append([dataclasses.replace(d, graph=info) for d in attention])

    def clear(self) -> None:
        self._infos.clear()
        self._graphs.clear()
        self._attention.clear()

    @property
    def attention(self) -> List[AttentionDecision]:
        """One record per scaled_dot_product_attention call per graph (when
        FP8Config.attention is set; the linears are the report's main records)."""
        return [d for g in self._attention for d in g]

    @property
    def graphs(self) -> List[List[LinearDecision]]:
        """The records of each graph, one list per graph in compile order."""
        return [list(g) for g in self._graphs]

    @property
    def records(self) -> List[LinearDecision]:
        """One record per linear op per graph (a recompile is a graph of its own)."""
        return [d for g in self._graphs for d in g]

    def __str__(self) -> str:
        tables = [(f"{info.preset_line}\n" if info.preset_line else "") + format_table(g)
                  + (f"\n{format_attention_table(a)}" if a else "")
                  for info, g, a in zip(self._infos, self._graphs, self._attention)]
        if len(tables) == 1:
            return tables[0]
        return "\n\n".join(f"{info}:\n{t}" for info, t in zip(self._infos, tables)) or format_table([])

    def __repr__(self) -> str:
        return f"<fp8_fx Report: {len(self)} linears in {len(self._graphs)} graphs>\n{self}"


def format_table(decisions: List[LinearDecision]) -> str:
    header = ("qualname", "action", "in", "out", "reason")
    rows = [(d.qualname or "<no module>", d.action, str(d.in_features), str(d.out_features),
             d.reason) for d in decisions]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
             for r in [header, *rows]]
    summary = _action_counts(decisions) or "no linear ops seen"
    return "\n".join([*(line.rstrip() for line in lines), f"({len(decisions)} linears: {summary})"])


def _action_counts(decisions) -> str:
    """"2 skipped, 3 emulate": how many records of each action, in order of first appearance."""
    counts: Dict[str, int] = {}
    for d in decisions:
        counts[d.action] = counts.get(d.action, 0) + 1
    return ", ".join(f"{n} {a}" for a, n in counts.items())


def format_attention_table(decisions: List[AttentionDecision]) -> str:
    header = ("attention", "action", "reason")
    rows = [(d.qualname or "<no module>", d.action, d.reason) for d in decisions]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in [header, *rows]]
    # by kernel: "emulate" is the recipe in fp32, not FP8 hardware
    return "\n".join([*lines, f"({len(decisions)} attention calls: {_action_counts(decisions) or 'none seen'})"])
