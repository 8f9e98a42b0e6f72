"""Print the table `training.augment.wavelets`: the decomposition low-pass filters of the Daubechies (db1-db8)
and symlet (sym2-sym8) wavelets, computed from their definition at 60 digits and rounded to float64.

    python tools/wavelet_taps.py

An orthogonal wavelet with N vanishing moments has the low-pass H(z) = sqrt(2) ((1 + z^-1) / 2)^N Q(z), where
|Q(e^jw)|^2 = P(sin^2(w/2)) and P(y) = sum_{k<N} C(N-1+k, k) y^k (Daubechies, "Ten Lectures on Wavelets", §6.1).
Each root y of P gives a pair of zeros r, 1/r of |Q|^2 (from z + 1/z = 2 - 4y); a filter keeps one of each pair
(complex ones with their conjugates). dbN keeps all zeros outside the unit circle (the time reverse of the
minimum-phase filter, as the published tables list the decomposition filter); symN keeps the near-linear-phase
selection of the published tables (`SYMLET_INSIDE`: for each zero group, ordered by modulus, whether the zero
inside the unit circle is kept). Rounding once from 60 digits makes these the correctly rounded values; the
widely copied tables differ from them by up to about 4e-12. training/augment.py keeps the published values
for db2 = sym2 and for sym6, from which the pipe builds its buffers Hz_fbank and Hz_geom: with the computed
taps, a few float32 entries of Hz_fbank that should be 0 (about 1e-13) would change, and with them the bits of
filtered images.
"""

from typing import Optional

import mpmath

# The symlets of the published tables: the least asymmetric choice (smallest phase deviation from linear) for
# every N but 7, where the tables keep another selection; the orientation (which of a filter and its time
# reverse) is also theirs.
SYMLET_INSIDE = {
    2: (False,),
    3: (False,),
    4: (False, True),
    5: (True, False),
    6: (True, False, True),
    7: (True, False, False),
    8: (False, True, False, True),
}


def zero_groups(N: int) -> list:
    """The zeros of Q(z) inside the unit circle, grouped (a real zero alone, a complex one with its conjugate)
    and ordered by modulus."""
    if N == 1:
        return []
    P = [mpmath.binomial(N - 1 + k, k) for k in range(N)]
    inside = []
    for y in mpmath.polyroots(P[::-1], maxsteps=500, extraprec=400):
        b = 2 - 4 * y
        r = (b - mpmath.sqrt(b * b - 4)) / 2
        inside.append(r if abs(r) < 1 else 1 / r)
    groups = []
    for r in sorted(inside, key=lambda r: (abs(r), mpmath.im(r))):
        if mpmath.im(r) > 0:
            continue  # Taken with its conjugate.
        groups.append([r] if abs(mpmath.im(r)) < mpmath.mpf(10) ** -40 else [r, mpmath.conj(r)])
    return groups


def lowpass(N: int, keep_inside: Optional[tuple] = None) -> list:
    """The taps h[0..2N-1] of H(z) = sum h[k] z^-k with the zeros chosen by `keep_inside` (None: all outside,
    dbN), summing to sqrt(2)."""
    groups = zero_groups(N)
    keep_inside = (False,) * len(groups) if keep_inside is None else keep_inside
    zeros = [mpmath.mpf(-1)] * N
    for group, inside in zip(groups, keep_inside, strict=True):
        zeros += group if inside else [1 / z for z in group]
    coeffs = [mpmath.mpc(1)]
    for z in zeros:
        coeffs = [a - z * b for a, b in zip(coeffs + [0], [0] + coeffs, strict=True)]
    coeffs = [mpmath.re(c) for c in coeffs]
    total = sum(coeffs)
    return [c * mpmath.sqrt(2) / total for c in coeffs]


def table() -> dict:
    """name -> list of float taps, in the order of training.augment.wavelets."""
    mpmath.mp.dps = 60
    out = {'haar': lowpass(1)}
    out.update({f'db{N}': lowpass(N) for N in range(1, 9)})
    out.update({f'sym{N}': lowpass(N, SYMLET_INSIDE[N]) for N in range(2, 9)})
    return {name: [float(tap) for tap in taps] for name, taps in out.items()}


if __name__ == '__main__':
    for name, taps in table().items():
        print(f"    {repr(name) + ':':<8}[{', '.join(repr(t) for t in taps)}],")
