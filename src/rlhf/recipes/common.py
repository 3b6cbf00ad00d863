"""Shared pieces of every recipe, as plain functions: errors, run setup, the step loop."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, diverged run): one line, exit 1."""
