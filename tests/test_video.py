import os

import av
import numpy as np
import pytest
from PIL import Image

from tokenflow.errors import TokenFlowError
from tokenflow.video import (default_size, fit_frames, read_video, resize_frames, working_size, write_frames,
                             write_video)

from conftest import moving_frames, write_clip


def test_read_video_keeps_fps_and_audio_and_limits_frames(clip):
    v = read_video(clip)
    assert v.frames.shape == (10, 64, 96, 3) and v.frames.dtype == np.uint8
    assert v.fps == 12 and v.audio_source == clip
    assert len(read_video(clip, max_frames=3).frames) == 3


def test_read_folder_in_natural_order(tmp_path):
    frames = moving_frames(11, 16, 24)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame{i}.png")  # frame10 must come after frame9
    v = read_video(tmp_path, fps=7)
    assert np.array_equal(v.frames, frames) and v.fps == 7 and v.audio_source is None


def test_write_roundtrip_keeps_fps_audio_and_content(clip, tmp_path):
    v = read_video(clip)
    out = write_video(tmp_path / "out.mp4", v.frames, v.fps, v.audio_source)
    with av.open(out) as c:
        assert c.streams.video[0].average_rate == 12
        assert c.streams.audio and c.streams.audio[0].codec_context.name == "aac"
        audio_s = float(c.streams.audio[0].duration * c.streams.audio[0].time_base)
    assert abs(audio_s - 10 / 12) < 0.15  # audio cut at the video's end
    back = read_video(out)
    assert back.frames.shape == v.frames.shape
    assert np.abs(back.frames.astype(int) - v.frames).mean() < 4  # lossy, but the same picture
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []


def test_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "bad.mp4"
    with pytest.raises(Exception):
        write_video(target, np.zeros((2, 15, 15, 3), np.uint8), 10)  # odd size: yuv420p refuses
    assert os.listdir(tmp_path) == []


def test_default_size_keeps_aspect_about_512_squared():
    assert default_size(512, 512) == (512, 512)
    h, w = default_size(1080, 1920)
    assert (h, w) == (384, 704) and h % 64 == 0 and w % 64 == 0
    assert default_size(1920, 1080) == (704, 384)


def test_working_size_overrides_and_checks():
    assert working_size((100, 200), 64, 96) == (64, 96)
    assert working_size((100, 200), height=64) == (64, 128)
    with pytest.raises(TokenFlowError, match="multiple of 8"):
        working_size((100, 200), 60, 96)
    with pytest.raises(TokenFlowError, match="multiple of 8"):
        working_size((100, 200), -8, 96)


def test_fit_frames_does_not_resize_at_working_size_and_uses_lanczos():
    frames = moving_frames(2, 32, 48)
    t = fit_frames(frames, 32, 48)
    assert t.shape == (2, 3, 32, 48) and t.is_contiguous()
    assert np.array_equal((t * 255).round().byte().permute(0, 2, 3, 1).numpy(), frames)
    small = resize_frames(frames, 16, 24)
    expected = np.asarray(Image.fromarray(frames[0]).resize((24, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(small[0], expected)


def test_write_frames(tmp_path):
    frames = moving_frames(3, 16, 24)
    write_frames(tmp_path / "f", frames)
    assert sorted(os.listdir(tmp_path / "f")) == ["00000.png", "00001.png", "00002.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f" / "00002.png")), frames[2])


def _put(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.mp4", "does not exist"),
    (lambda p: _put(p / "empty.mp4", b""), "empty file"),
    (lambda p: _put(p / "notes.txt", b"hello, not a video\n" * 20), "as a video"),
    (lambda p: _put(p / "junk.mp4", os.urandom(4096)), "as a video"),
    (lambda p: (p / "nothing").mkdir() or p / "nothing", "no frames"),
])
def test_bad_inputs_raise_one_line_errors(tmp_path, make, message):
    with pytest.raises(TokenFlowError, match=message) as e:
        read_video(make(tmp_path))
    assert "\n" not in str(e.value)


def test_truncated_video_is_an_error_or_keeps_the_decoded_frames(tmp_path, clip):
    data = open(clip, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    try:
        v = read_video(cut)
    except TokenFlowError as e:
        assert "\n" not in str(e)
    else:
        assert 0 < len(v.frames) <= 10


def test_folder_with_unreadable_or_mismatched_frames(tmp_path):
    Image.fromarray(moving_frames(1, 16, 24)[0]).save(tmp_path / "0.png")
    (tmp_path / "1.png").write_bytes(b"not a png")
    with pytest.raises(TokenFlowError, match="cannot read frame"):
        read_video(tmp_path)
    # a frame of another size is fitted to the first one's (with a warning), not an error
    other = moving_frames(1, 32, 24)[0]
    Image.fromarray(other).save(tmp_path / "1.png")
    v = read_video(tmp_path)
    assert v.frames.shape == (2, 16, 24, 3)
    assert np.array_equal(v.frames[1], np.asarray(Image.fromarray(other).resize((24, 16), Image.Resampling.LANCZOS)))


def test_video_without_audio_writes_without_audio(tmp_path):
    src = write_clip(tmp_path / "a.mp4", moving_frames(4, 16, 24))
    v = read_video(src)
    assert v.audio_source is None
    out = write_video(tmp_path / "b.mkv", v.frames, v.fps, v.audio_source)
    with av.open(out) as c:
        assert not c.streams.audio


def test_frame_conversions_work_in_pieces_and_keep_the_values():
    """uint8 <-> float without full-video temporaries gives what the one-shot formulas give."""
    import torch

    from tokenflow.video import to_tensor, to_uint8

    f = torch.rand(37, 3, 8, 16, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # out of range too
    whole = (f.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(to_uint8(f, chunk=5), whole)  # 37 frames: the last piece is short
    u = np.random.default_rng(0).integers(0, 256, (4, 8, 16, 3), dtype=np.uint8)[:, ::-1]  # negative strides
    assert torch.equal(to_tensor(u), torch.from_numpy(u.copy()).permute(0, 3, 1, 2).float() / 255)
