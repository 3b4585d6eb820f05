"""Dataset I/O for batchv4: readers, row-to-request layer, output parts and schemas.

Modules: `urls` (fsspec resolution, storage options, redaction, atomic puts), `readers` (Parquet,
JSONL, OpenAI batch JSONL -> `RawRow` batches), `rows` (`RowSpec` -> `RowRequest` / `RowError`),
`schema` (Arrow schemas), `writers` (parts, errors, manifest, read-back), `openai_batch` (the
OpenAI batch output file). Never imports torch.
"""

from batchv4.io.readers import InputSource, RawRow, open_input
from batchv4.io.rows import RowError, RowRequest, RowSpec, build_request, check_columns
from batchv4.io.schema import ERROR_SCHEMA, OUTPUT_SCHEMA, keep_fields, output_schema
from batchv4.io.urls import redact_url
from batchv4.io.writers import (
    PartWriter,
    check_writable,
    finished_ids,
    iter_error_rows,
    iter_output_rows,
    read_errors,
    read_manifest,
    read_output_parts,
    write_openai_batch_output,
)

__all__ = [
    "ERROR_SCHEMA",
    "OUTPUT_SCHEMA",
    "InputSource",
    "PartWriter",
    "RawRow",
    "RowError",
    "RowRequest",
    "RowSpec",
    "build_request",
    "check_columns",
    "check_writable",
    "finished_ids",
    "iter_error_rows",
    "iter_output_rows",
    "keep_fields",
    "open_input",
    "output_schema",
    "read_errors",
    "read_manifest",
    "read_output_parts",
    "redact_url",
    "write_openai_batch_output",
]
