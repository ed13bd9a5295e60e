"""Error types whose messages name the key, file or module path and the fix."""
import difflib
from typing import Iterable, Sequence


class KdzooError(Exception):
    """Base class for errors kdzoo reports to the user as one clear message."""


class ConfigError(KdzooError, ValueError):
    """A recipe or argument is wrong; the message names the key and the fix."""


class DataError(KdzooError, ValueError):
    """A data file or item is unreadable; the message names file and item."""


class CheckpointError(KdzooError, RuntimeError):
    """A checkpoint cannot be loaded; the message names the file and why."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> Sequence[str]:
    """Return up to ``n`` candidates closest to ``name`` (for "did you mean")."""
    candidates = list(candidates)
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.4)
    if not hits:  # fall back to shared-prefix matches, e.g. 'layer' -> layer1
        hits = [c for c in candidates if c.startswith(name.split('.')[0])][:n]
    return hits


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A ' Did you mean: a, b?' suffix, or '' when nothing is close."""
    hits = closest(name, candidates, n)
    return f" Did you mean: {', '.join(repr(h) for h in hits)}?" if hits else ''


def json_option(option: str, text):
    """A command-line option holding JSON (e.g. a backbone config), parsed;
    ``None`` stays ``None``; bad JSON is a ``ConfigError`` naming the
    option."""
    import json
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f'{option}: invalid JSON ({e.msg} at character '
                          f'{e.pos}): {text!r}; e.g. \'{{"type": "IResNet", '
                          '"depth": 50}\'') from None
