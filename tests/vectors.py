"""Access to the reference tensors in `../shared/vectors` (see the README there).

The directory sits beside the repository on CI and on the project's machines; `STYLEGAN_VECTORS_DIR`
points elsewhere. Without it the vector tests have nothing to compare against:
`test_reference_vectors_are_present` then fails on CI and is skipped elsewhere.
"""

import functools
import json
import os

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS_DIR = os.environ.get('STYLEGAN_VECTORS_DIR') or os.path.join(REPO_ROOT, '..', 'shared', 'vectors')


def available() -> bool:
    return os.path.isfile(os.path.join(VECTORS_DIR, 'ops_cases.json'))


@functools.lru_cache(maxsize=None)
def _all_op_cases() -> tuple:
    if not available():
        return ()
    with open(os.path.join(VECTORS_DIR, 'ops_cases.json')) as f:
        return tuple(json.load(f))


def op_cases(op: str) -> list:
    """The cases of one op (e.g. 'upfirdn2d'), for `pytest.mark.parametrize`; [] without the vectors."""
    return [case for case in _all_op_cases() if case['op'] == op]


def case_id(case: dict) -> str:
    return case['id']


@functools.lru_cache(maxsize=None)
def op_tensors() -> dict:
    """Every tensor of `ops_io.pt`, keyed `<case id>.<name>`."""
    return torch.load(os.path.join(VECTORS_DIR, 'ops_io.pt'), weights_only=True)


def case_inputs(case: dict) -> dict:
    """The tensor inputs of a case (None where the case passes None); clones, so tests may modify them."""
    tensors = op_tensors()
    return {name: (None if key is None else tensors[key].clone()) for name, key in case['inputs'].items()}


def case_output(case: dict) -> torch.Tensor:
    return op_tensors()[case['output']]


def tolerances(case: dict) -> dict:
    """assert_close tolerances from the vectors README: 1e-5 for float32, 1e-10 for float64."""
    tol = 1e-10 if case['dtype'] == 'float64' else 1e-5
    return dict(atol=tol, rtol=tol)


@functools.lru_cache(maxsize=None)
def network_file(name: str):
    """A network vector file such as 'tinyA_G.pt' or 'tinyA_kwargs.json'."""
    path = os.path.join(VECTORS_DIR, name)
    if name.endswith('.json'):
        with open(path) as f:
            return json.load(f)
    return torch.load(path, weights_only=True)
