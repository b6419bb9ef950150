"""twistd glue: ``twistd -n qmailtx [--config FILE]``. The one module using the global reactor."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from qmailtx.config import Config, ConfigError, defaultConfig, loadConfig
from qmailtx.service import makeMailService, prepareDataDirectory


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the qmailtx mail server. Without --config, built-in defaults are used: "
        "SMTP on 127.0.0.1:2525 and data in ./var (see etc/qmailtx.toml)."
    )
    optParameters = [["config", "c", None, "TOML configuration file"]]

    config: Config

    def postOptions(self) -> None:
        try:
            path = self["config"]
            self.config = loadConfig(path) if path else defaultConfig()
            prepareDataDirectory(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    try:
        return makeMailService(reactor, options.config)
    except ConfigError as e:
        raise usage.UsageError(str(e)) from e
