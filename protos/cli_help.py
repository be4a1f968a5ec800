"""The `--help` formatter every pdserve command line uses (router, workers, cluster)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, options written without help text too."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _shown(action.default):
            action.help = "(default: %(default)s)"  # argparse lists only actions with help
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or not _shown(action.default):
            return text
        return f"{text} (default: %(default)s)"


def _shown(default: object) -> bool:
    return default not in (None, False, argparse.SUPPRESS, [], ())
