"""Long videos streamed: the command line's edit comes back as latents and is decoded a batch at a time
into the video encoder (``output_type="stream"``), never whole in pixels; the same frames as a whole decode."""

from __future__ import annotations

import av
import numpy as np
import torch

from tokenflow.config import RunSettings
from tokenflow.results import StreamedFrames
from tokenflow.runs import save_result
from tokenflow.video import encode_video, read_video

from conftest import moving_frames

SETTINGS = dict(prompt="a red car", steps=2, inversion_steps=2, batch_size=4, seed=3)


def _decoded(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_streamed_edit_gives_the_whole_decode_bit_for_bit(tiny_pipe, monkeypatch):
    frames = torch.from_numpy(moving_frames(13, 32, 48)).permute(0, 3, 1, 2).float() / 255
    monkeypatch.setattr(tiny_pipe, "vae_batch_size", 2)  # VAE calls of 2 frames in both
    whole = tiny_pipe.edit(frames, use_cache=False, progress=False, **SETTINGS)
    streamed = tiny_pipe.edit(frames, use_cache=False, progress=False, output_type="stream", **SETTINGS)
    assert isinstance(streamed.frames, StreamedFrames)
    assert streamed.frames.batch_size % 2 == 0  # whole VAE calls per batch read
    streamed.frames.batch_size = 4  # four reads for 13 frames, each two VAE calls, the last one and a half
    assert streamed.frame_shape() == whole.frame_shape() == (13, 32, 48)
    batches = list(streamed.uint8_batches())
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    assert np.array_equal(np.concatenate(batches), whole.uint8())


def test_the_writer_batch_by_batch_equals_the_whole_video_write(tiny_pipe, tmp_path):
    frames = torch.from_numpy(moving_frames(13, 32, 48)).permute(0, 3, 1, 2).float() / 255
    result = tiny_pipe.edit(frames, use_cache=False, progress=False, output_type="stream", **SETTINGS)
    result.frames.batch_size = 4  # several batches for 13 frames
    decoded_in_the_edit = result.seconds["decode"]  # the latents were only gathered: the decode is the writer's
    out = tmp_path / "streamed.mp4"
    shape = save_result(tiny_pipe, result, str(out), RunSettings(input="clip.mp4", model="tiny",
                                                               frames_dir=str(tmp_path / "frames")))
    assert shape == (13, 32, 48)
    assert result.seconds["decode"] > decoded_in_the_edit  # the summary line counts the decode done while writing
    whole = result.uint8()
    encode_video(str(tmp_path / "whole.mp4"), whole, result.fps)
    assert np.array_equal(_decoded(out), _decoded(tmp_path / "whole.mp4"))
    folder = read_video(tmp_path / "frames").frames
    assert np.array_equal(folder, whole)
