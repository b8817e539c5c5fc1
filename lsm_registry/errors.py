"""Errors the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations


class LSMError(Exception):
    """A user-facing error: the message is shown without a traceback."""


class RecipeError(LSMError):
    """One or more problems in a recipe; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class RegistryError(LSMError):
    """Unknown component, duplicate registration or a broken plugin."""


class DataError(LSMError):
    """A data set could not be found or read; the message names the file or folder."""


class TrainingError(LSMError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""

    exit_code = 3
