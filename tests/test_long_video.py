"""Long videos streamed: the command line's edit comes back as latents and is decoded a batch at a time
into the video encoder (``output_type="stream"``), never whole in pixels; the same frames as a whole decode."""

from __future__ import annotations

import os
import re

import av
import numpy as np
import pytest
import torch

from tokenflow import EditConfig
from tokenflow.config import RunSettings
from tokenflow.editors import EDITORS
from tokenflow.results import StreamedFrames
from tokenflow.runs import save_result
from tokenflow.video import encode_video, read_video

from conftest import moving_frames, write_clip

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


# ---------------------------------------------------------------- the input streamed
def test_a_streamed_input_gives_the_frames_and_the_cache_key_of_a_whole_read(tmp_path):
    from tokenflow.cache import frames_digest
    from tokenflow.inputs import stream_video
    from tokenflow.video import to_tensor

    path = write_clip(tmp_path / "clip.mp4", moving_frames(21, 48, 64))
    whole = to_tensor(read_video(path, size=(32, 48)).frames)
    stream = stream_video(path, size=(32, 48))
    assert len(stream) == 21 and stream.shape == whole.shape and stream.fps == 12
    assert stream.digest == frames_digest(whole) == frames_digest(stream)
    assert torch.equal(torch.cat(list(stream.batches(8))), whole)  # three passes' worth of reads in one pass
    part = stream.rows(range(5, 17))
    assert len(part) == 12 and torch.equal(part[0:4], whole[5:9]) and torch.equal(part[4:12], whole[9:17])
    assert torch.equal(part[2:3], whole[7:8])  # going back starts a new pass
    # a selection (start, stride, limit) reads the frames read_video keeps
    kept = read_video(path, 6, size=(32, 48), start_frame=2, stride=3).frames
    assert torch.equal(stream_video(path, 6, size=(32, 48), start_frame=2, stride=3)[0:6], to_tensor(kept))


def test_an_edit_of_a_path_is_streamed_and_equals_the_edit_of_its_frames(tiny_pipe, tmp_path, monkeypatch):
    """The frames of a path are decoded a batch at a time (never all of them converted at once) and give
    the same edit, bit for bit, as the same frames given whole; the inversion it writes is the same too."""
    import tokenflow.inputs as inputs
    import tokenflow.video as video

    path = write_clip(tmp_path / "clip.mp4", moving_frames(40, 32, 48))
    whole = tiny_pipe.edit(video.to_tensor(read_video(path).frames), cache_dir=str(tmp_path / "a"),
                           progress=False, height=32, width=48, **SETTINGS)
    largest, to_tensor = [0], inputs.to_tensor

    def counting(frames):
        largest[0] = max(largest[0], len(frames))
        return to_tensor(frames)

    monkeypatch.setattr(inputs, "to_tensor", counting)  # what the stream converts its batches with
    streamed = tiny_pipe.edit(path, cache_dir=str(tmp_path / "b"), progress=False, height=32, width=48, **SETTINGS)
    assert 0 < largest[0] <= 16  # batches of the scan and of the VAE, never the 40 frames
    assert torch.equal(streamed.frames, whole.frames)
    assert streamed.inversion.key == whole.inversion.key  # the same cache key, hashed as the frames streamed


# ---------------------------------------------------------------- the inversion on disk
def test_a_cached_inversion_is_read_by_rows_and_steps_never_whole(tiny_pipe, tmp_path):
    from tokenflow.cache import InversionCache, StoredInversion

    frames = torch.from_numpy(moving_frames(24, 32, 48)).permute(0, 3, 1, 2).float() / 255
    kwargs = dict(inversion_steps=4, steps=4, progress=False)
    memory = tiny_pipe.invert(frames, "", use_cache=False, **kwargs)
    stored = tiny_pipe.invert(frames, "", cache_dir=str(tmp_path), **kwargs)  # written while inverting
    assert isinstance(stored, StoredInversion) and stored.bytes_read == 0
    row = 4 * 4 * 4 * 6  # float32 (C, h, w)
    assert sorted(stored.latents) == sorted(memory.latents) and stored.final_timestep == memory.final_timestep
    for t in memory.latents:
        assert torch.equal(stored.latents[t], memory.latents[t])
    assert stored.bytes_read == len(memory.latents) * 24 * row  # one read of each timestep, nothing else
    part = stored.rows(range(8, 12))  # a rank's share reads only its rows
    before = part.bytes_read
    assert torch.equal(part.latents[memory.final_timestep], memory.latents[memory.final_timestep][8:12])
    assert torch.equal(part.x0, memory.x0[8:12])
    assert part.bytes_read - before == 2 * 4 * row
    # an edit from the cache reads the start latents once and one timestep per step, each read one timestep
    hit = InversionCache(str(tmp_path))
    again = tiny_pipe.invert(frames, "", cache_dir=hit.root, **kwargs)
    result = tiny_pipe.edit(frames, inversion=again, progress=False, **{**SETTINGS, "steps": 4, "inversion_steps": 4})
    assert again.largest_read == 24 * row
    assert again.bytes_read == (2 + 4) * 24 * row  # x0 and the final state, then 4 steps
    whole = tiny_pipe.edit(frames, inversion=memory, progress=False, **{**SETTINGS, "steps": 4, "inversion_steps": 4})
    assert torch.equal(result.frames, whole.frames)


def test_a_cache_that_cannot_be_written_midway_keeps_the_inversion_in_memory(tiny_pipe, tmp_path, monkeypatch,
                                                                             caplog):
    """A full disk after the first batch: the rows written so far are read back, the inversion is the same,
    and the cache folder is left with no entry and no temporaries."""
    import errno

    from tokenflow import cache, tensorfiles

    frames = torch.from_numpy(moving_frames(12, 32, 48)).permute(0, 3, 1, 2).float() / 255
    kwargs = dict(inversion_steps=2, steps=2, progress=False, batch_size=4)
    memory = tiny_pipe.invert(frames, "", use_cache=False, **kwargs)
    append, calls = tensorfiles.RowFile.append, [0]

    def full_disk(self, first, rows):
        calls[0] += 1
        if first >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        append(self, first, rows)

    monkeypatch.setattr(tensorfiles.RowFile, "append", full_disk)
    with caplog.at_level("WARNING"):
        kept = tiny_pipe.invert(frames, "", cache_dir=str(tmp_path), **kwargs)
    assert not isinstance(kept, cache.StoredInversion) and "kept in memory and not cached" in caplog.text
    assert all(torch.equal(kept.latents[t], memory.latents[t]) for t in memory.latents)
    assert torch.equal(kept.x0, memory.x0)
    assert [os.listdir(tmp_path / d) for d in os.listdir(tmp_path)] == [[]]  # an empty folder: no entry


def test_an_interrupted_inversion_leaves_no_half_entry(tiny_pipe, tmp_path, monkeypatch):
    from tokenflow import tensorfiles

    frames = torch.from_numpy(moving_frames(12, 32, 48)).permute(0, 3, 1, 2).float() / 255
    append = tensorfiles.RowFile.append

    def interrupted(self, first, rows):
        if first >= 4:
            raise KeyboardInterrupt
        append(self, first, rows)

    monkeypatch.setattr(tensorfiles.RowFile, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.invert(frames, "", 2, 2, batch_size=4, cache_dir=str(tmp_path), progress=False)
    assert [os.listdir(tmp_path / d) for d in os.listdir(tmp_path)] == [[]]


def test_the_inversion_bar_says_when_the_whole_edit_will_be_done(tiny_pipe, monkeypatch):
    """A long edit's first bar (the inversion) gives the time left of the whole edit, not only its own."""
    from tokenflow import pipeline
    from tokenflow.progress import job_left

    assert job_left(100, 300, 10) == ", edit done in ~40 s" and job_left(100, 0, 10) == ""
    seen = []

    class Bar(pipeline.tqdm):
        def set_postfix_str(self, s="", refresh=True):
            seen.append(s)
            return super().set_postfix_str(s, refresh)

    monkeypatch.setattr(pipeline, "tqdm", Bar)
    frames = torch.from_numpy(moving_frames(8, 32, 48)).permute(0, 3, 1, 2).float() / 255
    tiny_pipe.edit(frames, use_cache=False, progress=True, **SETTINGS)
    assert any(re.fullmatch(r"[0-9.]+ frames/s, edit done in ~[0-9]+ s", s) for s in seen), seen
    # 2 editing steps x (1 + 2) branches x (1 + 1/4 keyframes per frame) images per frame after the inversion
    assert tiny_pipe._edit_images_per_frame(EditConfig(**SETTINGS), EDITORS["pnp"](EditConfig(**SETTINGS)), 1) == 7.5


def test_a_commit_that_fails_midway_leaves_no_entry_and_keeps_the_inversion(tiny_pipe, tmp_path, monkeypatch):
    """Every row written and the files renamed, then the manifest cannot be written: the renamed files go too
    (no entry without its manifest) and the inversion is read back into memory."""
    import contextlib
    import errno

    from tokenflow import cache, stored

    frames = torch.from_numpy(moving_frames(6, 32, 48)).permute(0, 3, 1, 2).float() / 255
    kwargs = dict(inversion_steps=2, steps=2, progress=False, batch_size=4)
    memory = tiny_pipe.invert(frames, "", use_cache=False, **kwargs)

    @contextlib.contextmanager
    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield

    monkeypatch.setattr(stored, "atomic_path", full_disk)
    kept = tiny_pipe.invert(frames, "", cache_dir=str(tmp_path), **kwargs)
    assert not isinstance(kept, cache.StoredInversion)
    assert all(torch.equal(kept.latents[t], memory.latents[t]) for t in memory.latents)
    assert [os.listdir(tmp_path / d) for d in os.listdir(tmp_path)] == [[]]
