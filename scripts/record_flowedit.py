"""Record the official FlowEdit's image edits on OUR tiny SD3 and FLUX models, for tests/data/flowedit/.

    FLOWEDIT_DIR=<extracted fallenshock/FlowEdit @ 457f402> python scripts/record_flowedit.py \
        [--only NAME,...] [--models DIR] [--out DIR]

The official ``FlowEdit_utils.FlowEditSD3`` / ``FlowEditFLUX`` run unmodified (imported from the
extracted checkout; nothing of it is committed), on a tiny model built by
:mod:`tokenflow.tiny_flow`, with the image handled as the official ``run_script.py`` handles it:
``image_processor.preprocess``, the VAE posterior's mode, ``(z - shift) * scale``, the global torch RNG
seeded right before the edit, decoding with ``postprocess``; the latent handed over contiguous (see below).
FLUX needs the diffusers FlowEdit was written for (its ``FlowEditFLUX`` assumes FluxPipeline's old
``vae_scale_factor`` of 16): run this with ``--only flux,flux_nmin --models DIR`` from a venv with ``diffusers==0.30.1`` and
``transformers==4.44.2`` (``scripts/record_flowedit.sh`` does both). Saved per case: the source frame, the
settings, the edited latents and the edited image (small arrays).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

CASES = [  # (name, family, settings): few steps, so that the tests run in seconds
    ("sd3", "sd3", dict(T_steps=12, n_avg=1, src_guidance_scale=3.5, tar_guidance_scale=13.5, n_min=0, n_max=8,
                        seed=42)),
    ("sd3_avg2", "sd3", dict(T_steps=8, n_avg=2, src_guidance_scale=3.5, tar_guidance_scale=13.5, n_min=0, n_max=5,
                             seed=3)),
    ("flux", "flux", dict(T_steps=10, n_avg=1, src_guidance_scale=1.5, tar_guidance_scale=5.5, n_min=0, n_max=8,
                          seed=10)),
    ("flux_nmin", "flux", dict(T_steps=8, n_avg=1, src_guidance_scale=1.5, tar_guidance_scale=5.5, n_min=2, n_max=6,
                               seed=5)),
]
SOURCE_PROMPT, TARGET_PROMPT = "a wolf in the snow", "a shiny silver robotic wolf"
HEIGHT, WIDTH = 64, 96


def source_frame() -> np.ndarray:
    """A smooth random texture (H, W, 3) uint8, the same every run."""
    rng = np.random.default_rng(7)
    small = (rng.random((HEIGHT // 8, WIDTH // 8, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def load_pipe(kind: str, models: str | None):
    """The tiny model: built in process, or read from ``models/KIND`` (a folder saved by our venv)."""
    if models is None:
        from tokenflow.tiny_flow import build_tiny_pipeline

        return build_tiny_pipeline(kind, seed=0)
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    return cls.from_pretrained(os.path.join(models, kind))


def record(name: str, kind: str, settings: dict, out_dir: str, models: str | None = None) -> None:
    from FlowEdit_utils import FlowEditFLUX, FlowEditSD3  # the official code

    torch.set_num_threads(2)
    pipe = load_pipe(kind, models)
    frame = source_frame()
    image_src = pipe.image_processor.preprocess(Image.fromarray(frame))
    with torch.inference_mode():
        x0_src = (pipe.vae.encode(image_src).latent_dist.mode() - pipe.vae.config.shift_factor) \
            * pipe.vae.config.scaling_factor
    # randn_like draws in the tensor's memory order, and this CPU's VAE returns the posterior's mode as a
    # channels-last view: the official code would then noise a permuted layout. We noise logical
    # (contiguous) order, whatever the layout, so the official function gets the latent contiguous.
    x0_src = x0_src.contiguous()
    torch.manual_seed(settings["seed"])
    edit = FlowEditSD3 if kind == "sd3" else FlowEditFLUX
    args = [settings[k] for k in ("T_steps", "n_avg", "src_guidance_scale", "tar_guidance_scale", "n_min", "n_max")]
    x0_tar = edit(pipe, pipe.scheduler, x0_src, SOURCE_PROMPT, TARGET_PROMPT, "", *args)
    with torch.inference_mode():
        image = pipe.vae.decode(x0_tar / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                return_dict=False)[0]
    image = np.asarray(pipe.image_processor.postprocess(image)[0])
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, f"{name}.npz"), frame=frame, x_src=x0_src.float().numpy(),
                        x_edit=x0_tar.float().numpy(), image=image)
    meta = dict(settings, family=kind, source_prompt=SOURCE_PROMPT, target_prompt=TARGET_PROMPT, negative_prompt="",
                official="fallenshock/FlowEdit@457f402", torch=torch.__version__)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: |x_edit - x_src| mean {float((x0_tar - x0_src).abs().mean()):.4f}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated case names (default: all)")
    parser.add_argument("--models", help="folder with sd3/ and flux/ tiny models saved by our venv")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "flowedit"))
    args = parser.parse_args()
    official = os.environ.get("FLOWEDIT_DIR")
    if not official or not os.path.isfile(os.path.join(official, "FlowEdit_utils.py")):
        sys.exit("set FLOWEDIT_DIR to an extracted checkout of fallenshock/FlowEdit")
    sys.path.insert(0, official)
    only = set(args.only.split(",")) if args.only else None
    for name, kind, settings in CASES:
        if only is None or name in only:
            record(name, kind, settings, args.out, args.models)


if __name__ == "__main__":
    main()
