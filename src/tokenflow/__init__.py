"""TokenFlow: consistent diffusion features for consistent video editing (ICLR 2024)."""

from .config import EditConfig
from .errors import TokenFlowError
from .flow import FlowPipeline
from .inversion import Inversion
from .pipeline import EditResult, TokenFlowPipeline
from .video import Video, read_video, write_frames, write_video

__version__ = "0.1.0"

__all__ = ["TokenFlowPipeline", "FlowPipeline", "EditConfig", "EditResult", "Inversion", "TokenFlowError",
           "Video", "read_video", "write_video", "write_frames", "__version__"]
