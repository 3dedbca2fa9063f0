"""One exception family, so the CLI can print a single clear line instead of a traceback."""


class FeatstackError(Exception):
    """Base class for user-facing errors: the message names the file, field or row at fault."""


class ConfigError(FeatstackError):
    """Bad command-line option, pipeline key or argument."""


class DataError(FeatstackError):
    """A data source (folder, manifest, arrays) that cannot be read as described."""


class BackboneError(FeatstackError):
    """Unknown model name, missing weights file, unreachable hub."""


class CacheError(FeatstackError):
    """A cache file that is missing, incomplete, corrupt or of another format."""


class CacheMismatchError(CacheError):
    """A cache whose fingerprint differs from what the caller expects (stale or other data)."""
