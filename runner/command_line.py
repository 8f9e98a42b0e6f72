"""train.py's command line from the option declarations (runner.options.command_line_options): one click option
per training.flags.Option, so that a flag, its default, its range and its help have one home, and what a user
gave explicitly is known (`given_options`)."""

from typing import Any, Dict, List

import click

from runner.errors import FiniteFloatRange
from training.flags import Option


def click_type(option: Option) -> Dict[str, Any]:
    """The click keywords that check an option's values: choices, ranges (finite floats), BOOL."""
    if option.type is bool:
        # --name, --name=1, --name=true, --name=0 ... (the official spelling is =1).
        return dict(type=bool, metavar='BOOL', is_flag=False, flag_value=True)
    if option.choices:
        return dict(type=click.Choice(option.choices))
    if option.type is int:
        return dict(type=click.IntRange(min=option.min, max=option.max))
    if option.type is float:
        return dict(type=FiniteFloatRange(min=option.min, max=option.max, min_open=option.min_open))
    return dict(type=option.type)


def click_option(option: Option, applies_to: str = '') -> click.Option:
    """The flag of `option`; `applies_to` ('--arch=squeeze') ends its help."""
    kwargs = click_type(option)
    if option.metavar is not None:
        kwargs['metavar'] = option.metavar
    if option.parse is not None:
        kwargs['callback'] = _parse_callback(option.parse)
    help = option.help + (f' ({applies_to})' if applies_to else '')
    if option.default is None and option.default_help:
        help += f'  [default: {option.default_help}]'
    return click.Option([option.flag, *option.aliases, option.name], default=option.default,
                        show_default=option.default is not None, help=help, **kwargs)


def _parse_callback(parse):
    def callback(_ctx, _param, value):
        try:
            return parse(value) if value is not None else None
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return callback


def click_options(declared: List[tuple]) -> List[click.Option]:
    """The flags of (Option, applies_to) pairs, in their order."""
    return [click_option(option, applies_to) for option, applies_to in declared]


def given_options(ctx: click.Context, values: Dict[str, Any]) -> Dict[str, Any]:
    """The values the user gave (on the command line or through the environment), not click's defaults: the
    builder takes a default itself and must know what was given explicitly."""
    source = click.core.ParameterSource
    return {name: value for name, value in values.items() if ctx.get_parameter_source(name) != source.DEFAULT}
