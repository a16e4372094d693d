"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, never a traceback."""


def one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, made one space."""
    return " ".join(text.split())


def clip(text: str, width: int) -> str:
    """`text` on one line, cut to about `width` characters at a space where one is near."""
    text = one_line(text)
    if len(text) <= width:
        return text
    space = text.rfind(" ", 0, width)
    return text[:space if space > width // 2 else width] + " ..."
