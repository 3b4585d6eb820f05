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
    # "stop" | "length" | "error"; from a remote API also "tool_calls" | "content_filter"
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("error", pa.string()),  # set when finish_reason == "error"
    pa.field("prompt_tokens", pa.int64(), nullable=False),
    pa.field("prompt_cache_hit_tokens", pa.int64(), nullable=False),
    pa.field("prompt_cache_miss_tokens", pa.int64(), nullable=False),
    pa.field("completion_tokens", pa.int64(), nullable=False),  # includes reasoning_tokens
    pa.field("reasoning_tokens", pa.int64(), nullable=False),
    # prompt tokens an API would bill as cache hits (whole cache units of prefixes sent before);
    # cost_usd is priced with these, as estimate is. Null in parts of versions before it existed.
    pa.field("api_cache_hit_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),  # API-equivalent cost under the run's price card
    pa.field("cost_usd_amortized", pa.float64()),  # same, shared-prefix input cost spread evenly
    pa.field("cost_usd_self_hosted", pa.float64()),  # engine seconds x GPU-hour price, if given
    pa.field("engine_seconds", pa.float64()),  # engine time attributed to the row (remote: the request's)
    # remote backends: the provider's id of the request, and whether the response had no usage
    # (counted with batchv4's tokenizer instead). Null for the local engine and older parts.
    pa.field("provider_request_id", pa.string()),
    # structured outputs: whether the output matches the row's schema / regex / choice / grammar,
    # and the parsed JSON written back compactly (JSON kinds). Null for unconstrained rows.
    pa.field("valid", pa.bool_()),
    pa.field("parsed", pa.string()),
    pa.field("usage_counted_locally", pa.bool_()),
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
    """Fields for kept input columns, typed by `input_schema` (Parquet footers, or for JSON inputs
    the types `infer_schema` found in sampled rows); string where the schema has no such column or
    only nulls (values that are not strings are then written as JSON text)."""
    clash = [n for n in names if n in OUTPUT_SCHEMA.names]
    if clash:
        raise ValueError(f"kept column {clash[0]!r} has the name of an output column; rename it in the input")
    out = []
    for name in names:
        if input_schema is not None and name in input_schema.names and not _has_null(input_schema.field(name).type):
            out.append(pa.field(name, input_schema.field(name).type))
        else:
            out.append(pa.field(name, pa.string()))
    return out


def infer_schema(rows: Iterable[Mapping[str, Any]]) -> pa.Schema:
    """Column types of JSON rows, in first-seen column order: the type pyarrow infers from a
    column's non-null values (ints -> int64, floats or ints with floats -> double, bool, string,
    lists and structs as inferred); string when they share no type (3 and "a"), are all null, or
    have a part pyarrow can only type as null (only empty lists)."""
    values: dict[str, list[Any]] = {}
    for row in rows:
        for name, value in row.items():
            column = values.setdefault(name, [])
            if value is not None:
                column.append(value)
    fields = []
    for name, column in values.items():
        try:
            typ = pa.array(column).type if column else pa.string()
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            typ = pa.string()
        fields.append(pa.field(name, pa.string() if _has_null(typ) else typ))
    return pa.schema(fields)


def _has_null(typ: pa.DataType) -> bool:
    return pa.types.is_null(typ) or any(_has_null(typ.field(i).type) for i in range(typ.num_fields))


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
