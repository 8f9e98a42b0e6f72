"""Generic Python utilities (no torch): EasyDict, objects by dotted name, URL opening with a cache, Logger."""

from .util import EasyDict, make_cache_dir_path, set_cache_dir

__all__ = ['EasyDict', 'make_cache_dir_path', 'set_cache_dir']
