"""The one exception type for mistakes a user can fix (a flag, a file, a directory).

Library code raises it (or a subclass) with a message that names the file or flag and says what to
do; the CLI prints that message without a traceback. Bugs stay ordinary exceptions.
"""


class FinegptError(Exception):
    """A problem with the user's input, reported as a message rather than a traceback."""
