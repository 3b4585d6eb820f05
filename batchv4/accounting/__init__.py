"""Token and cost accounting for batchv4: price cards, per-row prices, amortization, totals.

Modules: `cards` (card names -> genai-prices models, private cards from `--prices`), `pricing`
(`RowUsage`, `price_row`, the DeepSeek weekend correction, self-hosted cost), `amortize`
(`cost_usd_amortized`), `summary` (totals, comparisons, cheapest window). genai-prices is imported
only when a price is computed; torch never.
"""

from batchv4.accounting.amortize import PricedRow, amortized_costs
from batchv4.accounting.cards import DEFAULT_CARD, PriceCard, get_card, load_price_file, price_table_version
from batchv4.accounting.pricing import RowCost, RowUsage, billing_instant, price_row, price_row_detail, self_hosted_cost
from batchv4.accounting.summary import Quote, Totals, Window, cheapest_window, compare_cards, price_totals, summarize

__all__ = [
    "DEFAULT_CARD",
    "PriceCard",
    "PricedRow",
    "Quote",
    "RowCost",
    "RowUsage",
    "Totals",
    "Window",
    "amortized_costs",
    "billing_instant",
    "cheapest_window",
    "compare_cards",
    "get_card",
    "load_price_file",
    "price_row",
    "price_row_detail",
    "price_table_version",
    "price_totals",
    "self_hosted_cost",
    "summarize",
]
