// Fused bias + activation + gain + clamp, and its first and second derivatives (see bias_act.h for what each
// mode computes and for the memory layout contract).
//
// The op is purely elementwise and therefore limited by memory bandwidth: every launch is a single pass in
// which consecutive threads touch consecutive addresses. The activation, the mode and the element type are
// template parameters, so each kernel is a short loop body; its only runtime branches are on the optional
// inputs and on the clamp, which go the same way for every element of a launch.
//
// Every per-element function is __host__ __device__, which lets the arithmetic be checked on a machine
// without a GPU by calling it from host code.

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "bias_act.h"

namespace {

// ------------------------------------------------------------------------------------------------------
// Element types. Half-precision data is computed in float, float in float, double in double.

template <typename T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };

__host__ __device__ __forceinline__ float to_compute(float v) { return v; }
__host__ __device__ __forceinline__ double to_compute(double v) { return v; }
__host__ __device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }

template <typename T> __host__ __device__ __forceinline__ T from_compute(typename ComputeType<T>::type v);
template <> __host__ __device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ double from_compute<double>(double v) { return v; }
template <> __host__ __device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }

// Overloads that pick the single- or double-precision library function by argument type.
__host__ __device__ __forceinline__ float exp_of(float v) { return expf(v); }
__host__ __device__ __forceinline__ double exp_of(double v) { return exp(v); }
__host__ __device__ __forceinline__ float expm1_of(float v) { return expm1f(v); }
__host__ __device__ __forceinline__ double expm1_of(double v) { return expm1(v); }
__host__ __device__ __forceinline__ float log1p_of(float v) { return log1pf(v); }
__host__ __device__ __forceinline__ double log1p_of(double v) { return log1p(v); }
__host__ __device__ __forceinline__ float tanh_of(float v) { return tanhf(v); }
__host__ __device__ __forceinline__ double tanh_of(double v) { return tanh(v); }

// ------------------------------------------------------------------------------------------------------
// The activation functions and their derivatives.

// Constants of SELU (Klambauer et al. 2017), the same values torch.nn.functional.selu uses.
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;

template <typename S>
__host__ __device__ __forceinline__ S sigmoid_of(S s)
{
    // For very negative s the exponential overflows to +inf and the quotient correctly becomes 0.
    return S(1) / (S(1) + exp_of(-s));
}

// f(s). Comparisons are written so that a NaN input gives a NaN output, as the reference does.
template <int A, typename S>
__host__ __device__ __forceinline__ S act_value(S s, S alpha)
{
    if constexpr (A == kBiasActLinear) {
        return s;
    } else if constexpr (A == kBiasActRelu) {
        return s < S(0) ? S(0) : s;
    } else if constexpr (A == kBiasActLrelu) {
        return s < S(0) ? s * alpha : s;
    } else if constexpr (A == kBiasActTanh) {
        return tanh_of(s);
    } else if constexpr (A == kBiasActSigmoid) {
        return sigmoid_of(s);
    } else if constexpr (A == kBiasActElu) {
        return s > S(0) ? s : expm1_of(s);
    } else if constexpr (A == kBiasActSelu) {
        return s > S(0) ? S(kSeluScale) * s : S(kSeluScale * kSeluAlpha) * expm1_of(s);
    } else if constexpr (A == kBiasActSoftplus) {
        // log(1 + e^s) = max(s, 0) + log(1 + e^-|s|): the exponential never overflows.
        const S pos = s > S(0) ? s : S(0);
        const S neg_abs = s > S(0) ? -s : s;
        return pos + log1p_of(exp_of(neg_abs));
    } else {
        static_assert(A == kBiasActSwish, "unknown activation");
        return s * sigmoid_of(s);
    }
}

// f'(s) and f''(s) of the activations whose gradient is computed from the input (softplus, swish).
template <int A, typename S>
__host__ __device__ __forceinline__ S act_deriv_from_x(S s)
{
    const S sig = sigmoid_of(s);
    if constexpr (A == kBiasActSoftplus) {
        return sig;
    } else {
        static_assert(A == kBiasActSwish, "not an x-based activation");
        // d/ds (s * sig) = sig + s * sig * (1 - sig)
        return sig * (S(1) + s * (S(1) - sig));
    }
}

template <int A, typename S>
__host__ __device__ __forceinline__ S act_deriv2_from_x(S s)
{
    const S sig = sigmoid_of(s);
    const S dsig = sig * (S(1) - sig);
    if constexpr (A == kBiasActSoftplus) {
        return dsig;
    } else {
        static_assert(A == kBiasActSwish, "not an x-based activation");
        // d/ds (sig + s * dsig) = 2 * dsig + s * dsig * (1 - 2 * sig)
        return dsig * (S(2) + s * (S(1) - S(2) * sig));
    }
}

// f'(s) written as a function of u = f(s), for the activations whose gradient is computed from the output.
// The sign of u tells the sign of s for every one of them (lrelu with a positive slope), so piecewise
// definitions can branch on u.
template <int A, typename S>
__host__ __device__ __forceinline__ S act_deriv_from_y(S u, S alpha)
{
    if constexpr (A == kBiasActLinear) {
        return S(1);
    } else if constexpr (A == kBiasActRelu) {
        return u > S(0) ? S(1) : S(0);
    } else if constexpr (A == kBiasActLrelu) {
        return u > S(0) ? S(1) : alpha;
    } else if constexpr (A == kBiasActTanh) {
        return S(1) - u * u;
    } else if constexpr (A == kBiasActSigmoid) {
        return u * (S(1) - u);
    } else if constexpr (A == kBiasActElu) {
        // e^s = u + 1 for s <= 0.
        return u > S(0) ? S(1) : u + S(1);
    } else {
        static_assert(A == kBiasActSelu, "not a y-based activation");
        // scale * alpha * e^s = u + scale * alpha for s <= 0.
        return u > S(0) ? S(kSeluScale) : u + S(kSeluScale * kSeluAlpha);
    }
}

// d f'(s) / d u, the derivative of the expression above with respect to u. Chained with du/ds = f'(s) by
// autograd, it gives f''(s). Zero for the piecewise-linear activations.
template <int A, typename S>
__host__ __device__ __forceinline__ S act_deriv2_from_y(S u)
{
    if constexpr (A == kBiasActTanh) {
        return S(-2) * u;
    } else if constexpr (A == kBiasActSigmoid) {
        return S(1) - S(2) * u;
    } else if constexpr (A == kBiasActElu || A == kBiasActSelu) {
        return u > S(0) ? S(0) : S(1);
    } else {
        static_assert(A == kBiasActLinear || A == kBiasActRelu || A == kBiasActLrelu, "not a y-based activation");
        return S(0);
    }
}

// ------------------------------------------------------------------------------------------------------
// One element.

// Evaluated here at namespace scope, where calling the host-side constexpr function from the header is allowed.
template <int A> constexpr bool kGradFromX = bias_act_grad_uses_x(A);

// Division by a divisor that is fixed for the whole launch, done as a multiply-high, an add and a shift
// (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994) instead of the
// much longer instruction sequence of a general integer division. Exact for dividends below 2^31.
struct Divider {
    uint32_t divisor;
    uint32_t multiplier;
    uint32_t shift;
};

__host__ __device__ __forceinline__ Divider make_divider(uint32_t d)
{
    // shift = ceil(log2(d)), multiplier = floor(2^32 * (2^shift - d) / d) + 1, which fits in 32 bits.
    uint32_t shift = 0;
    while ((uint64_t(1) << shift) < d)
        shift++;
    const uint64_t multiplier = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
    return Divider{d, static_cast<uint32_t>(multiplier), shift};
}

__host__ __device__ __forceinline__ uint32_t divide(uint32_t n, const Divider& d)
{
    // The high word of the 64-bit product: one mul.hi instruction on the GPU.
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * d.multiplier) >> 32);
    return (high + n) >> d.shift;  // high <= n < 2^31, so the sum does not overflow.
}

// The parameters in the form the element code wants them, prepared on the host once per launch.
template <typename S>
struct Constants {
    S alpha;
    S gain;
    S inv_gain;         // 1 / gain, or 0 for gain 0 (then every gradient is 0 anyway and u is never needed).
    S clamp;            // Negative: no clamping.
    S clamp_stored;     // The clamp limit as it reads back after a round trip through the element type.
    Divider by_stride;  // dim_stride and dim_size, for the 32-bit index path.
    Divider by_size;
};

template <typename T>
__host__ __device__ __forceinline__ Constants<typename ComputeType<T>::type> make_constants(const BiasActParams& p)
{
    using S = typename ComputeType<T>::type;
    Constants<S> k;
    k.alpha = static_cast<S>(p.alpha);
    k.gain = static_cast<S>(p.gain);
    k.inv_gain = p.gain != 0.0 ? static_cast<S>(1.0 / p.gain) : S(0);
    k.clamp = static_cast<S>(p.clamp);
    // A clamped half-precision output holds the limit rounded to half, which can be below the limit itself
    // (256 * sqrt(0.5) reads back as 181.0). Comparing stored outputs with the rounded limit keeps clamped
    // elements from passing as unclamped ones.
    k.clamp_stored = to_compute(from_compute<T>(k.clamp));
    // Only used when numel < 2^31, and then both fit in 32 bits.
    const bool small = p.numel <= INT32_MAX;
    k.by_stride = make_divider(small ? static_cast<uint32_t>(p.dim_stride) : 1u);
    k.by_size = make_divider(small ? static_cast<uint32_t>(p.dim_size) : 1u);
    return k;
}

// Index along the bias dimension of the element at memory offset i: (i / dim_stride) % dim_size.
template <typename S>
__host__ __device__ __forceinline__ uint32_t bias_index(const BiasActParams&, const Constants<S>& k, uint32_t i)
{
    const uint32_t q = divide(i, k.by_stride);
    return q - divide(q, k.by_size) * k.by_size.divisor;
}

template <typename S>
__host__ __device__ __forceinline__ int64_t bias_index(const BiasActParams& p, const Constants<S>&, int64_t i)
{
    return (i / p.dim_stride) % p.dim_size;
}

template <typename T, int A, int G, typename I, typename S = typename ComputeType<T>::type>
__host__ __device__ __forceinline__ void bias_act_element(const BiasActParams& p, const Constants<S>& k, I i)
{
    constexpr bool kFromX = kGradFromX<A>;

    // The bias is only ever added to a forward input: x itself in the forward pass, xref in the gradients
    // of x-based activations.
    S bias = S(0);
    if constexpr (G == 0 || kFromX) {
        if (p.b != nullptr) {
            bias = to_compute(static_cast<const T*>(p.b)[bias_index(p, k, i)]);
        }
    }

    const S v = to_compute(static_cast<const T*>(p.x)[i]);
    S result;
    if constexpr (G == 0) {
        result = act_value<A>(v + bias, k.alpha) * k.gain;
        if (k.clamp >= S(0)) {
            // Written with comparisons rather than fminf/fmaxf so that NaN passes through like torch.clamp.
            result = result > k.clamp ? k.clamp : (result < -k.clamp ? -k.clamp : result);
        }
    } else {
        bool keep;  // Whether the forward output was left unclamped, i.e. whether any gradient flows.
        S factor;   // What v (times dy in mode 2) is multiplied by.
        if constexpr (kFromX) {
            const S s = to_compute(static_cast<const T*>(p.xref)[i]) + bias;
            if (k.clamp >= S(0)) {
                // Recompute the unclamped forward output exactly as the forward pass did.
                const S y = act_value<A>(s, k.alpha) * k.gain;
                keep = y <= k.clamp && y >= -k.clamp;
            } else {
                keep = true;
            }
            factor = k.gain * (G == 1 ? act_deriv_from_x<A>(s) : act_deriv2_from_x<A>(s));
        } else {
            // linear without clamp needs no reference tensor at all.
            const S y = p.yref != nullptr ? to_compute(static_cast<const T*>(p.yref)[i]) : S(0);
            keep = k.clamp < S(0) || (y < k.clamp_stored && y > -k.clamp_stored);
            const S u = y * k.inv_gain;
            // In mode 2 the gain of mode 1 cancels against du/dy = 1/gain.
            factor = G == 1 ? k.gain * act_deriv_from_y<A>(u, k.alpha) : act_deriv2_from_y<A>(u);
        }
        S upstream = v;
        if constexpr (G == 2) {
            upstream *= to_compute(static_cast<const T*>(p.dy)[i]);
        }
        // Where the output was clamped the gradient is exactly 0, even for an infinite upstream gradient.
        result = keep ? upstream * factor : S(0);
    }
    static_cast<T*>(p.out)[i] = from_compute<T>(result);
}

// ------------------------------------------------------------------------------------------------------
// Kernels and launch.

constexpr int kBlockSize = 256;
constexpr int64_t kMaxBlocks = 65536;  // Larger tensors are covered by the grid-stride loop.

// I is the index type: 32-bit whenever the tensor allows it, which makes the index arithmetic cheaper and
// lets the bias index use the Divider above.
template <typename T, int A, int G, typename I, typename S = typename ComputeType<T>::type>
__global__ void __launch_bounds__(kBlockSize) bias_act_kernel(BiasActParams p, Constants<S> k)
{
    const I n = static_cast<I>(p.numel);
    const I step = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
    const I first = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
    for (I i = first; i < n; i += step)
        bias_act_element<T, A, G, I>(p, k, i);
}

// Calls visitor.run<T, A, G>() for the runtime dtype, activation and mode; false if one is out of range.
template <typename T, int A, typename V>
bool dispatch_grad(int grad, V& visitor)
{
    switch (grad) {
        case 0: visitor.template run<T, A, 0>(); return true;
        case 1: visitor.template run<T, A, 1>(); return true;
        case 2: visitor.template run<T, A, 2>(); return true;
        default: return false;
    }
}

template <typename T, typename V>
bool dispatch_act(int act, int grad, V& visitor)
{
    switch (act) {
        case kBiasActLinear:   return dispatch_grad<T, kBiasActLinear>(grad, visitor);
        case kBiasActRelu:     return dispatch_grad<T, kBiasActRelu>(grad, visitor);
        case kBiasActLrelu:    return dispatch_grad<T, kBiasActLrelu>(grad, visitor);
        case kBiasActTanh:     return dispatch_grad<T, kBiasActTanh>(grad, visitor);
        case kBiasActSigmoid:  return dispatch_grad<T, kBiasActSigmoid>(grad, visitor);
        case kBiasActElu:      return dispatch_grad<T, kBiasActElu>(grad, visitor);
        case kBiasActSelu:     return dispatch_grad<T, kBiasActSelu>(grad, visitor);
        case kBiasActSoftplus: return dispatch_grad<T, kBiasActSoftplus>(grad, visitor);
        case kBiasActSwish:    return dispatch_grad<T, kBiasActSwish>(grad, visitor);
        default: return false;
    }
}

template <typename V>
bool dispatch_all(BiasActDtype dtype, int act, int grad, V& visitor)
{
    switch (dtype) {
        case BiasActDtype::Float16: return dispatch_act<__half>(act, grad, visitor);
        case BiasActDtype::Float32: return dispatch_act<float>(act, grad, visitor);
        case BiasActDtype::Float64: return dispatch_act<double>(act, grad, visitor);
        default: return false;
    }
}

struct Launcher {
    const BiasActParams& p;
    cudaStream_t stream;

    template <typename T, int A, int G>
    void run() const
    {
        int64_t blocks = (p.numel + kBlockSize - 1) / kBlockSize;
        if (blocks > kMaxBlocks)
            blocks = kMaxBlocks;
        // Computed here once rather than by every thread: the dividers take 64-bit divisions.
        const auto k = make_constants<T>(p);
        // With numel < 2^31 and at most 2^24 threads, i + step stays below 2^32: unsigned 32 bits suffice.
        if (p.numel <= INT32_MAX)
            bias_act_kernel<T, A, G, uint32_t><<<static_cast<unsigned>(blocks), kBlockSize, 0, stream>>>(p, k);
        else
            bias_act_kernel<T, A, G, int64_t><<<static_cast<unsigned>(blocks), kBlockSize, 0, stream>>>(p, k);
    }
};

}  // namespace

const char* bias_act_launch(const BiasActParams& p, BiasActDtype dtype, void* stream)
{
    if (p.numel <= 0)
        return nullptr;
    Launcher launcher{p, static_cast<cudaStream_t>(stream)};
    if (!dispatch_all(dtype, p.act, p.grad, launcher))
        return "bias_act: unsupported element type, activation index or gradient mode";
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
