"""The one error type for bad user input.

Anything raised as ``HarnessError`` reaches the user as a single line
``harness: error: <message>`` with exit status 2, before anything is written.
"""


class HarnessError(ValueError):
    """Bad input from the user: unknown name, out-of-range number, missing or malformed file."""
