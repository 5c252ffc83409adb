"""Errors the CLI prints as one line and exits with their code."""


class OneLineError(Exception):
    """Printed as one line; exit code 1 (a failure of the job, not of its input)."""

    exit_code = 1


class UserError(OneLineError):
    """Bad input from the user (recipe, file, flag). Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe that cannot be loaded, merged or validated."""


class PeerLost(OneLineError):
    """A rank of the other role died or stopped answering within the timeout."""
