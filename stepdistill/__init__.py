"""stepdistill: distil multi-step diffusion and flow models into one-to-four-step students."""

__version__ = "0.1.0"

from .denoiser import Denoiser  # noqa: E402
from .errors import ConfigError, StepdistillError  # noqa: E402
from .flow_conversion import VPAsFlow, VPPipelineFlowMatchScheduler  # noqa: E402,F401  (loading a saved flow student of a VP teacher needs it imported)
from .pipelines import ClassConditionalPipeline, FlowGridScheduler  # noqa: E402
from .teacher import Teacher, load_teacher  # noqa: E402

__all__ = ["Denoiser", "ClassConditionalPipeline", "FlowGridScheduler", "VPAsFlow", "Teacher", "load_teacher",
           "ConfigError", "StepdistillError",
           "__version__"]
