#!/usr/bin/env python3
"""Cut the bundled demo clip from the official repository's wolf.mp4 (MIT licence).

    python scripts/make_demo_clip.py ../shared/data/wolf.mp4 src/tokenflow/data/demo.mp4

24 frames, a 16:9 crop at 448x256, 20 fps, H.264, with a quiet 440 Hz AAC tone so that the
demo also shows the audio being carried over.
"""
import sys
from fractions import Fraction

import av
import numpy as np
from PIL import Image


def main(src: str, dst: str, n_frames: int = 24, size=(448, 256)) -> None:
    with av.open(src) as c:
        stream = c.streams.video[0]
        fps = stream.average_rate or Fraction(20)
        frames = []
        for frame in c.decode(stream):
            img = frame.to_image()
            w, h = img.size
            crop_h = round(w * size[1] / size[0])
            top = (h - crop_h) // 2
            frames.append(np.asarray(img.crop((0, top, w, top + crop_h)).resize(size, Image.Resampling.LANCZOS)))
            if len(frames) == n_frames:
                break
    with av.open(dst, "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        v.options = {"crf": "26", "preset": "veryslow"}
        a = out.add_stream("aac", rate=22050)
        a.bit_rate = 24000
        for f in frames:
            out.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(v.encode())
        seconds = n_frames / float(fps)
        t = np.arange(int(22050 * seconds)) / 22050
        tone = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for i in range(0, tone.shape[1], 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, i:i + 1024]), format="flt", layout="mono")
            af.sample_rate = 22050
            out.mux(a.encode(af))
        out.mux(a.encode())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
