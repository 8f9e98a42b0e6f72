"""A regularizer of D: the loss term it is (what it reads of each D pass, the per-sample loss it adds, the
running state it keeps) and what it declares for the command line (its `--reg` name, its options, and how they
become its part of the options tree).

train.py makes `--reg` from the registry (training/regularizers/__init__.py) and one flag per declared option;
the option builder (runner/options.py) refuses an option given without its regularizer, then calls `plan` of
every regularizer in the `--reg` list with the values of its options (defaults filled in) and what the data and
the networks are. A plan is the term's kwargs (class_name + keywords, which the loss builds the term from), the
decoder of D it needs (None = none) and its run-name piece.
"""

from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

from training.flags import Option
from training.networks import feature_channels, is_power_of_two


class TermPlan(NamedTuple):
    """A regularizer's part of the options tree."""
    term:       Dict[str, Any]              # loss_kwargs.d_terms entry: class_name + the term's keywords.
    decoder:    Optional[Dict[str, Any]]    # D_kwargs.decoder_kwargs it needs, None = none.
    desc:       str                         # Run-name piece, e.g. '-ggdr64'.


class NetworkFacts(NamedTuple):
    """What a plan may depend on: the data and the networks the rest of the tree describes."""
    resolution:     int         # Image resolution (square, a power of two).
    img_channels:   int         # Image channels.
    w_dim:          int         # G's intermediate latent dimension.
    channel_base:   int         # G's and D's channel_base (the same: D's decoder meets G's features).
    channel_max:    int         # G's and D's channel_max.

    def channels(self, res: int) -> int:
        """C[res] of SPEC §5: the feature channels of G and D at resolution `res`."""
        return feature_channels(res, self.channel_base, self.channel_max)


class Regularizer:
    """A registered regularizer: an extra term of D's loss, added by training.loss.StyleGAN2Loss in D's phases,
    that declares its command line.

    The loss builds it from its options-tree entry (the keywords of `options`' tree paths) plus G_synthesis and
    device. It declares what it reads, so that every pass computes each input once:
      on_fakes        adds `fake_loss` to D's loss on fakes (Dmain phases only; G is frozen there);
      on_reals        adds `real_loss` to D's loss on reals, in every phase that evaluates reals (Dmain and the
                      lazy R1 step, with that step's gain; `record.main` tells them apart);
      reads_decoder   D runs its decoder in the passes the term takes part in (`record.decoded`);
      g_feature_res   the resolution of G's feature that `fake_loss` needs (`record.g_feature`, augmented like
                      the images), None = none.
    Both methods take the pass's record (training.loss.DPass) and return one value per sample, [N], already
    weighted, or None for no term in this pass. A term with running values (an EMA of logits, a counter) keeps
    them in `state_dict`, which the training state saves and an exact resume restores.
    """

    name:       str = ''                    # Its --reg value.
    help:       str = ''                    # One line for the --reg help.
    options:    Tuple[Option, ...] = ()     # Its flags; the `tree` of each is a keyword of the class.

    on_fakes        = False
    on_reals        = False
    reads_decoder   = False
    g_feature_res   = None

    def fake_loss(self, record) -> Optional[Any]:
        raise NotImplementedError()

    def real_loss(self, record) -> Optional[Any]:
        raise NotImplementedError()

    def state_dict(self) -> Dict[str, Any]:
        """The term's running values (tensors and plain values); none by default."""
        return dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state  # A term without running values has nothing to restore.

    @classmethod
    def resolve(cls, values: Mapping[str, Any], net: NetworkFacts) -> Dict[str, Any]:
        """The option values with those left to the term (default None) decided; raises ValueError with one
        line naming the flag for a value that does not fit the data. By default: as given."""
        del net
        return dict(values)

    @classmethod
    def decoder(cls, values: Mapping[str, Any], net: NetworkFacts) -> Optional[Dict[str, Any]]:
        """The decoder of D this term reads (training.decoder.decoder_kwargs), None = none."""
        del values, net
        return None

    @classmethod
    def plan(cls, values: Mapping[str, Any], net: NetworkFacts) -> TermPlan:
        """Its part of the tree from the values of its options (every one present, defaults filled in): the
        keywords from the options' `tree` (the registry adds the class_name), the run-name piece '-<name>' and
        the options' pieces."""
        values = cls.resolve(values, net)
        term = dict()
        for option in cls.options:
            if option.tree is not None:
                term[option.tree] = option.tree_value(values[option.name])
        desc = f'-{cls.name}' + ''.join(option.desc_piece(values[option.name]) for option in cls.options)
        return TermPlan(term=term, decoder=cls.decoder(values, net), desc=desc)


def power_of_two_between(flag: str, value: int, low: int, high: int, resolution: int, default_help: str) -> None:
    """A feature resolution the networks have: a power of two in [low, high], else a ValueError naming `flag`."""
    if not is_power_of_two(value) or not low <= value <= high:
        raise ValueError(f'{flag} must be a power of two between {low} and {high} for {resolution}x{resolution} '
                         f'images, got {value}  [default: {default_help}]')
