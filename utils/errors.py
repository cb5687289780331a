"""The one exception type for mistakes a user can fix (bad cfg, missing file, wrong option)."""


class UserError(Exception):
    """A problem in the user's input. The message names the file and line, or the option to change.

    Command-line scripts print it as one line without a traceback and exit with status 2.
    """


class CheckError(UserError):
    """An output failed the check that it computes what its source computes (an export against
    PyTorch, say). Printed as one line like a UserError; the output is not kept."""
