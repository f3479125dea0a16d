"""The model registry: packages by name and version, and a champion alias moved by compare-and-swap."""

from ..core.lazy import exports

__all__ = ["Decision", "PromoteConfig", "PromotionRaceError", "RegistryError", "decide", "promote", "read_alias",
           "register", "resolve", "version_uri"]
__getattr__, __dir__ = exports(__name__, {
    "register": ".store", "promote": ".promotion", "PromoteConfig": ".config", "Decision": ".promotion",
    "PromotionRaceError": ".promotion", "decide": ".promotion", "resolve": "..model.refs",
    "read_alias": "..model.refs", "version_uri": "..model.refs", "RegistryError": "..model.refs"})
