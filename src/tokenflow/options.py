"""Spellings of the command line: the official TokenFlow scripts' flags and underscored names as
aliases of ours, and an unknown option answered with the close one and the command's ``--help``.

The aliases are extra option strings of the same argparse actions, kept out of ``--help`` (which
shows our spelling once): ``--inversion_prompt`` is ``--inversion-prompt``, ``--config_path`` (the
official ``run_tokenflow_pnp.py``'s) is ``--config``, ``--data_path`` (``preprocess.py``'s) is the
input, ``--n_frames`` is ``--max-frames``, ``--H``/``--W`` are ``--height``/``--width``.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Optional, Sequence

# official flag -> ours (only where the meaning is the same; preprocess.py's --steps is the
# inversion's, ours the edit's, so it is not one of them)
OFFICIAL_FLAGS = {"--config_path": "--config", "--data_path": "--data-path", "--n_frames": "--max-frames",
                  "--H": "--height", "--W": "--width", "--n_timesteps": "--steps",
                  "--n_inversion_steps": "--inversion-steps"}


def add_aliases(parser: argparse.ArgumentParser) -> None:
    """Every ``--a-b`` also as ``--a_b``, and the official flags, on ``parser`` (not shown in --help)."""
    table = parser._option_string_actions
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            if opt.startswith("--") and "-" in opt[2:]:
                table.setdefault("--" + opt[2:].replace("-", "_"), action)
    for official, ours in OFFICIAL_FLAGS.items():
        if ours in table:
            table.setdefault(official, table[ours])


def known_options(parser: argparse.ArgumentParser) -> list[str]:
    """The options ``--help`` shows (our spellings, not the aliases)."""
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]


def unknown_options_message(extras: Sequence[str], parser: argparse.ArgumentParser, prog: str) -> str:
    """``unknown option --stpes (did you mean --steps?); see 'tokenflow edit --help'``."""
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-") and len(e) > 1]
    if not flags:
        return f"unexpected argument(s) {' '.join(extras)} (see '{prog} --help')"
    choices = known_options(parser)
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag.replace("_", "-"), choices, n=1, cutoff=0.6)
        hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    what = "option" if len(flags) == 1 else "options"
    return f"unknown {what} {', '.join(hints)}; see '{prog} --help'"


def subcommand_parser(parser: argparse.ArgumentParser, name: Optional[str]) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None
