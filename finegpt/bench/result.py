"""What every benchmark section returns, so one report writer handles them all."""

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Chart:
    """One bar chart of a section's rows: a bar per (label, series), height = rows[value_key]."""

    title: str
    label_key: str  # x-axis groups, e.g. "op" or "loader"
    value_key: str  # bar height, e.g. "ms" or "tokens_per_s"
    unit: str  # axis label, e.g. "ms (fwd+bwd)"
    series_key: str | None = None  # one colour per value, e.g. "path" (fused / eager / compile)


@dataclass
class SectionResult:
    """The figures of one benchmark section.

    rows: one dict per measured case, keyed by column id; values are numbers, strings or None
          (None = not measured, e.g. out of memory).
    columns: (key, header with unit) in display order: what the printed table and Markdown show.
    headline: the figures an issue's targets are checked against, e.g. {"loader_vs_nanogpt": 31.2}.
    skipped: why the section did not run (e.g. "no CUDA GPU"), or None.
    """

    name: str
    device: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[tuple[str, str]] = field(default_factory=list)
    headline: dict[str, float | str | bool | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["columns"] = [list(c) for c in self.columns]
        return data
