"""s4fusion: the S4Fusion infrared-visible image fusion network, its training,
evaluation and tools."""

from .api import default_weights, fuse, fuse_images
from .models import S4Fusion, S4FusionConfig

__version__ = "0.1.0"

__all__ = ["S4Fusion", "S4FusionConfig", "fuse", "fuse_images", "default_weights", "__version__"]
