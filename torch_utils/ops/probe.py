"""Parity probes: a kernel checks itself against its reference implementation before it is trusted.

A CUDA kernel that compiles but computes wrong would silently spoil a whole training run, and the GPU path
is the one the tests on a CPU machine cannot run. So, the first time a process wants an op's kernel on a
device, `dispatch` runs that op's probe: a few small cases whose value and derivatives are computed by the
kernel path and by the reference path, compared within the tolerance of the dtype (see `TOLERANCES`). The
verdict decides, once per process and device, whether the kernel is used (see `dispatch.kernel_verdict`).

`probe_op` knows nothing about any particular op or device: the op module supplies the cases and the two
implementations, so the same machinery checks the real plugin on a GPU and, in tests, the kernels' host
build on the CPU.
"""

import contextlib
import time
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence

import torch

# Largest error allowed, per dtype of the kernel run, measured as max|kernel - reference| / (1 + max|reference|)
# against a float64 reference on the same (already rounded) inputs: an absolute error for values below 1 and
# a relative one above. float32: the kernels are built with --use_fast_math (approximate exp/tanh intrinsics,
# a few ulp) and accumulate filter taps in float32, which stays below 1e-5; 1e-4 leaves a wide margin and
# still catches any real bug (a wrong index, mask or constant gives errors of order 1e-2 to 1). float16: every
# launch rounds its output to float16 (unit roundoff 4.9e-4), and a separable filter or a second derivative
# chains up to three launches, each reading the rounded result of the one before, so a few 1e-3 are
# expected; 1e-2 (about 20 ulp) accepts that and nothing more.
TOLERANCES = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
}


class ProbeCase(NamedTuple):
    """One small computation that both paths of an op perform.

    `run(impl, dtype)` computes the case's quantities with `impl` (the op's kernel or reference function)
    in `dtype` and returns them by name, e.g. {'y': ..., 'dx': ..., 'ddx': ...}. It must create its inputs
    deterministically (its own torch.Generator, never the global one, so that probing does not change the
    random stream of the caller), round them to `self.dtype` first and only then convert them to `dtype`, so
    that the two runs see the same values.
    """
    name:  str                                                          # E.g. 'lrelu_clamp/float16'.
    dtype: torch.dtype                                                  # Dtype of the kernel run (tolerance).
    run:   Callable[[Callable, torch.dtype], Dict[str, torch.Tensor]]   # (impl, dtype) -> quantities by name.


class ProbeResult(NamedTuple):
    """The verdict of one probe; for a failure, the first case and quantity that disagreed."""
    op:        str                      # Name of the op, e.g. 'bias_act'.
    ok:        bool                     # Whether every case agreed within its tolerance.
    seconds:   float                    # Wall-clock time the probe took.
    case:      Optional[str] = None     # The failing case.
    quantity:  Optional[str] = None     # The failing quantity of that case ('y', 'dx', ...).
    error:     float = 0.0              # Its error (see TOLERANCES); the largest error seen when ok.
    tolerance: float = 0.0              # The tolerance it was held to.
    exception: Optional[str] = None     # What the kernel raised, when it raised instead of returning.

    def describe(self) -> str:
        """What failed and by how much, or that nothing did."""
        if self.ok:
            return f'every case within tolerance (largest error {self.error:.3g}, {self.seconds:.2f} s)'
        if self.exception is not None:
            return f'case {self.case} raised {self.exception}'
        return (f'case {self.case}, {self.quantity}: max error {self.error:.3g} exceeds the tolerance '
                f'{self.tolerance:g}')


def probe_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / (1 + max|ref|), computed in float64; infinite for a shape mismatch or a NaN."""
    if tuple(ours.shape) != tuple(ref.shape):
        return float('inf')
    ours, ref = ours.detach().double(), ref.detach().double()
    if ref.numel() == 0:
        return 0.0
    error = float((ours - ref).abs().max()) / (1 + float(ref.abs().max()))
    return error if error == error else float('inf')  # NaN compares unequal to itself.


def probe_op(
    op:            str,                     # Name of the op, for the result and the messages.
    run_kernel:    Callable,                # The op's kernel-path function.
    run_reference: Callable,                # The op's reference-path function, with the same signature.
    cases:         Sequence[ProbeCase],     # What to compare.
    tolerances:    Optional[Dict[torch.dtype, float]] = None,  # Per kernel dtype; None: TOLERANCES.
) -> ProbeResult:
    """Run every case with both implementations and return the verdict (stopping at the first failure).

    The reference runs in float64. Autograd is switched on and autocast off for the duration, whatever the
    caller's context: the first kernel call may well come from inside `torch.no_grad()` (inference) or an
    autocast region (which would turn the reference's convolutions into float16).
    """
    tolerances = TOLERANCES if tolerances is None else tolerances
    start = time.perf_counter()
    worst = 0.0
    with torch.inference_mode(False), torch.enable_grad(), _no_autocast():
        for case in cases:
            tolerance = tolerances[case.dtype]
            try:
                ours = case.run(run_kernel, case.dtype)
            except Exception as e:  # A kernel that raises is as untrustworthy as one that computes wrong.
                return ProbeResult(op, False, time.perf_counter() - start, case.name, None, float('inf'),
                                   tolerance, f'{type(e).__name__}: {e}')
            ref = case.run(run_reference, torch.float64)
            if set(ours) != set(ref):
                raise AssertionError(f'probe case {case.name} returned {sorted(ours)} for the kernel but '
                                     f'{sorted(ref)} for the reference')
            for quantity, value in ours.items():
                error = probe_error(value, ref[quantity])
                if not error <= tolerance:
                    return ProbeResult(op, False, time.perf_counter() - start, case.name, quantity, error,
                                       tolerance)
                worst = max(worst, error)
    return ProbeResult(op, True, time.perf_counter() - start, error=worst)


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    """Disable autocast on the CPU and, where there is one, on the GPU, for the duration."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type='cpu', enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast(device_type='cuda', enabled=False))
        yield
