"""CLI commands, one small module per command, each with ``register(app)``.

``medxfer.cli`` lists them (``COMMANDS``) and imports a module only when its command is called or its help
is asked for (:mod:`medxfer.commands.group`); :mod:`medxfer.commands.base` holds what they share.
"""
