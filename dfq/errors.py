"""One exception type for everything a user can get wrong, always with the fix."""


class DfqError(Exception):
    """A problem with the user's input: says what is wrong and how to fix it.

    The CLI prints it as one line and exits with status 2 (no traceback unless --debug).
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}" + (f" Fix: {fix}" if fix else ""))
