"""Where an edit's video goes: the default name, a folder given as the output (the official
configs' ``output_path``, ``-o DIR/``, an existing folder), and the folder made for it.

The official code and diffusers' ``save_pretrained`` make a missing output folder; so do we, once
every check has passed (before the model loads), saying so in one line. What cannot be made (a
parent that is a file, a folder without write permission) is an error before any work.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from .config import default_output
from .video import VIDEO_OUTPUT_EXTENSIONS, check_output_path, nearest_existing_folder

logger = logging.getLogger(__name__)


def is_folder_output(output: str) -> bool:
    """``DIR/`` or an existing folder not named like a video file (``x.mp4/`` without the slash is
    kept as the file name it looks like, and refused as a folder)."""
    if output.endswith(("/", os.sep)):
        return True
    return os.path.isdir(output) and not output.lower().endswith(VIDEO_OUTPUT_EXTENSIONS)


def resolve_output(output: Optional[str], input_path: str) -> str:
    """The output file: ``output`` as given, the default name inside it when it is a folder, or the
    default name in the current folder when none is given."""
    if not output:
        return default_output(input_path)
    if is_folder_output(output):
        return os.path.join(output, default_output(input_path))
    return output


def check_output(output: str, extensions=VIDEO_OUTPUT_EXTENSIONS) -> str:
    """:func:`tokenflow.video.check_output_path`, with a missing folder allowed when it can be made."""
    return check_output_path(output, extensions=extensions, parent_later=True)


def make_output_folder(output: str) -> Optional[str]:
    """Make the missing folder of ``output`` (and those above it), with a one-line notice.
    Returns the folder made, or None when it was there."""
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(folder):
        return None
    if not os.path.isdir(nearest_existing_folder(output)):
        check_output(output)  # raises the one-line reason
    os.makedirs(folder, exist_ok=True)
    logger.info("created the output folder '%s'", os.path.dirname(output) or folder)
    return folder


def note_replaced(output: str) -> None:
    """One line when an existing output is about to be replaced."""
    if os.path.exists(output):
        logger.warning("'%s' exists and will be replaced", output)
