"""rsflow: remote-sensing vision-language models over STAC imagery, at cluster scale, on Ray."""

from rsflow.errors import ModelError, RequestError, RsflowError, SourceError

__all__ = ["ModelError", "RequestError", "RsflowError", "SourceError", "__version__"]
__version__ = "0.1.0"
