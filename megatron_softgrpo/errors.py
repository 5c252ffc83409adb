"""User-facing errors: the CLI prints them as one line and exits with their code."""


class UserError(Exception):
    """Bad input from the user (recipe, file, flag). Printed as one line; exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A recipe that cannot be loaded, merged or validated."""
