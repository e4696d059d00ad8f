"""One check for every numeric option of every command: finite, an integer where counts are meant,
inside its range. Configs declare their ranges (`NUMERIC`) and call `check_numbers(self)` in
`validate()`, which every entry point runs before any work; the error names the option as the
command line spells it (`--epochs`), the rule, and the value given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Range:
    """An allowed interval; `integer` for counts. None bounds are open-ended."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself not allowed (lr > 0)
    hi_open: bool = False
    integer: bool = False
    optional: bool = False  # None allowed (e.g. --limit)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:  # an interval: --missing-rate in [0, 1]
            return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
                    f" ({kind})")
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '≥'} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '≤'} {self.hi:g}")
        return (" and ".join(parts) + f" ({kind})") if parts else kind


COUNT = Range(lo=1, integer=True)  # epochs, batch sizes, widths
NON_NEGATIVE_INT = Range(lo=0, integer=True)  # seeds, workers, top-k
NON_NEGATIVE = Range(lo=0)  # weights α, β, noise levels
POSITIVE = Range(lo=0, lo_open=True)  # learning rate
FRACTION = Range(lo=0, hi=1)  # rates


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_number(name: str, value: Any, rule: Range) -> None:
    """Raise ValueError naming `name` unless `value` satisfies `rule`."""
    if value is None and rule.optional:
        return
    bad = (isinstance(value, bool) or not isinstance(value, (int, float))
           or not math.isfinite(value)
           or (rule.integer and not float(value).is_integer())
           or (rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo))
           or (rule.hi is not None and (value >= rule.hi if rule.hi_open else value > rule.hi)))
    if bad:
        raise ValueError(f"{name} must be {rule.describe()}, got {value!r}")


def check_numbers(cfg: Any, rules: Mapping[str, Range] | None = None, *, prefix: str = "") -> None:
    """Check every field named in `rules` (default: `type(cfg).NUMERIC`). A list or a dict field
    is checked element by element (`--noise` levels, `--reg` weights)."""
    rules = type(cfg).NUMERIC if rules is None else rules
    for field, rule in rules.items():
        value = cfg[field] if isinstance(cfg, Mapping) else getattr(cfg, field)
        name = option_name(prefix + field)
        if isinstance(value, Mapping):
            for k, v in value.items():
                check_number(f"{name} {k}", v, rule)
        elif isinstance(value, (list, tuple)):
            for v in value:
                check_number(name, v, rule)
        else:
            check_number(name, value, rule)
