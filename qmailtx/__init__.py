"""qmailtx: a qmail-style mail server for Twisted.

Embedding::

    from qmailtx import loadConfig, makeMailService
    makeMailService(reactor, loadConfig("qmailtx.toml")).setServiceParent(application)
"""

from qmailtx.config import ConfigError, defaultConfig, loadConfig, parseConfig
from qmailtx.service import makeMailService

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "defaultConfig",
    "loadConfig",
    "makeMailService",
    "parseConfig",
    "__version__",
]
