"""CLI commands that live beside their library module; each module has ``register(app)``.

``medxfer.cli`` registers every name in :data:`COMMAND_MODULES`.
"""

COMMAND_MODULES: list[str] = ["export", "features", "cv", "compare", "report", "explain", "pretrain", "locate", "serve",
                             "ensemble", "auto", "track"]
