"""One module per CLI subcommand: ``add_parser(subparsers)`` registers it, ``run(args)`` runs it.

Shared options live in :mod:`verydeep.commands.common` so every command spells them the same.
"""
