// Interface between the upfirdn2d torch binding (upfirdn2d.cpp) and its CUDA kernels (upfirdn2d.cu).
//
// Deliberately free of torch and CUDA headers: the kernels compile without torch, and the binding compiles
// without the CUDA toolkit's headers. The CUDA stream therefore travels as a void pointer.

#pragma once

#include <cstdint>

// One upfirdn2d call. Per axis, with u the input after zero insertion (u[i * up] = x[i], zeros between):
//     y[o] = gain * sum_k u[o * down - pad0 + k] * g[k],   k = 0 .. taps - 1,
// where g is the filter in convolution order (f reversed), or f itself when flip_filter is set.
struct Upfirdn2dParams
{
    const void*     x;              // Input [n, c, in_h, in_w], float or __half, strides below.
    const float*    f;              // Filter [filter_h, filter_w], float32, contiguous (row-major).
    void*           y;              // Output [n, c, out_h, out_w], same element type as x.

    int64_t         x_stride[4];    // Element strides of x along n, c, h, w (any layout, e.g. channels_last).
    int64_t         y_stride[4];    // Element strides of y along n, c, h, w.

    int             n, c;           // Batch size and channel count.
    int             in_h, in_w;     // Input size.
    int             out_h, out_w;   // Output size; the trailing padding is implied by it.
    int             up_x, up_y;     // Zero-insertion factors, >= 1.
    int             down_x, down_y; // Decimation factors, >= 1.
    int             pad_x0, pad_y0; // Leading padding after zero insertion; negative crops.
    int             filter_w;       // Taps along x.
    int             filter_h;       // Taps along y.
    float           gain;           // Multiplies every output.
    int             flip_filter;    // Nonzero: correlate with f instead of convolving.
};

// Which kernel runs. Auto picks the tiled kernel whenever it supports the call.
enum Upfirdn2dVariant
{
    UPFIRDN2D_AUTO    = 0,
    UPFIRDN2D_GENERAL = 1,          // One output per thread, any arguments (tests compare it with the tiled one).
};

// Launch the kernel for float32 / float16 data on `stream` (a cudaStream_t). Returns 0 on success and a
// CUDA error code otherwise; upfirdn2d_error_string() turns that into a message. A call whose output is
// empty launches nothing.
int upfirdn2d_launch_float(const Upfirdn2dParams& p, int variant, void* stream);
int upfirdn2d_launch_half(const Upfirdn2dParams& p, int variant, void* stream);

// Whether the tiled kernel handles these parameters (the rest go to the general kernel).
bool upfirdn2d_tiled_supports(const Upfirdn2dParams& p);

const char* upfirdn2d_error_string(int error);
