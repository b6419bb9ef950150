"""qmailctl's command handlers, one module per command group.

``qmailtx.vdomain.admin`` builds the parser and runs them; each handler takes
a ``Context`` and the parsed arguments and returns a ``Result``.
"""
