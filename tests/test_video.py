import os
from fractions import Fraction
from typing import Optional

import av
import numpy as np
import pytest
from PIL import Image

from tokenflow.errors import TokenFlowError
from tokenflow.video import (default_size, fit_frames, probe_video, read_video, resize_frame, resize_frames,
                             working_size, write_frames, write_video)

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


# --------------------------------------------------------------------------- issue 24: media that read wrong
def _tone(seconds: float, rate: int = 16000, burst: Optional[tuple[float, float]] = None) -> np.ndarray:
    """(1, S) float32 mono: a quiet 330 Hz tone, or silence with a loud burst over ``burst`` seconds."""
    t = np.arange(int(rate * seconds)) / rate
    if burst is None:
        return (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None]
    on = (t >= burst[0]) & (t < burst[1])
    return (0.8 * np.sin(2 * np.pi * 440 * t) * on).astype(np.float32)[None]


def _mux_audio(out, samples: np.ndarray, rate: int = 16000, codec: str = "aac"):
    """An audio stream for ``samples`` and its frames, to encode after the video."""
    a = out.add_stream(codec, rate=rate)
    frames = []
    for i in range(0, samples.shape[1], 1024):
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i:i + 1024]), format="flt", layout="mono")
        af.sample_rate, af.pts, af.time_base = rate, i, Fraction(1, rate)
        frames.append(af)
    return a, frames


def write_timed(path, frames: np.ndarray, times, audio=(), codec: str = "libx264", audio_codec: str = "aac") -> str:
    """A clip whose frames are shown at ``times`` (seconds, on a millisecond clock: any spacing), with
    an audio track for each array in ``audio``. The header's rate is the nominal 30 fps a phone writes."""
    tb = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        v = out.add_stream(codec, rate=30)
        v.height, v.width, v.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        v.codec_context.time_base = tb
        tracks = [_mux_audio(out, a, codec=audio_codec) for a in audio]
        pts = [int(round(t * 1000)) for t in times]
        shown = dict(zip(pts, np.diff(pts + [pts[-1] + 100]).tolist()))  # how long each shows; the last 0.1 s

        def mux(packets):
            for packet in packets:
                packet.duration = shown.get(packet.pts, 0)
                out.mux(packet)

        for f, t in zip(frames, pts):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = t, tb
            mux(v.encode(vf))
        mux(v.encode())
        for stream, audio_frames in tracks:
            for af in audio_frames:
                out.mux(stream.encode(af))
            out.mux(stream.encode())
    return str(path)


def _first_bright_frame_time(path) -> float:
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.video[0]):
            if f.to_ndarray(format="rgb24").mean() > 128:
                return float(f.time)
    raise AssertionError("no bright frame")


def _first_loud_time(path) -> float:
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.audio[0]):
            loud = np.flatnonzero(np.abs(f.to_ndarray()[0]) > 0.3)
            if len(loud):
                return float(f.time) + loud[0] / f.sample_rate
    raise AssertionError("no loud audio")


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_frame_rate_clip_keeps_its_length_and_audio_sync(tmp_path, ext, caplog):
    # a phone clip: 12 frames at 30 fps, then 10 at 10 fps (low light); 1.4 s in all. A white
    # frame at 1.0 s and a beep at 1.0 s: they must stay together
    times = [i / 30 for i in range(12)] + [0.4 + i / 10 for i in range(10)]
    frames = np.zeros((22, 64, 64, 3), np.uint8)
    frames[times.index(1.0)] = 255
    clip = write_timed(tmp_path / f"vfr.{ext}", frames, times, audio=[_tone(1.4, burst=(1.0, 1.2))])
    with caplog.at_level("INFO", logger="tokenflow"):
        v = read_video(clip)
    assert len(v.frames) / v.fps == pytest.approx(1.4, abs=1 / v.fps)  # as long as the input, within a frame
    out = write_video(tmp_path / "out.mp4", v.frames, v.fps, v.audio_source, audio_start=v.start_time)
    with av.open(out) as c:
        s = c.streams.video[0]
        video_s = s.frames / float(s.average_rate)
        audio_s = sum(f.samples for f in c.decode(c.streams.audio[0])) / 16000
    assert video_s == pytest.approx(1.4, abs=1 / v.fps)
    assert audio_s == pytest.approx(video_s, abs=0.07)  # one AAC frame
    assert _first_bright_frame_time(out) == pytest.approx(_first_loud_time(out), abs=1 / v.fps)
    assert "variable frame rate" in caplog.text and "truncated" not in caplog.text


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of the ISO-BMFF boxes in data[start:end]."""
    import struct

    out = []
    while start < end:
        size, kind = struct.unpack(">I4s", data[start:start + 8])
        out.append((kind, start, start + size))
        start += size
    return out


def write_with_cover(path, frames: Optional[np.ndarray]) -> str:
    """An mp4 with cover art (a PNG stream, disposition attached_pic) that readers list before
    the video: its 'udta' box moved ahead of the tracks in 'moov', as some taggers write it.
    Without frames: a song with its cover (AAC audio and the picture)."""
    with av.open(str(path), "w") as out:
        cover = out.add_stream("png")
        cover.width = cover.height = 32
        cover.pix_fmt, cover.disposition = "rgb24", av.stream.Disposition.attached_pic
        if frames is None:
            audio, audio_frames = _mux_audio(out, _tone(0.5))
        else:
            v = out.add_stream("libx264", rate=12)
            v.height, v.width, v.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        art = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24")
        out.mux(list(cover.encode(art)) + list(cover.encode()))
        if frames is None:
            out.mux([p for af in audio_frames for p in audio.encode(af)] + list(audio.encode()))
        else:
            out.mux([p for f in frames for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24"))])
            out.mux(v.encode())
    data = open(path, "rb").read()
    _, start, end = next(b for b in _boxes(data, 0, len(data)) if b[0] == b"moov")
    children = sorted(_boxes(data, start + 8, end), key=lambda b: {b"mvhd": 0, b"udta": 1}.get(b[0], 2))
    moov = data[start:start + 8] + b"".join(data[a:b] for _, a, b in children)  # same size: offsets hold
    open(path, "wb").write(data[:start] + moov + data[end:])
    return str(path)


def test_cover_picture_is_skipped_for_the_video(tmp_path):
    frames = moving_frames(6, 64, 64)
    clip = write_with_cover(tmp_path / "cover.mp4", frames)
    with av.open(clip) as c:  # the file is what the issue describes: the artwork first
        assert c.streams.video[0].disposition & av.stream.Disposition.attached_pic
    v = read_video(clip)
    assert v.frames.shape == (6, 64, 64, 3) and probe_video(clip).size == (64, 64)
    assert np.abs(v.frames.astype(int) - frames).mean() < 12 and v.frames.std() > 30  # the video, not the flat cover
    assert probe_video(clip).n_frames == 6
    song = write_with_cover(tmp_path / "song.mp4", None)  # a picture, but no video to edit
    for read in (read_video, probe_video):
        with pytest.raises(TokenFlowError, match="only picture is a cover") as e:
            read(song)
        assert "\n" not in str(e.value)


def test_non_square_pixels_are_read_as_shown(tmp_path, caplog):
    # DVD-style: 72x48 stored with a sample aspect ratio of 8:9 is a 4:3 picture (64x48 as shown).
    # A block 18 pixels wide and 16 high is a square on screen.
    frames = np.zeros((4, 48, 72, 3), np.uint8)
    frames[:, 16:32, 27:45] = 255
    with av.open(str(tmp_path / "sar.mp4"), "w") as out:
        v = out.add_stream("libx264", rate=12)
        v.width, v.height, v.pix_fmt = 72, 48, "yuv420p"
        v.codec_context.sample_aspect_ratio = Fraction(8, 9)
        out.mux([p for f in frames for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24"))])
        out.mux(v.encode())
    clip = str(tmp_path / "sar.mp4")
    assert probe_video(clip).size == (48, 64)
    seen = []
    with caplog.at_level("INFO", logger="tokenflow"):
        v = read_video(clip, size=lambda hw: seen.append(hw) or (48, 64))
    assert seen == [(48, 64)] and v.source_size == (48, 64)  # the working size follows the shown aspect
    rows, cols = np.nonzero(v.frames[0, ..., 0] > 128)
    assert abs((cols.max() - cols.min()) - (rows.max() - rows.min())) <= 2  # square, as a player shows it
    assert "non-square pixels (sample aspect ratio 8/9)" in caplog.text
    assert read_video(clip).frames.shape == (4, 48, 64, 3)  # unfitted too: square pixels


def test_resize_frame_fits_the_shown_aspect_of_non_square_pixels():
    frame = np.full((48, 72, 3), 255, np.uint8)  # 72x48 at 8:9 is 64x48 as shown
    padded = resize_frame(frame, 64, 64, "pad", pixel_aspect=8 / 9)
    assert padded[:8].max() == 0 and padded[-8:].max() == 0 and padded[8:56].min() == 255  # bars above and below
    cropped = resize_frame(np.arange(72, dtype=np.uint8)[None, :, None].repeat(48, 0).repeat(3, 2), 48, 48, "crop",
                           pixel_aspect=8 / 9)
    assert abs(int(cropped[0, 0, 0]) - 9) <= 1 and abs(int(cropped[0, -1, 0]) - 62) <= 1  # 54 stored columns kept
    assert resize_frame(frame, 48, 72, "pad", pixel_aspect=8 / 9)[:, :4].max() == 0  # same size, other aspect: padded


def write_edit_list(path, frames: np.ndarray, cut: float) -> str:
    """An mp4 whose edit list starts ``cut`` seconds into its samples, as a trimmed clip has: the
    sample table (nb_frames) still counts the frames before the cut."""
    whole = write_clip(str(path) + ".whole.mp4", frames, fps=12)
    with av.open(whole) as src, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is None:
                continue
            shift = int(round(cut / packet.time_base))
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
            out.mux(packet)
    return str(path)


HEALTHY = {  # name: (make(tmp_path) -> path, frames a player shows)
    "VP9 WebM, audio longer than the video": (lambda d: write_timed(
        d / "a.webm", moving_frames(12, 64, 64), [i / 12 for i in range(12)], audio=[_tone(1.5)],
        codec="libvpx-vp9", audio_codec="libopus"), 12),
    "mp4 with an edit list": (lambda d: write_edit_list(d / "a.mp4", moving_frames(30, 64, 64), cut=0.5), 24),
    "two audio tracks": (lambda d: write_timed(
        d / "a.mkv", moving_frames(12, 64, 64), [i / 12 for i in range(12)], audio=[_tone(1.0), _tone(1.6)]), 12),
    "variable frame rate": (lambda d: write_timed(
        d / "a.mkv", moving_frames(16, 64, 64), [i / 30 for i in range(8)] + [0.3 + i / 10 for i in range(8)]), 16),
}


@pytest.mark.parametrize("case", list(HEALTHY))
def test_healthy_files_are_not_called_damaged(tmp_path, caplog, case):
    make, shown = HEALTHY[case]
    clip = make(tmp_path)
    with caplog.at_level("WARNING", logger="tokenflow"):
        v = read_video(clip)
        assert probe_video(clip).n_frames == len(v.frames) == shown
    assert caplog.text == ""  # neither "truncated or damaged" nor frames lost


def write_lying_header(path, seconds: float = 2.0, claims_hours: float = 1000) -> str:
    """A 2 s Matroska clip with audio whose header (the segment's duration and the video track's
    DURATION tag) claims ``claims_hours`` hours."""
    import struct

    clip = write_clip(path, moving_frames(int(12 * seconds), 64, 64), fps=12, audio=True)
    data = bytearray(open(clip, "rb").read())
    at = data.index(b"\x44\x89")  # the segment's Duration element: 8-byte float in milliseconds
    assert data[at + 2] == 0x88
    data[at + 3:at + 11] = struct.pack(">d", claims_hours * 3600 * 1000)
    tag = f"00:00:{seconds:02.0f}.000000000".encode()
    claim = f"{claims_hours:.0f}:00:00.".ljust(len(tag), "0").encode()
    assert len(claim) == len(tag) and data.count(tag) >= 1
    open(clip, "wb").write(bytes(data).replace(tag, claim))
    return clip


def test_lying_header_is_not_refused_for_disk_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from tokenflow.config import EditConfig
    from tokenflow.preflight import check_free_space

    clip = write_lying_header(tmp_path / "liar.mkv")
    with av.open(clip) as c:  # the header does claim 1000 hours
        assert c.duration / 1e6 / 3600 == pytest.approx(1000)
    info = probe_video(clip)
    assert info.n_frames == 24 and info.fps == 12  # counted from the packets, not taken from the header
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, 0, 200 << 20))  # 200 MB free
    check_free_space(info, EditConfig(prompt="x"), str(tmp_path / "out.mp4"), None, None)  # 24 frames fit
    assert len(read_video(clip).frames) == 24


def test_corrupt_packet_in_the_middle_is_skipped(tmp_path, caplog):
    frames = moving_frames(30, 64, 64)
    whole = write_clip(tmp_path / "whole.mp4", frames, fps=12)
    clip = tmp_path / "corrupt.mp4"
    with av.open(whole) as src, av.open(str(clip), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        packets = [p for p in src.demux(src.streams.video[0]) if p.size]
        for i, packet in enumerate(packets):
            if i == 14:  # one packet of garbage, as a bad sector or a broken download gives
                junk = av.Packet(b"\xff" * packet.size)
                junk.pts, junk.dts, junk.time_base = packet.pts, packet.dts, packet.time_base
                packet = junk
            packet.stream = stream
            out.mux(packet)
    with caplog.at_level("WARNING", logger="tokenflow"):
        v = read_video(clip)
    assert len(v.frames) == 30 and v.fps == 12  # the lost frame's neighbour stands in: the timing holds
    assert "1 of 30 frames could not be decoded" in caplog.text and "truncated" not in caplog.text
    # decoding went on past the damage: the last frames are the clip's own (not a frozen copy)
    assert np.abs(v.frames[-1].astype(int) - frames[-1]).mean() < np.abs(v.frames[-1].astype(int) - frames[12]).mean()
