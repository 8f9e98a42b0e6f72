"""Generator names of the bench scripts, spelt as train.py's run names spell them, and their one parser.

    skip, resnet, orig, ...        a block of training.networks.SYNTHESIS_BLOCKS, with its defaults
    squeeze                        the squeeze block with train.py's default r (bench/networks.py: each --squeeze-r)
    squeeze-r<R>                   the squeeze block with r = R (the run-name piece of --squeeze-r=R)
    squeeze-r<R>-<source>          and toRGB reading <source> (--squeeze-torgb, the ablation of Fig. 6)

bench/train.py, bench/networks.py and bench/compare_archs.py read --archs with `parse_arch`.
"""

import re
from typing import List, NamedTuple, Optional

from training.networks import SQUEEZE_TORGB_SOURCES, SYNTHESIS_BLOCKS, synthesis_block_options

_SQUEEZE = re.compile(r'squeeze(?:-r([1-9][0-9]*)(?:-([a-z0-9]+))?)?')


class Arch(NamedTuple):
    arch:   str                 # train.py --arch: a key of SYNTHESIS_BLOCKS.
    r:      Optional[int]       # --squeeze-r; None = not named (train.py's default, or each r of a sweep).
    torgb:  Optional[str]       # --squeeze-torgb; None = not named (the method's own source, f_s).

    def train_flags(self) -> List[str]:
        """The train.py flags that select this generator."""
        flags = [f'--arch={self.arch}']
        flags += [] if self.r is None else [f'--squeeze-r={self.r}']
        return flags + ([] if self.torgb is None else [f'--squeeze-torgb={self.torgb}'])


def default_squeeze_r() -> int:
    """train.py's --squeeze-r when not given: the default the squeeze block declares."""
    return synthesis_block_options()['squeeze_r'][0].default


def syntax(ablations: bool = True) -> str:
    stock = [name for name in SYNTHESIS_BLOCKS if name != 'squeeze']
    names = f'{", ".join(stock)}, squeeze, squeeze-r<R>'
    return names + (f' or squeeze-r<R>-<{"|".join(SQUEEZE_TORGB_SOURCES)}>' if ablations else '')


def parse_arch(name: str, ablations: bool = True) -> Arch:
    """'skip' -> Arch('skip', None, None); 'squeeze-r8-excite' -> Arch('squeeze', 8, 'excite'). ValueError names
    the valid spellings. ablations=False refuses the toRGB-source names (for a bench of the method alone)."""
    if name in SYNTHESIS_BLOCKS and name != 'squeeze':
        return Arch(name, None, None)
    match = _SQUEEZE.fullmatch(name)
    torgb = None if match is None else match.group(2)
    if match is None or (torgb is not None and (not ablations or torgb not in SQUEEZE_TORGB_SOURCES)):
        raise ValueError(f'unknown arch "{name}"; use {syntax(ablations)}')
    r = match.group(1)
    return Arch('squeeze', None if r is None else int(r), torgb)
