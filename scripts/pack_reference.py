#!/usr/bin/env python3
"""Pack a harness output folder into the small arrays tests/data/official/ holds.

    python scripts/pack_reference.py REF_RUN tests/data/official
"""
import json
import os
import shutil
import sys

import numpy as np


def main(ref: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(ref, "input_frames_u8.npy"), os.path.join(out, "input_frames_u8.npy"))
    inv = np.load(os.path.join(ref, "inverted_latents.npz"))
    x0 = np.load(os.path.join(ref, "pnp", "init_tensors.npz"))["latents"]
    np.savez_compressed(os.path.join(out, "inverted_latents.npz"), x0=x0, **{k: inv[k] for k in inv.files})
    meta = json.load(open(os.path.join(ref, "meta.json")))
    for mode in ("pnp", "sdedit"):
        src = os.path.join(ref, mode)
        pivots = json.load(open(os.path.join(src, "pivots.json")))
        config = json.load(open(os.path.join(src, "config_used.json")))
        np.savez_compressed(
            os.path.join(out, f"{mode}.npz"),
            latents_per_step=np.load(os.path.join(src, "latents_per_step.npy")),
            edited_frames=np.load(os.path.join(src, "edited_frames.npy")).astype(np.float16),
            timesteps=np.load(os.path.join(src, "init_tensors.npz"))["timesteps"])
        with open(os.path.join(out, f"{mode}_keyframes.json"), "w") as f:
            json.dump({"seed": pivots["seed"], "steps": [{"t": s["t"], "keyframes": s["pivotal_idx"]}
                                                         for s in pivots["steps"]], "config": config}, f, indent=1)
    keep = {k: meta[k] for k in ("args", "versions", "official_file_blob_sha1", "model_sha256",
                                 "input_sha256", "torch_threads", "stages", "total_wall_s") if k in meta}
    from tokenflow.tiny import build_tiny_components
    from tokenflow.models import module_identity

    c = build_tiny_components(seed=0)
    keep["tiny_model_identity"] = module_identity(c.unet, c.vae, c.text_encoder)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(keep, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
