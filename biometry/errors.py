"""One exception type for bad input: its message is the single line a user sees."""


class BiometryInputError(Exception):
    """Bad user input (file, row, key). ``str(err)`` is one line naming what is at fault.

    Commands print it alone on stderr and exit non-zero; ``--debug`` adds the traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
