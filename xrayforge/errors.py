"""The one error type for problems with what the user gave: a file, a folder or a value.

Raise ``UserError`` with the file or value first and the problem after it
(``"runs/a/train_config.json: not valid JSON (line 3, column 1): the file is damaged"``). The
command line prints it as ``xrayforge <command>: error: <message>`` and exits with status 1;
a traceback is shown only with ``--debug`` (or ``XRAYFORGE_DEBUG=1``). It is a ``ValueError``,
so code that catches ``ValueError`` for bad input keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, said in one line that names the file or value."""
