"""Spellings of the command line: the official TokenFlow scripts' flags and underscored names as
aliases of ours, and an unknown option answered with the close one and the command's ``--help``.

The aliases are rewritten to our spelling before argparse reads them, so ``--help`` shows ours once:
``--inversion_prompt`` is ``--inversion-prompt``, ``--config_path`` (the official
``run_tokenflow_pnp.py``'s) is ``--config``, ``--data_path`` (``preprocess.py``'s) is the
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


def ours(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """``args`` with the official flags and underscored names spelled as ``parser`` knows them
    (``--inversion_prompt=x`` -> ``--inversion-prompt=x``). Rewriting the words, rather than adding
    option strings, keeps abbreviations unambiguous (``--guid`` is still ``--guidance-scale``)."""
    known = parser._option_string_actions
    out = []
    for i, arg in enumerate(args):
        if arg == "--":  # the rest are values
            return out + list(args[i:])
        if arg.startswith("--") and arg not in known:
            name, eq, value = arg.partition("=")
            alias = OFFICIAL_FLAGS.get(name) or "--" + name[2:].replace("_", "-")
            if alias in known:
                arg = alias + eq + value
        out.append(arg)
    return out


def known_options(parser: argparse.ArgumentParser) -> list[str]:
    """The options ``--help`` shows (our spellings, not the aliases)."""
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]


def unknown_options_message(extras: Sequence[str], parser: argparse.ArgumentParser, prog: str) -> str:
    """``unknown option --stpes (did you mean --steps?); see 'tokenflow edit --help'``."""
    if "--" in extras:
        extras = extras[:extras.index("--")]
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-") and len(e) > 1]
    if not flags:
        return f"unexpected argument(s) {' '.join(extras)} (see '{prog} --help')"
    choices = known_options(parser)
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag.replace("_", "-"), choices, n=1, cutoff=0.6)
        hints.append(f"{flag} (did you mean {close[0]}?)" if close and close[0] != flag else flag)
    what = "option" if len(flags) == 1 else "options"
    return f"unknown {what} {', '.join(hints)}; see '{prog} --help'"


def subcommand_parser(parser: argparse.ArgumentParser, name: Optional[str]) -> Optional[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None
