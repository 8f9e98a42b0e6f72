"""Shared pytest setup: skip `cuda` tests without a GPU, keep every cache inside a temporary directory."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True, scope='session')
def _isolated_cache_dir(tmp_path_factory):
    """Downloads, dataset statistics and compiled extensions go to a fresh directory, never to ~/.cache."""
    cache_dir = str(tmp_path_factory.mktemp('dnnlib-cache'))
    saved = os.environ.get('DNNLIB_CACHE_DIR')
    os.environ['DNNLIB_CACHE_DIR'] = cache_dir
    yield cache_dir
    if saved is None:
        del os.environ['DNNLIB_CACHE_DIR']
    else:
        os.environ['DNNLIB_CACHE_DIR'] = saved


@pytest.fixture(autouse=True, scope='session')
def _system_malloc():
    """The scripts make malloc keep large freed blocks (runner/host_memory.py); in this one long-lived process,
    which runs many of them in-process, that would be state no test can undo. tests/test_host_memory.py runs the
    setting in subprocesses of its own."""
    saved = os.environ.get('STYLEGAN_HOST_MALLOC')
    os.environ['STYLEGAN_HOST_MALLOC'] = 'system'
    yield
    if saved is None:
        del os.environ['STYLEGAN_HOST_MALLOC']
    else:
        os.environ['STYLEGAN_HOST_MALLOC'] = saved


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of tiny convolutions: on a busy 2-core machine they run far faster on one
    thread than on several competing for the cores. Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
