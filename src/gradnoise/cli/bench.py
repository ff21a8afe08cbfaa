"""`gradnoise bench …` sub-commands."""


def register(commands) -> None:
    """Add this module's sub-commands to the `gradnoise` parser."""
