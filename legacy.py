"""Snapshot loading and conversion where official scripts and third-party tools look for it: `import legacy`.

Everything lives in training/legacy.py; this module re-exports it, so that

    import legacy
    with dnnlib.util.open_url(url) as f:
        G = legacy.load_network_pkl(f)['G_ema']

works as with the official code base (plus `legacy.load_network(url)`, which also adopts official networks
into this code base's classes). As a script it is the official converter:

    python legacy.py --source=stylegan2-ffhq-config-f.pkl --dest=ffhq.pkl [--force-fp16=BOOL] [--adopt=BOOL]
"""

from typing import Any

from training import legacy as _legacy
from training.legacy import (
    TFNetworkStub,
    adopt_network,
    adopt_snapshot,
    convert,
    convert_network_pickle,
    convert_tf_discriminator,
    convert_tf_generator,
    convert_tf_snapshot,
    load_network,
    load_network_pkl,
    load_weights_only,
    save_network_pkl,
    save_weights_only,
)

__all__ = [
    'TFNetworkStub', 'adopt_network', 'adopt_snapshot', 'convert', 'convert_network_pickle',
    'convert_tf_discriminator', 'convert_tf_generator', 'convert_tf_snapshot', 'load_network', 'load_network_pkl',
    'load_weights_only', 'save_network_pkl', 'save_weights_only',
]


def __getattr__(name: str) -> Any:
    """Everything else of training.legacy too (e.g. `legacy._TFNetworkStub`, the official stand-in's name)."""
    return getattr(_legacy, name)


if __name__ == '__main__':
    convert_network_pickle()
