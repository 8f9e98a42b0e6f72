"""The declaration of a user option: one record where the option's meaning lives, from which the command line
makes its flag, the option builder its default, its range check, its run-name piece and its place in the tree.

Regularizer terms (training/regularizers/) declare theirs as `Option`s and train.py's own table does the same
(runner/options.py). The synthesis blocks keep `networks.BlockOption`, the same idea with the block's keyword:
a snapshot embeds training/networks.py, and the official tree that unpickles it cannot import this module (SPEC
§7); runner/options.py reads both. Click-free, so that package `training` may hold the declarations.
"""

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union


class Option(NamedTuple):
    """One option, `--<name with - for _>` on the command line."""
    name:           str                     # Option name, e.g. 'ggdr_res' (the flag --ggdr-res).
    type:           type                    # int, float, bool or str.
    default:        Any = None              # The value when the flag is not given; None = its owner decides
                                            # (`default_help` says how).
    help:           str = ''                # Help text of the flag.
    choices:        tuple = ()              # The allowed values of a str option; () = any.
    min:            Optional[float] = None  # The smallest allowed value of a number; None = no bound.
    max:            Optional[float] = None  # The largest allowed value of a number; None = no bound.
    min_open:       bool = False            # `min` itself is not allowed (a rate, a length).
    tree:           Union[None, str, Tuple[str, ...]] = None  # The key(s) its value sets in its owner's part of
                                            # the tree (dotted paths for train.py's table); None = none (the owner
                                            # uses the value itself).
    desc:           Optional[str] = None    # Run-name piece, a format string of `value` (e.g. 'w{value:g}').
    desc_always:    bool = False            # Add the piece also for the default value (otherwise only when not).
    default_help:   Optional[str] = None    # What the help shows as the default when `default` is None.
    metavar:        Optional[str] = None    # The flag's metavar in the help, None = from the type.
    aliases:        Tuple[str, ...] = ()    # Further flags, e.g. ('--map',).
    parse:          Optional[Callable[[str], Any]] = None  # For a value click has no type for (a comma list):
                                            # str -> value, raising ValueError with the reason.
    on_resume:      bool = False            # May change when a training state is resumed (train.py's table).

    @property
    def flag(self) -> str:
        return '--' + self.name.replace('_', '-')

    @property
    def tree_paths(self) -> Tuple[str, ...]:
        return (self.tree,) if isinstance(self.tree, str) else tuple(self.tree or ())

    def tree_value(self, value: Any) -> Any:
        """The value as the tree records it: a float option as a float (a JSON 10 would read back as an int), a
        bool option as a bool (a Python caller's 1)."""
        if value is None or self.type not in (float, bool):
            return value
        return self.type(value)

    def desc_piece(self, value: Any) -> str:
        if self.desc is None or value is None or (value == self.default and not self.desc_always):
            return ''
        return self.desc.format(value=value)
