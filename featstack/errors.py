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


class BenchError(FeatstackError):
    """A bench in which every configuration failed (a failed cell alone is a row of results.csv)."""


class CacheMismatchError(CacheError):
    """A cache whose fingerprint differs from what the caller expects (stale or other data)."""


def read_format_json(jfile, *, fmt: str, version: int, required, error: type, what: str, hint: str = "") -> dict:
    """Parse the JSON descriptor of a featstack folder (saved model, network) and check its format.

    One place for the checks every such folder needs, so each kind reports the same clear errors:
    missing file, invalid JSON, wrong format name, a newer format version, missing fields.
    """
    import json
    from pathlib import Path

    jfile = Path(jfile)
    try:
        data = json.loads(jfile.read_text())
    except FileNotFoundError:
        raise error(f"{jfile.parent}: not a {what} folder (no {jfile.name}{hint})") from None
    except ValueError as e:
        raise error(f"{jfile}: not valid JSON ({e})") from e
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        raise error(f"{jfile}: field 'format' is {found!r}, expected {fmt!r}")
    if int(data.get("format_version", 0)) > version:
        raise error(f"{jfile}: {what} format {data['format_version']} is newer than this featstack "
                    f"reads ({version})")
    for f in required:
        if f not in data:
            raise error(f"{jfile}: missing field {f!r}")
    return data
