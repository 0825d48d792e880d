"""Benchmarks: each figure is measured next to its baseline in the same run (`make bench`)."""


def row(
    name: str,
    value: float,
    unit: str,
    baseline: str,
    baseline_value: float | None,
    ratio: float | None,
    goal: str,
    met: bool | None = None,
) -> dict:
    """One line of the results table: a figure beside its same-run baseline, rounded for people."""
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "baseline": baseline,
        "baseline_value": None if baseline_value is None else round(baseline_value, 4),
        "ratio": None if ratio is None else round(ratio, 4),
        "goal": goal,
        "met": met,
    }
