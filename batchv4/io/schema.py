"""Arrow schemas of the output and error parts, and conversion of row dicts to tables.

Owns: column names, types and nullability of `part-*.parquet` and `errors-*.parquet`, and how kept
input columns are appended. Does not own: where parts go (`batchv4.io.writers`) or how values are
computed (`batchv4.accounting`, the pipelines).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("output", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length" | "error"
    pa.field("error", pa.string()),  # set when finish_reason == "error"
    pa.field("prompt_tokens", pa.int64(), nullable=False),
    pa.field("prompt_cache_hit_tokens", pa.int64(), nullable=False),
    pa.field("prompt_cache_miss_tokens", pa.int64(), nullable=False),
    pa.field("completion_tokens", pa.int64(), nullable=False),  # includes reasoning_tokens
    pa.field("reasoning_tokens", pa.int64(), nullable=False),
    pa.field("cost_usd", pa.float64()),  # API-equivalent cost under the run's price card
    pa.field("cost_usd_amortized", pa.float64()),  # same, shared-prefix input cost spread evenly
    pa.field("cost_usd_self_hosted", pa.float64()),  # engine seconds x GPU-hour price, if given
    pa.field("engine_seconds", pa.float64()),  # engine time attributed to the row
    pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
)
OUTPUT_SCHEMA = pa.schema(list(OUTPUT_FIELDS))

ERROR_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("raw", pa.string()),
    ]
)


def keep_fields(names: Sequence[str], input_schema: pa.Schema | None = None) -> list[pa.Field]:
    """Fields for kept input columns: the input's Arrow type for Parquet, else string (JSON values
    are written as JSON text unless they already are strings)."""
    clash = [n for n in names if n in OUTPUT_SCHEMA.names]
    if clash:
        raise ValueError(f"kept column {clash[0]!r} has the name of an output column; rename it in the input")
    out = []
    for name in names:
        if input_schema is not None and name in input_schema.names:
            out.append(pa.field(name, input_schema.field(name).type))
        else:
            out.append(pa.field(name, pa.string()))
    return out


def output_schema(kept: Sequence[pa.Field] = ()) -> pa.Schema:
    return pa.schema(list(OUTPUT_FIELDS) + list(kept))


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def rows_to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """A table of `rows` (dicts keyed by column name) under `schema`; string columns accept any
    JSON value. Raises ValueError (one line) naming a missing required column or a bad value."""
    rows = list(rows)
    columns = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if not f.nullable and any(v is None for v in values):
            raise ValueError(f"output column {f.name!r} is required but a row has no value")
        if pa.types.is_string(f.type):
            values = [_as_text(v) for v in values]
        try:
            columns[f.name] = pa.array(values, type=f.type)
        except (pa.ArrowException, TypeError, ValueError) as e:
            raise ValueError(f"output column {f.name!r}: {str(e).splitlines()[0]}") from e
    return pa.table(columns, schema=schema)
