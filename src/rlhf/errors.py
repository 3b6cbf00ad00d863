"""The one exception type of a bad input: a problem the user can fix (a bad flag or keyword, a
missing file, a bad record, a reward function that raised, a run that diverged).

Its message is one line naming what and where; the command line prints it and exits 1, the Python
API raises it. Every other error of that kind (``ConfigError``, ``DataError``, ``ModelLoadError``,
``CheckpointError``, ``LoggerError``) is a subclass, so ``except rlhf.UserError`` catches them all.
Only the standard library is imported here.
"""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, diverged run): one line, exit 1."""


class CollectiveTimeout(UserError):
    """A collective across processes waited --ddp-timeout seconds for a process that never joined it (one
    stopped, hung, or ran other steps): the run ends in one line, as a bad input does, instead of waiting."""
