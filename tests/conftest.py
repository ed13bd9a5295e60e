"""Shared pytest fixtures and markers."""
import os

import pytest
import torch

SHARED = os.environ.get(
    'KDZOO_SHARED',
    os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..',
                                 'shared')))


def shared_path(*parts):
    """Path under ../shared, or skip the test when it is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} not present (../shared is development data, '
                    'not part of kdzoo)')
    return path


def pytest_configure(config):
    config.addinivalue_line('markers',
                            'gpu: needs CUDA; skipped on machines without it')
    config.addinivalue_line('markers', 'slow: takes more than ~20 s on CPU')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA (run through the device tool)')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _registrations_stay_in_their_test():
    """Components a test registers (plugins, spies) are unregistered when
    it ends, so registry-wide tests see the same registry in any order."""
    from kdzoo.registry import LISTABLE
    before = {kind: set(registry.module_dict)
              for kind, registry in LISTABLE.items()}
    yield
    for kind, registry in LISTABLE.items():
        for name in set(registry.module_dict) - before[kind]:
            registry._module_dict.pop(name, None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    """SynthFaceAge cache shared by a module's runs (rendered once)."""
    return str(tmp_path_factory.mktemp('synthface_cache'))
