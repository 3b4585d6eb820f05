"""The one base of the errors a user can fix: bad options, inputs, output folders, price files.

Owns: `UserError`. The CLI prints a `UserError` as one line and exits 1; any other exception is a
bug in batchv4 and is shown with its traceback. It subclasses `ValueError` so code that catches
`ValueError` (per-row checks, option parsers) keeps working; subclasses may add an `OSError`
base (a missing input is both). Does not own: the messages (each raiser writes its own line).
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; the message is one line and names the option, file or row."""
