"""Price cards: user-facing names mapped to genai-prices models, plus private cards from a file.

Owns: the `PriceCard` type, the built-in card names (each a genai-prices model ref + provider id,
never a hand-written price), the DeepSeek billing-rule dates that genai-prices cannot express, and
loading `--prices FILE` (JSON or TOML). Does not own: computing a price (`pricing`), or totals and
comparisons (`summary`). Never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from importlib.metadata import version
from types import MappingProxyType
from typing import Any

from batchv4.errors import UserError

DEFAULT_CARD = "deepseek-v4-flash"


@dataclass(frozen=True)
class DeepSeekPeakRule:
    """What DeepSeek bills that genai-prices 0.2.3 cannot say (its constraints have no weekday and
    cannot combine a date with a time of day; see genai-prices issue #582):

    - peak windows only exist from `peak_since` (UTC date); before it V4 had one flat price;
    - from `weekend_off_peak_since` (Beijing date) Saturdays and Sundays, Beijing time, are
      off-peak all day;
    - from `holiday_off_peak_since` (Beijing date) China's public holidays are off-peak all day
      (taken from the `holidays` package's calendar, see `pricing.beijing_day_kind`);
    - `makeup_days_peak`: a weekend make-up working day (调休) is billed as a working day. The
      pricing page names Monday to Friday and weekends, not make-up days, so this is the upper
      bound (peak hours at peak price); False bills them as weekends.
    """

    peak_since: date = date(2026, 8, 17)
    weekend_off_peak_since: date = date(2026, 8, 23)
    # the page states the holiday rule with the weekend rule; no holiday fell between the two dates
    holiday_off_peak_since: date = date(2026, 8, 23)
    makeup_days_peak: bool = True


@dataclass(frozen=True)
class PriceCard:
    name: str
    # a genai-prices model (token prices, history, time of day) ...
    model_ref: str | None = None
    provider_id: str | None = None
    price_context: tuple[tuple[str, str], ...] = ()  # e.g. (("processing", "batch"),)
    # ... or private token prices, USD per million tokens
    input_per_mtok: float | None = None
    cached_input_per_mtok: float | None = None  # defaults to input_per_mtok
    output_per_mtok: float | None = None
    # self-hosted cost: engine seconds x this / 3600
    gpu_hour_usd: float | None = None
    deepseek_rule: DeepSeekPeakRule | None = None
    # True when tokens are counted with the V4 tokenizer but billed by another model's tokenizer
    approximate: bool = False
    label: str = ""

    @property
    def source(self) -> str:
        return "genai-prices" if self.model_ref is not None else "private"

    @property
    def has_token_prices(self) -> bool:
        return self.model_ref is not None or self.input_per_mtok is not None

    @property
    def display(self) -> str:
        return self.label or self.name


_BATCH = (("processing", "batch"),)
_DS = DeepSeekPeakRule()


def _card(name: str, model_ref: str, provider: str, label: str, **kw: Any) -> PriceCard:
    return PriceCard(name, model_ref, provider, label=label, **kw)


# Cards of other providers are approximate: their tokenizers count the same text differently.
BUILTIN_CARDS: Mapping[str, PriceCard] = MappingProxyType(
    {
        c.name: c
        for c in [
            _card("deepseek-v4-flash", "deepseek-v4-flash", "deepseek", "DeepSeek V4 Flash", deepseek_rule=_DS),
            _card("deepseek-v4-pro", "deepseek-v4-pro", "deepseek", "DeepSeek V4 Pro", deepseek_rule=_DS),
            _card("deepseek-v4.1-flash", "deepseek-flash", "deepseek", "DeepSeek V4.1 Flash", deepseek_rule=_DS),
            _card("gpt-5.4", "gpt-5.4", "openai", "GPT-5.4", approximate=True),
            _card("gpt-5.4-batch", "gpt-5.4", "openai", "GPT-5.4 (Batch API)", price_context=_BATCH, approximate=True),
            _card("gemini-3.1-pro", "gemini-3.1-pro-preview", "google", "Gemini 3.1 Pro", approximate=True),
            _card(
                "gemini-3.1-pro-batch", "gemini-3.1-pro-preview", "google", "Gemini 3.1 Pro (Batch)",
                price_context=_BATCH, approximate=True,
            ),
            _card("claude-sonnet-4.6", "claude-sonnet-4-6", "anthropic", "Claude Sonnet 4.6", approximate=True),
            _card(
                "claude-sonnet-4.6-batch", "claude-sonnet-4-6", "anthropic", "Claude Sonnet 4.6 (Batches)",
                price_context=_BATCH, approximate=True,
            ),
            _card("claude-sonnet-5.5", "claude-sonnet-5-5", "anthropic", "Claude Sonnet 5.5", approximate=True),
            _card(
                "claude-sonnet-5.5-batch", "claude-sonnet-5-5", "anthropic", "Claude Sonnet 5.5 (Batches)",
                price_context=_BATCH, approximate=True,
            ),
            _card("claude-opus-5.5", "claude-opus-5-5", "anthropic", "Claude Opus 5.5", approximate=True),
        ]
    }
)

_FILE_KEYS = {
    "input_per_mtok",
    "cached_input_per_mtok",
    "output_per_mtok",
    "gpu_hour_usd",
    "model_ref",
    "provider_id",
    "price_context",
    "base",
    "label",
}


def price_table_version() -> str:
    """The genai-prices release whose bundled table prices the built-in cards (for provenance)."""
    return f"genai-prices {version('genai-prices')}"


def get_card(name: str, private: Mapping[str, PriceCard] | None = None) -> PriceCard:
    """A card by name: private cards (from `--prices`) first, then the built-in ones."""
    if private and name in private:
        return private[name]
    if name in BUILTIN_CARDS:
        return BUILTIN_CARDS[name]
    names = sorted(set(BUILTIN_CARDS) | set(private or {}))
    raise UserError(f"unknown price card {name!r}; known cards: {', '.join(names)}")


def _price_field(card: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"price card {card!r}: {key} must be a non-negative number, got {value!r}")
    return float(value)


def _card_from_mapping(name: str, spec: Any, known: Mapping[str, PriceCard]) -> PriceCard:
    if not isinstance(spec, Mapping):
        raise UserError(f"price card {name!r}: expected a table of fields, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _FILE_KEYS)
    if unknown:
        raise UserError(f"price card {name!r}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_FILE_KEYS))}")
    fields: dict[str, Any] = {}
    for key in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", "gpu_hour_usd"):
        if spec.get(key) is not None:
            fields[key] = _price_field(name, key, spec[key])
    for key in ("model_ref", "provider_id", "label"):
        if spec.get(key) is not None:
            if not isinstance(spec[key], str) or not spec[key]:
                raise UserError(f"price card {name!r}: {key} must be a non-empty string")
            fields[key] = spec[key]
    if spec.get("price_context") is not None:
        ctx = spec["price_context"]
        if not isinstance(ctx, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
            raise UserError(f"price card {name!r}: price_context must map strings to strings")
        fields["price_context"] = tuple(sorted(ctx.items()))
    private_tokens = [k for k in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok") if k in fields]
    if private_tokens and not {"input_per_mtok", "output_per_mtok"} <= set(fields):
        raise UserError(
            f"price card {name!r}: give input_per_mtok and output_per_mtok together (cached_input_per_mtok is optional)"
        )
    if private_tokens and "model_ref" in fields:
        raise UserError(f"price card {name!r}: give either model_ref or private token prices, not both")
    base_name = spec.get("base")
    if base_name is not None:
        base = get_card(base_name, known)
        if private_tokens:  # private prices replace the base's genai-prices model
            fields.setdefault("model_ref", None)
            fields.setdefault("provider_id", None)
            fields.setdefault("deepseek_rule", None)
        return dataclasses.replace(base, name=name, **fields)
    if "provider_id" in fields and "model_ref" not in fields:
        raise UserError(f"price card {name!r}: provider_id needs model_ref")
    return PriceCard(name=name, **fields)


def load_price_file(path: str | os.PathLike[str]) -> dict[str, PriceCard]:
    """Private cards from a JSON or TOML file: `{"cards": {"name": {field: value}}}`.

    Fields (all optional): input_per_mtok, cached_input_per_mtok, output_per_mtok, gpu_hour_usd,
    model_ref + provider_id (+ price_context) for another genai-prices model, base (inherit a
    card, e.g. `base = "deepseek-v4-flash"` plus `gpu_hour_usd`), label. Raises ValueError/OSError
    with one-line messages.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OSError(f"cannot read price file {path}: {e.strerror or e}") from e
    is_toml = path.lower().endswith(".toml")
    if is_toml:
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise UserError(f"price file {path}: TOML needs Python 3.11 or later; use JSON") from e
    try:
        doc = tomllib.loads(data.decode("utf-8")) if is_toml else json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        kind = "TOML" if is_toml else "JSON"
        raise UserError(f"price file {path} is not valid {kind}: {str(e).splitlines()[0]}") from e
    if not isinstance(doc, Mapping) or not isinstance(doc.get("cards"), Mapping):
        raise UserError(f"price file {path}: expected a top-level 'cards' table")
    cards: dict[str, PriceCard] = {}
    for name, spec in doc["cards"].items():
        cards[name] = _card_from_mapping(name, spec, cards)
    return cards
