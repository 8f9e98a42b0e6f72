"""Weight transfer between networks of different architectures: `train.py --resume=<pkl>` (fine-tuning).

The official `--resume` copies every tensor by name and fails as soon as one has another shape, so a stock
snapshot cannot seed a squeeze generator (toRGB reads q instead of c channels) or a conditional run (the label
embedding and D's output layer change). Here every destination tensor whose name *and* shape match the source
is copied; the rest keep the values a freshly built network has, and a report says which layers were copied,
which are new and which of the source were dropped, grouped by block:

    G: 32 tensors (7,081 values) copied, 34 tensors (2,354 values) new, 18 tensors (3,669 values) dropped
      copied whole: mapping
      synthesis.b4: const, conv1, resample_filter copied; torgb dropped
      synthesis.b8: conv0, resample_filter copied; torgb partly copied; squeeze, excite, blend new; conv1 dropped

(a stock 16x16 generator into a squeeze one: toRGB keeps its bias, its weights read q channels now).
"""

import dataclasses
import re
from typing import Dict, List, Tuple

import torch

from torch_utils import misc

COPIED, NEW, RESHAPED, PARTIAL, DROPPED = 'copied', 'new', 'new (shape differs)', 'partly copied', 'dropped'
_STATUS_ORDER = (COPIED, PARTIAL, NEW, RESHAPED, DROPPED)


@dataclasses.dataclass
class TransferReport:
    """What `transfer_params_and_buffers` did, tensor by tensor (names as in `named_parameters`/`named_buffers`)."""
    copied:     Dict[str, int] = dataclasses.field(default_factory=dict)    # Name -> number of values.
    new:        Dict[str, int] = dataclasses.field(default_factory=dict)    # In the destination only.
    reshaped:   Dict[str, int] = dataclasses.field(default_factory=dict)    # In both, with different shapes.
    dropped:    Dict[str, int] = dataclasses.field(default_factory=dict)    # In the source only.
    order:      List[str] = dataclasses.field(default_factory=list)         # Destination's names, then dropped.

    @property
    def is_complete(self) -> bool:
        """True when every tensor of both networks was copied (a same-architecture resume)."""
        return not (self.new or self.reshaped or self.dropped)


def transfer_params_and_buffers(src: torch.nn.Module, dst: torch.nn.Module) -> TransferReport:
    """Copy into `dst` every parameter and buffer of `src` with the same name and shape; report the rest."""
    src_tensors = dict(misc.named_params_and_buffers(src))
    report = TransferReport()
    dst_names = set()
    with torch.no_grad():
        for name, tensor in misc.named_params_and_buffers(dst):
            dst_names.add(name)
            source = src_tensors.get(name)
            if source is None:
                report.new[name] = tensor.numel()
            elif source.shape != tensor.shape:
                report.reshaped[name] = tensor.numel()
            else:
                tensor.copy_(source.detach())
                report.copied[name] = tensor.numel()
    report.dropped = {name: tensor.numel() for name, tensor in src_tensors.items() if name not in dst_names}
    report.order = [name for name, _tensor in misc.named_params_and_buffers(dst)] + list(report.dropped)
    return report


def layer_of(name: str) -> Tuple[str, str]:
    """(group, layer) of a tensor name: the group is the path up to the block (`synthesis.b8`, D's `b16`) or
    the top-level module (`mapping`), the layer the next name (`conv0`, `torgb`, `fc0`, `w_avg`)."""
    parts = name.split('.')
    for i, part in enumerate(parts[:-1]):
        if re.fullmatch(r'b\d+', part):
            return '.'.join(parts[:i + 1]), parts[i + 1]
    if len(parts) == 1:
        return '', parts[0]
    return parts[0], parts[1]


def _layer_statuses(report: TransferReport) -> Dict[str, Dict[str, str]]:
    """{group: {layer: status}} in the order the tensors appear (destination first, then dropped ones)."""
    kind_of = {name: kind for kind, names in ((COPIED, report.copied), (NEW, report.new),
                                              (RESHAPED, report.reshaped), (DROPPED, report.dropped))
               for name in names}
    kinds: Dict[Tuple[str, str], set] = {}
    for name in report.order:
        kinds.setdefault(layer_of(name), set()).add(kind_of[name])
    groups: Dict[str, Dict[str, str]] = {}
    for (group, layer), found in kinds.items():
        if found == {COPIED}:
            status = COPIED
        elif COPIED in found:
            status = PARTIAL
        elif RESHAPED in found:
            status = RESHAPED
        elif found == {DROPPED}:
            status = DROPPED
        else:
            status = NEW  # New tensors, possibly beside dropped ones of the same layer name.
        groups.setdefault(group, {})[layer] = status
    return groups


def format_report(network: str, report: TransferReport) -> List[str]:
    """The lines train.py prints (and log.txt keeps) for one network."""
    def count(names: Dict[str, int]) -> str:
        return f'{len(names)} tensors ({sum(names.values()):,} values)'

    head = f'{network}: {count(report.copied)} copied'
    if report.new or report.reshaped:
        head += f', {count({**report.new, **report.reshaped})} new'
    if report.dropped:
        head += f', {count(report.dropped)} dropped'
    lines = [head]
    whole = []
    for group, layers in _layer_statuses(report).items():
        if all(status == COPIED for status in layers.values()):
            whole.append(group or '(top level)')
            continue
        parts = []
        for status in _STATUS_ORDER:
            names = [layer for layer, s in layers.items() if s == status]
            if names:
                parts.append(f'{", ".join(names)} {status}')
        lines.append(f'  {group or "(top level)"}: {"; ".join(parts)}')
    if whole and len(lines) > 1:
        lines.insert(1, f'  copied whole: {", ".join(whole)}')
    return lines
