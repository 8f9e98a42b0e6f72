"""The regularizers of D, `train.py --reg=<name>[,<name>...]`: the twin of networks.SYNTHESIS_BLOCKS.

A regularizer is one module of this package with a `Regularizer` subclass (training/regularizers/term.py): the
loss term itself and the options it declares. Registering it here is all train.py needs: `--reg` offers its
name, its flags appear with their defaults and help, a flag given without it is refused, and its plan writes
its part of the options tree and of the run name.
"""

from typing import Dict, List, Tuple

import dnnlib
from training.flags import Option

# Kept importable from here: runs recorded before the package split name these in their options and states.
from training.regularizers.ggdr import GGDRTerm, cosine_distance  # noqa: F401
from training.regularizers.glead import GLEAD_FAKE_BRANCHES, GLeaDTerm, resolve_lpips_weights  # noqa: F401

# --reg name -> the dotted name of its Regularizer class, which the options tree records as the term's class_name.
REGULARIZERS = {
    'ggdr':     'training.regularizers.GGDRTerm',
    'glead':    'training.regularizers.GLeaDTerm',
    'lecam':    'training.regularizers.lecam.LeCamTerm',
}


def regularizer_class(name: str) -> type:
    """The class registered as `name`, or a ValueError listing the valid names."""
    if name not in REGULARIZERS:
        raise ValueError(f'Unknown regularizer {name!r}; valid choices: {", ".join(REGULARIZERS)}')
    return dnnlib.util.get_obj_by_name(REGULARIZERS[name])


def regularizer_options() -> Dict[str, Tuple[Option, Tuple[str, ...]]]:
    """The options of every registered regularizer: name -> (Option, names of the regularizers that declare it),
    in registry order. Read at call time, so a regularizer registered later is included."""
    options = dict()
    for reg in REGULARIZERS:
        for option in regularizer_class(reg).options:
            known, owners = options.get(option.name, (option, ()))
            assert known == option, f'Two regularizers declare the option {option.name!r} differently'
            options[option.name] = (option, owners + (reg,))
    return options


def parse_regularizers(value: str) -> List[str]:
    """'lecam,ggdr' -> ['lecam', 'ggdr']; 'none' or '' -> []. Raises ValueError naming an unknown or repeated one."""
    names = [name.strip() for name in (value or '').split(',') if name.strip()]
    if names == ['none']:
        return []
    for i, name in enumerate(names):
        if name not in REGULARIZERS:
            raise ValueError(f'unknown regularizer {name!r}; valid choices: none, {", ".join(REGULARIZERS)} '
                             f'(a comma-separated list combines them)')
        if name in names[:i]:
            raise ValueError(f'{name} is listed twice')
    return names
