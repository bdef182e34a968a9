"""End-to-end edits on the tiny model."""

import pytest
import torch

from tokenflow import EditConfig
from tokenflow.errors import TokenFlowError
from tokenflow.keyframes import FixedKeyframes, RandomKeyframes, ScheduledKeyframes

from conftest import moving_frames

FAST = dict(steps=4, inversion_steps=4, use_cache=False, progress=False, height=32, width=48)


@pytest.fixture(scope="module")
def frames10():
    return moving_frames(10, 32, 48)


@pytest.mark.parametrize("editor, propagation", [("pnp", "original"), ("pnp", "paper"),
                                                 ("sdedit", "original"), ("sdedit", "paper")])
def test_edit_any_frame_count_non_square(tiny_pipe, frames10, editor, propagation):
    r = tiny_pipe.edit(frames10, "a robot", editor=editor, propagation=propagation, batch_size=4,
                       return_latents=True, **FAST)
    assert r.frames.shape == (10, 3, 32, 48)  # 10 frames in batches of 4: nothing dropped
    assert torch.isfinite(r.frames).all() and r.frames.min() >= 0 and r.frames.max() <= 1
    n_steps = 4 if editor == "pnp" else EditConfig(steps=4, sdedit_start=0.9).sdedit_steps()
    assert len(r.keyframes) == n_steps == len(r.timesteps) == len(r.latents) - 1
    for kf in r.keyframes:  # one keyframe in each interval, the short last one included
        assert [k // 4 for k in kf] == [0, 1, 2] and kf[2] < 10


def test_edit_is_reproducible_and_seed_changes_keyframes(tiny_pipe, frames10):
    a = tiny_pipe.edit(frames10, "a robot", batch_size=4, seed=3, **FAST)
    b = tiny_pipe.edit(frames10, "a robot", batch_size=4, seed=3, **FAST)
    c = tiny_pipe.edit(frames10, "a robot", batch_size=4, seed=4, **FAST)
    assert torch.equal(a.frames, b.frames) and a.keyframes == b.keyframes
    assert a.keyframes != c.keyframes


def test_the_edit_changes_the_video_and_the_prompt_matters(tiny_pipe, frames10):
    a = tiny_pipe.edit(frames10, "a robot", batch_size=4, **FAST)
    b = tiny_pipe.edit(frames10, "a marble statue", batch_size=4, **FAST)
    assert (a.frames - b.frames).abs().mean() > 1e-4


def test_edit_leaves_the_unet_as_it_was(tiny_pipe, frames10):
    before = dict(tiny_pipe.unet.attn_processors)
    tiny_pipe.edit(frames10, "a robot", batch_size=4, **FAST)
    assert all(tiny_pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_edit_reuses_a_given_inversion(tiny_pipe, frames10):
    r = tiny_pipe.edit(frames10, "a robot", batch_size=4, **FAST)
    again = tiny_pipe.edit(frames10, "a robot", batch_size=4, inversion=r.inversion, **FAST)
    assert torch.equal(r.frames, again.frames)
    with pytest.raises(TokenFlowError, match="does not match"):
        tiny_pipe.edit(frames10[:6], "a robot", batch_size=4, inversion=r.inversion, **FAST)


def test_fixed_and_scheduled_keyframes(tiny_pipe, frames10, tmp_path):
    assert FixedKeyframes()(0, 10, 4).tolist() == [2, 6, 9]
    r = tiny_pipe.edit(frames10, "a robot", batch_size=4, keyframes="fixed", **FAST)
    assert r.keyframes == [[2, 6, 9]] * 4
    path = tmp_path / "kf.json"
    path.write_text('[[0, 4, 8], [1, 5, 9], [3, 7, 8], [2, 6, 9]]')
    s = tiny_pipe.edit(frames10, "a robot", batch_size=4, keyframe_schedule=str(path), **FAST)
    assert s.keyframes == [[0, 4, 8], [1, 5, 9], [3, 7, 8], [2, 6, 9]]
    path.write_text('[[0, 4], [1, 5, 9]]')
    with pytest.raises(TokenFlowError, match="need 3"):
        tiny_pipe.edit(frames10, "a robot", batch_size=4, keyframe_schedule=str(path), **FAST)


def test_random_keyframes_match_the_official_global_rng_draw():
    torch.manual_seed(1)
    official = [torch.randint(8, (5,)) + torch.arange(0, 40, 8) for _ in range(3)]
    sampler = RandomKeyframes(1)
    assert [sampler(i, 40, 8).tolist() for i in range(3)] == [o.tolist() for o in official]


def test_scheduled_keyframes_reject_out_of_interval_indices():
    with pytest.raises(TokenFlowError, match="one frame of each interval"):
        ScheduledKeyframes([[5, 6]])(0, 8, 4)


def test_sdedit_random_noise(tiny_pipe, frames10):
    r = tiny_pipe.edit(frames10, "a robot", editor="sdedit", sdedit_noise="random", batch_size=4, **FAST)
    assert torch.isfinite(r.frames).all()


def test_tensor_input_and_callback(tiny_pipe):
    frames = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    seen = []
    r = tiny_pipe.edit(frames, "a robot", batch_size=2, callback=lambda *a: seen.append(a), **FAST)
    assert r.frames.shape == (3, 3, 32, 48)
    assert ("editing", 4, 4) in seen and any(s[0] == "inversion" for s in seen)


def test_edit_checks_what_it_is_given(tiny_pipe, tmp_path, caplog):
    """A list of PIL images or uint8 arrays is read as a folder of the same frames is (each frame fitted
    to the first one's working size); an empty list, NaN/inf and floats outside [0, 1] are refused."""
    import numpy as np
    from PIL import Image

    frames = moving_frames(3, 32, 48)
    images = [Image.fromarray(frames[0]), Image.fromarray(frames[1]).resize((64, 40)), Image.fromarray(frames[2])]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")
    config = EditConfig(prompt="a robot", height=32, width=48, steps=2, inversion_steps=2)
    with caplog.at_level("WARNING", logger="tokenflow"):
        from_list = tiny_pipe.load_video(images, config)
    assert "changes size midway" in caplog.text  # as for the folder
    from_folder = tiny_pipe.load_video(str(folder), config)
    assert torch.equal(from_list.frames, from_folder.frames) and from_list.fps == from_folder.fps
    arrays = [np.asarray(im) for im in images]
    assert torch.equal(tiny_pipe.load_video(arrays, config).frames, from_folder.frames)
    result = tiny_pipe.edit(images, config=config, use_cache=False, progress=False)
    assert result.frames.shape == (3, 3, 32, 48) and torch.isfinite(result.frames).all()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # the full range
    nan = x.clone()
    nan[1, 0, 2, 3] = float("nan")
    cases = [
        ([], "the frame list is empty"),
        ([arrays[0], arrays[1].astype(np.float32)], "frame 1 of the list is a float32 array"),
        ([images[0], "frame.png"], "frame 1 of the list is a str"),
        (nan, "1 NaN or infinite values (the first in frame 1)"),
        (x * 255, "values lie in [0, 255]; expected [0, 1]; divide 0..255 values by 255"),
        (x * 2 - 1, "values lie in [-1, 1]; expected [0, 1]; map -1..1 values by (x + 1) / 2"),
        (x.permute(0, 2, 3, 1).numpy() * 255, "values lie in [0, 255]; expected [0, 1]"),
        (torch.full((2, 3, 32, 48), float("inf")), "NaN or infinite"),
        (x[:0], "has no frames"),
        (12, "video must be a path, a Video, a list of frames"),
    ]
    for video, message in cases:
        with pytest.raises(TokenFlowError) as e:
            tiny_pipe.edit(video, config=config, use_cache=False, progress=False)
        assert message in str(e.value), (message, str(e.value))
