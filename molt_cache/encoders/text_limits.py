"""How long a text a frozen text model can take, and how the cut is reported.

The maximum length (tokens, special tokens included) is the smallest of
- the model's position limit: `max_position_embeddings` (LLaMA, BERT, ...) or `n_positions`
  (GPT-2); learned position tables cannot be indexed past it (GPT-2 raises IndexError deep in the
  model; RoBERTa-style tables reserve `pad_token_id + 1` rows, so they hold that many fewer);
- the tokenizer's `model_max_length` when it is a real value (transformers stores a 1e30
  sentinel when the checkpoint does not say);
- the user's `--max-length`, when given.
A model with none of the three is refused: its limit is unknown, so pass one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# transformers' VERY_LARGE_INTEGER (int(1e30)) and the like mean "not set".
UNSET_ABOVE = 10**9
POSITION_FIELDS = ("max_position_embeddings", "n_positions")


def position_limit(config: Any) -> int | None:
    """Tokens the model's position table holds, or None for models without one (RoPE and
    ALiBi models still name a trained length in max_position_embeddings)."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and 0 < value < UNSET_ABOVE:
            if "roberta" in str(getattr(config, "model_type", "")) or "camembert" in str(getattr(config, "model_type", "")):
                value -= int(getattr(config, "pad_token_id", 1) or 0) + 1  # positions start after padding_idx
            return value
    return None


def tokenizer_limit(tokenizer: Any) -> int | None:
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < UNSET_ABOVE else None


def resolve_max_length(config: Any, tokenizer: Any, requested: int | None, *, name: str) -> tuple[int, dict[str, int | None]]:
    """(max_length, the three limits by source). Raises ValueError for a requested length < 1
    or when no limit is known."""
    if requested is not None and requested < 1:
        raise ValueError(f"max_length must be >= 1, got {requested}")
    limits = {"positions": position_limit(config), "tokenizer": tokenizer_limit(tokenizer), "requested": requested}
    known = [v for v in limits.values() if v is not None]
    if not known:
        raise ValueError(f"text model {name!r} states no position limit (max_position_embeddings / n_positions) "
                         "and its tokenizer no model_max_length; pass --max-length")
    return min(known), limits


@dataclass
class Tokenized:
    """Token ids of a list of texts, and what truncation did to them.

    ids: per text, special tokens included, at most `max_length` long.
    full_lengths: per text, the tokens it would have had without truncation.
    """

    ids: list[list[int]]
    full_lengths: list[int]
    max_length: int
    limits: dict[str, int | None] = field(default_factory=dict)

    @property
    def truncated(self) -> list[int]:
        """Indices of the texts that were cut."""
        return [i for i, n in enumerate(self.full_lengths) if n > self.max_length]

    def summary(self) -> dict[str, Any]:
        """{"texts", "truncated", "max_length", "longest_tokens"} (longest before truncation)."""
        return {"texts": len(self.ids), "truncated": len(self.truncated), "max_length": self.max_length,
                "longest_tokens": max(self.full_lengths, default=0)}


def tokenize_splits(encoder: Any, texts_per_split: list[tuple[str, list[str]]]
                    ) -> tuple[list[list[list[int]]], dict[str, Any]]:
    """Tokenize every split's texts up front, before any work unit runs, and check the lengths.

    Returns the ids per split and the length report the manifest and the extract summary carry:
    {"max_length": L, "limits": {"positions", "tokenizer", "requested"},
     "splits": {split: {"texts", "truncated", "max_length", "longest_tokens"}}}.
    Raises ValueError naming the split and text for a text with no tokens or more than L tokens
    (an encoder that does not truncate): found here, not after the image units were written.
    """
    ids_per_split: list[list[list[int]]] = []
    report: dict[str, Any] = {"max_length": None, "limits": {}, "splits": {}}
    for split, texts in texts_per_split:
        tok = encoder.tokenize_report(texts)
        report["max_length"], report["limits"] = int(tok.max_length), dict(tok.limits)
        for k, ids in enumerate(tok.ids):
            if len(ids) == 0:
                raise ValueError(f"text encoder {encoder.identity.name} gives no tokens for {split} text "
                                 f"{texts[k][:80]!r}; it must add at least one special token")
            if len(ids) > tok.max_length:
                raise ValueError(f"{split} text {texts[k][:80]!r} has {len(ids)} tokens, more than the text "
                                 f"encoder's max length {tok.max_length}")
        report["splits"][split] = tok.summary()
        ids_per_split.append(tok.ids)
    return ids_per_split, report


def truncation_lines(report: dict[str, Any]) -> list[str]:
    """One line per split that had a text cut, for the extract summary."""
    return [f"{split}: {s['truncated']} of {s['texts']} texts truncated to {s['max_length']} tokens "
            f"(longest {s['longest_tokens']} tokens)" for split, s in report.get("splits", {}).items()
            if s["truncated"]]
