"""2-D convolutions whose weight gradient can be switched off, and whose gradients are differentiable again.

R1 and path-length regularization differentiate a network's output with respect to its *input* and then
differentiate that gradient again (`create_graph=True`). PyTorch's own convolution backward always computes
the weight gradient as well, which costs about as much as the rest of the backward pass and is thrown away in
these passes. Here every convolution (and every gradient of one) is an `autograd.Function` of our own:

* The input gradient of a convolution is the *adjoint* convolution (a transposed convolution for a
  convolution, and the other way round) applied to the output gradient. It runs through the same Function,
  so it is differentiable again, to any order.
* The weight gradient is a second Function around `aten.convolution_backward` that asks for the weight
  gradient only. Its own backward is again made of the two convolutions above, so double backward through a
  weight gradient works too. Inside `with no_weight_gradients():` this Function is never called.

Skipping the weight gradient in the first pass does not lose the regularizer's gradient with respect to the
weights: that gradient flows through the graph of the *input* gradient (the adjoint convolution takes the
weight as an argument), and is computed when the penalty is backpropagated after the block.

Flags (module attributes, as in the official code that snapshots and training loops use):

* `enabled` (default False): the training loop turns it on. When off, `conv2d` and `conv_transpose2d` are
  exactly `torch.nn.functional.conv2d` / `conv_transpose2d`.
* `weight_gradients_disabled`: read at backward time; change it only through `no_weight_gradients()`.
"""

import contextlib
import dataclasses
import numbers
import warnings
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

enabled = False                     # Use our autograd Functions at all (the training loop sets this).
weight_gradients_disabled = False   # Skip weight gradients in backward passes (see `no_weight_gradients`).

IntPair = Union[int, Sequence[int]]

# ----------------------------------------------------------------------------
# Flags and feature detection.


@contextlib.contextmanager
def no_weight_gradients(disable: bool = True) -> Iterator[None]:
    """Within this block, backward passes through `conv2d` / `conv_transpose2d` compute no weight gradients.

    Everything that would flow back through a convolution's `weight` argument is dropped, not only gradients
    of parameters: a weight computed from other tensors (fused modulated convolution, where it depends on the
    styles) gets no gradient either. This is why the networks do not fuse modulation in training mode.

    `disable=False` leaves the current setting alone, so a nested block can never switch weight gradients back
    on for an enclosing block that turned them off. The previous value is restored on exit, also on exceptions.
    """
    global weight_gradients_disabled
    previous = weight_gradients_disabled
    weight_gradients_disabled = previous or bool(disable)
    try:
        yield
    finally:
        weight_gradients_disabled = previous


_WEIGHT_GRAD_OP = 'convolution_backward'          # The aten op that can compute the weight gradient alone.
_weight_grad_op_available: Optional[bool] = None   # None until the first call that wants the custom path.


def _has_weight_grad_op() -> bool:
    """Whether this PyTorch offers `aten.convolution_backward` (checked once, at first use, not by version)."""
    global _weight_grad_op_available
    if _weight_grad_op_available is None:
        try:
            _weight_grad_op_available = getattr(torch.ops.aten, _WEIGHT_GRAD_OP, None) is not None
        except RuntimeError:    # Some releases raise this instead of AttributeError for an unknown op.
            _weight_grad_op_available = False
        if not _weight_grad_op_available:
            warnings.warn(f'torch.ops.aten.{_WEIGHT_GRAD_OP} is not available in this PyTorch build; '
                          'conv2d_gradfix falls back to torch.nn.functional and cannot skip weight gradients.',
                          RuntimeWarning, stacklevel=4)
    return _weight_grad_op_available


def _reset_feature_probe() -> None:
    """Forget the result of `_has_weight_grad_op` (tests)."""
    global _weight_grad_op_available
    _weight_grad_op_available = None


def _use_custom_op(input: torch.Tensor, padding) -> bool:
    # The custom path covers the cases the networks use: batched float NCHW input and explicit integer padding.
    # Anything else (string padding, unbatched input, integer tensors) goes to PyTorch unchanged.
    if not enabled:
        return False
    if isinstance(padding, str) or input.ndim != 4 or not input.is_floating_point():
        return False
    return _has_weight_grad_op()

# ----------------------------------------------------------------------------
# Public functions.


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """`torch.nn.functional.conv2d`, with skippable, twice-differentiable gradients when `enabled`."""
    if _use_custom_op(input, padding):
        spec = _ConvSpec.make(transpose=False, stride=stride, padding=padding, output_padding=0,
                              dilation=dilation, groups=groups)
        return _ConvFunction.apply(spec, input, weight, bias)
    return F.conv2d(input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     stride: IntPair = 1, padding: IntPair = 0, output_padding: IntPair = 0, groups: int = 1,
                     dilation: IntPair = 1) -> torch.Tensor:
    """`torch.nn.functional.conv_transpose2d`, with skippable, twice-differentiable gradients when `enabled`."""
    if _use_custom_op(input, padding):
        spec = _ConvSpec.make(transpose=True, stride=stride, padding=padding, output_padding=output_padding,
                              dilation=dilation, groups=groups)
        return _ConvFunction.apply(spec, input, weight, bias)
    return F.conv_transpose2d(input, weight, bias, stride=stride, padding=padding, output_padding=output_padding,
                              groups=groups, dilation=dilation)

# ----------------------------------------------------------------------------
# One convolution, described by its hyperparameters (the tensors come separately).


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * 2
    assert len(value) == 2, f'{name} must be an int or a pair of ints, got {value}'
    return value


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    """Hyperparameters of a 2-D convolution (`transpose=False`) or transposed convolution (`transpose=True`)."""
    transpose:      bool
    stride:         Tuple[int, int]
    padding:        Tuple[int, int]
    output_padding: Tuple[int, int]     # Only meaningful for transposed convolutions.
    dilation:       Tuple[int, int]
    groups:         int

    @staticmethod
    def make(transpose: bool, stride: IntPair, padding: IntPair, output_padding: IntPair, dilation: IntPair,
             groups: int) -> '_ConvSpec':
        return _ConvSpec(transpose=transpose, stride=_pair(stride, 'stride'), padding=_pair(padding, 'padding'),
                         output_padding=_pair(output_padding, 'output_padding'),
                         dilation=_pair(dilation, 'dilation'), groups=int(groups))

    def run(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The plain PyTorch op (no autograd of ours)."""
        if self.transpose:
            return F.conv_transpose2d(input, weight, bias, stride=self.stride, padding=self.padding,
                                      output_padding=self.output_padding, groups=self.groups, dilation=self.dilation)
        return F.conv2d(input, weight, bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
                        groups=self.groups)

    def adjoint(self, input_shape: Sequence[int], output_shape: Sequence[int], kernel: Sequence[int]) -> '_ConvSpec':
        """The op that maps an output gradient back to the input's shape (same weight, same hyperparameters)."""
        if self.transpose:
            # The adjoint of a transposed convolution is a plain one. When output_padding >= stride (allowed when
            # dilation > stride) it comes out larger than the input; `_input_gradient` crops it.
            return dataclasses.replace(self, transpose=False, output_padding=(0, 0))
        # A strided convolution sends several input sizes to the same output size; output_padding selects the
        # one we came from, so that the gradient has exactly the input's shape.
        output_padding = tuple(
            input_shape[i + 2] - ((output_shape[i + 2] - 1) * self.stride[i] - 2 * self.padding[i]
                                  + self.dilation[i] * (kernel[i] - 1) + 1)
            for i in range(2))
        return dataclasses.replace(self, transpose=True, output_padding=output_padding)

# ----------------------------------------------------------------------------
# Gradients, written with our own Functions so that they are differentiable again.


def _input_gradient(spec: _ConvSpec, grad_output: torch.Tensor, weight: torch.Tensor,
                    input_shape: Sequence[int]) -> torch.Tensor:
    """d<op(x, weight), grad_output>/dx: the adjoint op applied to grad_output."""
    adjoint = spec.adjoint(input_shape, grad_output.shape, weight.shape[2:])
    grad_input = _ConvFunction.apply(adjoint, grad_output, weight, None)
    if tuple(grad_input.shape[2:]) != tuple(input_shape[2:]):
        grad_input = grad_input[:, :, :input_shape[2], :input_shape[3]]
    return grad_input


def _weight_gradient_kernel(spec: _ConvSpec, grad_output: torch.Tensor, input: torch.Tensor,
                            weight: torch.Tensor) -> torch.Tensor:
    """The expensive part that `no_weight_gradients` avoids: PyTorch's convolution backward, weight gradient only.

    `weight` is only read for its shape, dtype and layout.
    """
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_output, input, weight, None, list(spec.stride), list(spec.padding), list(spec.dilation),
        spec.transpose, list(spec.output_padding), spec.groups, [False, True, False])
    return grad_weight


class _ConvFunction(torch.autograd.Function):
    """y = op(input, weight) + bias, with a backward made of `_ConvFunction` and `_WeightGradFunction` again."""

    @staticmethod
    def forward(ctx, spec: _ConvSpec, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        ctx.spec = spec
        ctx.input_shape = tuple(input.shape)
        # Whether weight gradients are wanted is only known at backward time (no_weight_gradients usually wraps
        # the autograd.grad call, not the forward), so keep the input whenever the weight may need it.
        ctx.save_for_backward(input if ctx.needs_input_grad[2] else None, weight)
        return spec.run(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        input, weight = ctx.saved_tensors
        spec = ctx.spec
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_input = _input_gradient(spec, grad_output, weight, ctx.input_shape)
        if ctx.needs_input_grad[2] and not weight_gradients_disabled:
            grad_weight = _WeightGradFunction.apply(spec, grad_output, input, weight.detach())
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.sum(dim=(0, 2, 3))
        return None, grad_input, grad_weight, grad_bias


class _WeightGradFunction(torch.autograd.Function):
    """grad_weight(grad_output, input) of a convolution; bilinear, so its own gradients are convolutions again."""

    @staticmethod
    def forward(ctx, spec: _ConvSpec, grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor):
        ctx.spec = spec
        ctx.save_for_backward(grad_output, input)
        return _weight_gradient_kernel(spec, grad_output, input, weight)

    @staticmethod
    def backward(ctx, grad2_weight: torch.Tensor):
        grad_output, input = ctx.saved_tensors
        spec = ctx.spec
        grad2_grad_output = grad2_input = None
        # <grad_weight, g> = <op(input, g), grad_output> because the op is linear in its weight; the two
        # gradients of that expression are the op with weight g, and its adjoint applied to grad_output.
        if ctx.needs_input_grad[1]:
            grad2_grad_output = _ConvFunction.apply(spec, input, grad2_weight, None)
        if ctx.needs_input_grad[2]:
            grad2_input = _input_gradient(spec, grad_output, grad2_weight, input.shape)
        return None, grad2_grad_output, grad2_input, None
