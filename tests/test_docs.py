"""The README's and docs/ pages' commands, as a user types them; their links; the package's name.

Every ``tokenflow`` command in a ``bash`` block is parsed by the command's own parser (an unknown or
misspelt option fails here, not in a user's terminal). The cheap ones run as written, in a scratch
folder where each input they name is a copy of the bundled demo clip and the cache is the scratch
folder's: the commands on a tiny model (``--model tiny``, ``tiny-sd3``, ``tiny-flux``) and
``tokenflow cache``. The quick start's real edit names a hub model (a download of gigabytes, then hours
on a CPU): it runs with that model swapped for ``tiny`` and a small size, few frames and steps, the
rest of the line as written. The other commands that name a hub model or start a server (``ui``) are
parsed only. The demo runs in tests/test_cli.py (test_demo_end_to_end_in_a_subprocess), and the two
set-up commands of the README's first lines are CI's own (they are checked to be the first lines).
"""

import glob
import os
import re
import shlex
import shutil

import pytest

from tokenflow.cli import DEMO_CLIP, build_parser

from conftest import run_cli

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
SETUP = ("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e . "
         "&& .venv/bin/tokenflow demo")
TINY_MODELS = ("tiny", "tiny-sd3", "tiny-flux")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".gif", ".webm", ".avi")


def bash_blocks(path):
    """The lines of each ```bash block of a page, a trailing backslash joining a line to the next."""
    blocks, block = [], None
    for line in open(path).read().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if block is None and stripped == "```bash":
                block = []
            elif block is not None:
                blocks.append(block)
                block = None
            continue
        if block is not None:
            if block and block[-1].endswith("\\"):
                block[-1] = block[-1][:-1] + " " + stripped
            else:
                block.append(stripped)
    return blocks


def commands(path):
    """Each command of a page's bash blocks as words (comments dropped, ``&&`` chains split)."""
    found = []
    for block in bash_blocks(path):
        for line in block:
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                found.append(words[:end])
                words = words[end + 1:]
    return [c for c in found if c]


def tokenflow_argv(words):
    """The tokenflow command's arguments in a command line (``.venv/bin/tokenflow ...`` or under torchrun,
    ``... -m tokenflow ...``); None for any other program."""
    if words[0] == ".venv/bin/tokenflow":
        return words[1:]
    if words[0] == ".venv/bin/torchrun" and "-m" in words and words[words.index("-m") + 1] == "tokenflow":
        return words[words.index("-m") + 2:]
    return None


ALL = [(os.path.relpath(p, ROOT), c) for p in PAGES for c in commands(p)]
TOKENFLOW = [(page, argv) for page, c in ALL if (argv := tokenflow_argv(c)) is not None]


def test_the_readme_starts_with_the_two_setup_commands():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    assert lines[:6] == ["# tokenflow", "", "```bash", SETUP, "bash scripts/test.sh", "```"]
    assert os.path.isfile(os.path.join(ROOT, "scripts", "test.sh"))


def test_the_pages_have_commands_and_each_uses_the_environment():
    """No bare `tokenflow`/`pip`: after the first line, a bare command is 'command not found'. In the prose a
    command with arguments counts; a command's name alone (`tokenflow edit`) is a name."""
    assert len(TOKENFLOW) > 30, len(TOKENFLOW)
    for page, words in ALL:
        program = words[0]
        assert program.startswith(".venv/bin/") or program in ("python3", "bash", "export", "cat"), (page, words)
    for path in PAGES:  # inline commands in the prose too
        text = open(path).read()
        bare = re.findall(r"`((?:tokenflow|pip) (?:edit|invert|eval|analyze|ui|demo|cache|batch|install) [^`]+)`",
                          text)
        assert not bare, (path, bare)


@pytest.mark.parametrize("page, argv", TOKENFLOW, ids=[f"{p}:{' '.join(a)[:50]}" for p, a in TOKENFLOW])
def test_every_tokenflow_command_parses(page, argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # an unknown option, a bad choice: the command's own one-line error
        pytest.fail(f"{page}: `tokenflow {' '.join(argv)}` does not parse (exit {e.code})")
    assert args.command is not None


def _cheap(argv):
    args = build_parser().parse_args(argv)
    return args.command == "cache" or (args.command in ("edit", "invert") and getattr(args, "model", None) in TINY_MODELS)


CHEAP = [(page, argv) for page, argv in TOKENFLOW if _cheap(argv)]
QUICK_START_EDIT = next(argv for page, argv in TOKENFLOW if page == "README.md" and argv[0] == "edit")
SMALL = {"--max-frames": "4", "--steps": "2", "--inversion-steps": "2", "--height": "64", "--width": "64"}


def _run_as_written(argv, tmp_path, monkeypatch, capsys):
    """Run in a scratch folder: each input named is a copy of the bundled clip, the cache is the folder's."""
    os.makedirs(tmp_path, exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # `cache clear` never meets a user's cache
    args = build_parser().parse_args(argv)
    for name in [getattr(args, "input", None)]:
        if name and name.lower().endswith(VIDEO_SUFFIXES) and not os.path.isabs(name):
            os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
            shutil.copy(DEMO_CLIP, name)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, f"`tokenflow {' '.join(argv)}` ended with {code}: {err[-600:]}"
    return args, out, err


def test_the_cheap_commands_run_as_written(tmp_path, monkeypatch, capsys):
    assert {argv[0] for _, argv in CHEAP} >= {"edit", "cache"}, CHEAP  # the pages keep some that run
    for i, (page, argv) in enumerate(CHEAP):
        args, out, _ = _run_as_written(argv, tmp_path / str(i), monkeypatch, capsys)
        if args.command == "edit":
            assert "edited" in out, (page, argv, out)


def test_the_quick_start_edit_runs_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    """As written, but the hub model swapped for `tiny` and a small size, few frames and steps."""
    argv = list(QUICK_START_EDIT)
    assert "--model" not in argv or argv[argv.index("--model") + 1] not in TINY_MODELS
    if "--model" in argv:
        argv[argv.index("--model") + 1] = "tiny"
    else:
        argv += ["--model", "tiny"]
    for flag, value in SMALL.items():
        assert flag not in argv
        argv += [flag, value]
    args, out, _ = _run_as_written(argv, tmp_path, monkeypatch, capsys)
    assert os.path.isfile(tmp_path / args.output) and "edited 4 frames" in out, out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path):
    """GitHub's anchors of a page's headings."""
    names = set()
    for line in open(path).read().splitlines():
        if re.match(r"#{1,6} ", line):
            text = line.lstrip("#").strip().lower()
            names.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return names


def test_every_link_between_the_pages_resolves():
    for path in PAGES:
        for target in LINK.findall(open(path).read()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.exists(where), f"{os.path.relpath(path, ROOT)}: link to {target} points nowhere"
            if anchor and where.endswith(".md"):
                assert anchor in _anchors(where), f"{os.path.relpath(path, ROOT)}: no heading for #{anchor}"


def test_the_package_installs_by_a_name_of_its_own_and_every_hint_uses_it(monkeypatch, capsys):
    """`tokenflow` on PyPI is an unrelated package: the distribution is tokenflow-video (the import and the
    command stay tokenflow), and no hint says to install 'tokenflow'."""
    import sys
    import tomllib

    import tokenflow

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["name"] == tokenflow.DISTRIBUTION == "tokenflow-video"
    assert project["scripts"] == {"tokenflow": "tokenflow.cli:main"}
    sources = PAGES + glob.glob(os.path.join(ROOT, "src", "tokenflow", "**", "*.py"), recursive=True)
    for path in sources:
        for args in re.findall(r"pip install ([^\n`&;|#]*)", open(path).read()):  # one command's arguments
            words = [re.sub(r"^[\"'(]+|[\"'),.:;]+$", "", w) for w in args.split()]  # quotes, brackets, stops
            wrong = [w for w in words if re.fullmatch(r"tokenflow(\[[^\]]*\])?", w)]
            assert not wrong, (path, args)
    monkeypatch.setitem(sys.modules, "gradio", None)  # as where the extra is not installed
    code, _, err = run_cli(capsys, "ui", "--model", "tiny")
    assert code == 2 and f"{sys.executable} -m pip install 'tokenflow-video[ui]'" in err, err
