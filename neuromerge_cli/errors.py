"""The one exception type a user can cause; the CLI prints it as a single line."""


class MergeError(Exception):
    """A problem with the user's input (recipe, checkpoint, output path).

    The message names the file, key or tensor at fault and is printed as one line.
    """
