"""qmailtx: a qmail-style mail server for Twisted.

Embedding::

    from qmailtx import loadConfig, makeMailService
    makeMailService(reactor, loadConfig("qmailtx.toml")).setServiceParent(application)
"""

from typing import TYPE_CHECKING, Any

from qmailtx.config import ConfigError, defaultConfig, loadConfig, parseConfig

if TYPE_CHECKING:
    from qmailtx.service import makeMailService


def __getattr__(name: str) -> Any:
    # The server is imported on first use, so qmailctl starts without it.
    if name == "makeMailService":
        from qmailtx.service import makeMailService

        return makeMailService
    raise AttributeError(f"module 'qmailtx' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "defaultConfig",
    "loadConfig",
    "makeMailService",
    "parseConfig",
    "__version__",
]
