// Interface between the fused bias + activation kernels (bias_act.cu) and their torch binding (bias_act.cpp).
//
// Plain C++ on purpose: the binding is compiled by the host compiler against device-generic torch headers
// only, and the kernels by nvcc without any torch headers, so this file may include neither CUDA nor torch.
//
// Memory layout contract. The kernels walk every tensor linearly in memory, element i of one tensor
// pairing with element i of the others. The binding therefore hands over tensors that are dense and
// non-overlapping (contiguous in *some* order of their dimensions: NCHW, channels-last, ...) and that all
// share one layout. In such a layout the index along any dimension d of the element at memory offset i is
// (i / stride[d]) % size[d], which is how the kernels find the bias of an element without knowing the
// order of the other dimensions.

#pragma once

#include <cstdint>

// Activation functions. The numbers are the `cuda_idx` fields of `activation_funcs` in bias_act.py.
enum BiasActFunc : int {
    kBiasActLinear   = 1,
    kBiasActRelu     = 2,
    kBiasActLrelu    = 3,
    kBiasActTanh     = 4,
    kBiasActSigmoid  = 5,
    kBiasActElu      = 6,
    kBiasActSelu     = 7,
    kBiasActSoftplus = 8,
    kBiasActSwish    = 9,
};

// Which saved tensor the gradient of an activation is computed from: the forward input x (plus bias) for
// softplus and swish, whose derivatives are awkward to express through their output; the forward output
// y for all others. Must agree with the `ref` fields of `activation_funcs` in bias_act.py.
constexpr bool bias_act_grad_uses_x(int act)
{
    return act == kBiasActSoftplus || act == kBiasActSwish;
}

// Element types the kernels accept; they compute in float for Float16/Float32 and in double for Float64.
enum class BiasActDtype : int {
    Float16 = 0,
    Float32 = 1,
    Float64 = 2,
};

// What one launch computes, for every element i (s = xref[i] + b[c(i)], u = yref[i] / gain,
// f = activation, m = clamp mask: 1 where the forward output was not clamped, else 0):
//
//   grad 0 (forward):        out = clamp(gain * f(x[i] + b[c(i)]), -clamp, clamp)
//   grad 1 (d out / d x):    out = x[i] * gain * f'(s or u) * m            (x[i] is the upstream gradient)
//   grad 2 (second order):   x-based: out = x[i] * dy[i] * gain * f''(s) * m    (gradient w.r.t. xref)
//                            y-based: out = x[i] * dy[i] * (df'/df)(u) * m      (gradient w.r.t. yref)
//                            (x[i] is the gradient arriving at the grad-1 output, dy the grad-1 input)
//
// For x-based activations m recomputes the forward value (kept where |gain * f(s)| <= clamp, like
// torch.clamp's gradient); y-based ones can only tell from the stored output (kept where |y| < clamp, with
// clamp rounded to the element type as the clamped outputs were).
struct BiasActParams {
    const void* x;          // grad 0: input; grad 1: upstream gradient; grad 2: gradient of the grad-1 output.
    const void* b;          // Bias, dim_size contiguous elements, or nullptr. Added to x (grad 0) or xref.
    const void* xref;       // Forward input, for x-based activations in grad 1/2; else nullptr.
    const void* yref;       // Forward output, for y-based activations in grad 1/2; nullptr allowed only for
                            // linear without clamp (whose derivative needs nothing).
    const void* dy;         // grad 2: the upstream gradient that grad 1 was given; else nullptr.
    void*       out;        // Result, same layout as the inputs.
    int64_t     numel;      // Number of elements of x (and of every other full-size tensor).
    int64_t     dim_size;   // Size of the bias dimension (1 without bias).
    int64_t     dim_stride; // Memory stride of the bias dimension (1 without bias or when dim_size is 1).
    int         act;        // A BiasActFunc.
    int         grad;       // 0, 1 or 2, see above.
    double      alpha;      // Activation parameter (lrelu slope); ignored by the others.
    double      gain;       // Scale after the activation.
    double      clamp;      // Clamp limit; negative: no clamping.
};

// Launch the kernel on `stream` (a cudaStream_t). Returns nullptr on success, else a CUDA error message.
// Does not synchronize.
const char* bias_act_launch(const BiasActParams& p, BiasActDtype dtype, void* stream);
