"""The ``safetydpo`` command line: one module per sub-command (``cli/<command>.py``), each with
``register(subparsers)`` that adds its parser and sets ``func``; :mod:`.main` wires them together."""
