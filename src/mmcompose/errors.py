"""Exception classes. Every user-facing failure is an ``MMComposeError`` carrying a hint,
so the CLI can print it without a traceback and exit with code 2."""

from __future__ import annotations


class MMComposeError(Exception):
    """Base class: ``message`` names the problem, ``hint`` says what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(MMComposeError):
    """A config (YAML, config.json, or arguments) is invalid."""


class UnknownNameError(ConfigError):
    """A registry lookup failed: unknown modality, encoder, projector or merge method."""


class PlaceholderError(MMComposeError):
    """The placeholders in a prompt do not match the modality inputs given."""


class MediaError(MMComposeError):
    """A media file is missing, unreadable or in a format we cannot decode."""


class CheckpointError(MMComposeError):
    """A model folder or weight file is missing, incomplete or inconsistent."""


class MergeError(MMComposeError):
    """A composition cannot be carried out as configured."""
