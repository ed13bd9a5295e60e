"""Option parsing shared by the commands."""
import ast

from kdzoo.utils import KdzooError

__all__ = ['parse_key_values']


def parse_key_values(pairs, option: str = '--cfg-options') -> dict:
    """``k=v`` pairs -> dict; values parsed as Python/JSON literals, else
    kept as strings."""
    options = {}
    for pair in pairs or []:
        if '=' not in pair:
            raise KdzooError(f'{option} expects key=value, got {pair!r}')
        key, value = pair.split('=', 1)
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options
