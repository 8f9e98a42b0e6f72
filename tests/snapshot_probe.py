"""Load snapshots in a foreign code tree and run their networks (used by tests/test_snapshot_compat.py).

    python -I tests/snapshot_probe.py ROOT REPO OUT SNAPSHOT.pkl...

ROOT is the only code tree on sys.path: a tree of stand-ins with the official module names, or an export of
the official repository. The script imports nothing but the standard library and torch itself, so that the
networks can reach only what ROOT provides plus the source embedded in the pickles. It writes the outputs of
every network of every snapshot to OUT (torch.save) and fails if any module was loaded from REPO (our tree).
The test imports `network_outputs` from here too, so both sides compute exactly the same things.
"""

import os
import sys

import torch


def _inputs(seed: int, *shape) -> torch.Tensor:
    return torch.randn(list(shape), generator=torch.Generator().manual_seed(seed))


def _labels(c_dim: int, batch: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.arange(batch) % max(c_dim, 1), max(c_dim, 1)).float()[:, :c_dim]


@torch.no_grad()
def network_outputs(data: dict) -> dict:
    """{name: tensor}: G and G_ema from fixed z and c (const noise, with and without truncation), D on a fixed
    image (and its decoder, if it has one), the augment pipe with a fixed seed."""
    out = dict()
    for key in ('G', 'G_ema'):
        G = data[key]
        z, c = _inputs(1, 2, G.z_dim), _labels(G.c_dim)
        out[key] = G(z, c, noise_mode='const')
        out[key + '/trunc'] = G(z, c, truncation_psi=0.5, noise_mode='const')
        out[key + '/ws'] = G.mapping(z, c)
    D = data['D']
    img, c = _inputs(2, 2, D.img_channels, D.img_resolution, D.img_resolution), _labels(D.c_dim)
    out['D'] = D(img, c)
    if getattr(D, 'decoder', None) is not None:
        logits, decoded = D(img, c, decode=True)
        out['D/decode/logits'] = logits
        out.update({f'D/decode/{name}': value for name, value in decoded.items()})
    pipe = data.get('augment_pipe')
    if pipe is not None:
        torch.manual_seed(3)
        pipe.p.fill_(0.5)  # The snapshot's p is that of a short run (about 0); 0.5 makes every stage work.
        out['augment_pipe'] = pipe(img)
    return out


def main(root: str, repo: str, out_path: str, pkls: list) -> None:
    sys.path.insert(0, root)
    import training  # Must be ROOT's package: a check that nothing else is on the path.
    assert os.path.dirname(os.path.abspath(training.__file__)) == os.path.join(os.path.abspath(root), 'training')
    if os.path.exists(os.path.join(root, 'legacy.py')):
        import legacy  # An official export: load as the official scripts do.
        load = legacy.load_network_pkl
    else:
        import pickle
        load = pickle.load
    outputs = dict()
    for path in pkls:
        with open(path, 'rb') as f:
            data = load(f)
        outputs[path] = network_outputs(data)
    repo = os.path.abspath(repo)
    ours = sorted(name for name, module in sys.modules.items()
                  if os.path.abspath(getattr(module, '__file__', None) or '/').startswith(repo + os.sep)
                  and os.path.abspath(module.__file__) != os.path.abspath(__file__))
    assert not ours, f'modules loaded from our tree: {ours}'
    torch.save(outputs, out_path)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
