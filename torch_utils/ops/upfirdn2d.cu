// CUDA kernels of upfirdn2d: zero-insertion upsampling, padding, FIR filtering and decimation in one pass.
//
// Notation (per axis; see Upfirdn2dParams in upfirdn2d.h). The zero-inserted signal u has u[i * up] = x[i]
// and zeros elsewhere. Output o reads the taps k = 0 .. taps - 1 at positions j + k of u, where
//     j = o * down - pad0
// is the position under tap 0, and weighs them with g[k], the filter in convolution order (f reversed,
// unless flip_filter asks for correlation). Only positions that are multiples of `up` and lie inside the
// input contribute, so a kernel loops over input samples i with i * up in [j, j + taps - 1], i.e. over the
// taps k = i * up - j, instead of over all taps.
//
// Two kernels:
// * The general kernel: one output per thread, reading the input from global memory (through the cache).
//   Any factors, padding, filter size and strides.
// * The tiled kernel: a block stages the input region under a tile of outputs in shared memory (as float,
//   zeros standing in for the padding) and the filter next to it, then computes the tile from there, so
//   every input element is read from global memory about once. It covers up and down factors of 1 or 2 and
//   filters of up to 16 x 16 taps, which includes everything StyleGAN2 does with 2-D filters (4x4, up or
//   down 2) and the two passes of its separable augmentation filters (1 x 12 and 12 x 1). Planar (NCHW)
//   data is tiled 32 x 32 outputs of one channel; channels-innermost data (channels_last) 8 x 8 outputs of
//   8 channels, so that neighbouring threads touch neighbouring addresses in either layout.
// Both accumulate in float32 whatever the element type.

#include <cuda_runtime.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "upfirdn2d.h"

namespace {

constexpr int kThreads = 256;           // Threads per block, both kernels.
constexpr int kTiledMaxFactor = 2;      // Largest up / down factor of the tiled kernel.
constexpr int kTiledMaxTaps = 16;       // Largest filter extent (per axis) of the tiled kernel.
constexpr int kChannelGroup = 8;        // Channels per block of the channels-innermost tiled kernel.
constexpr int kMaxGridY = 65535;        // CUDA's limit on gridDim.y.

// The loops that let one block do the work of several (channel groups beyond gridDim.z in the tiled kernel,
// the grid-stride loop of the general kernel) only run on huge tensors; tests lower these two bounds with -D
// to run those loops on small ones.
#ifndef UPFIRDN2D_MAX_GRID_Z
#define UPFIRDN2D_MAX_GRID_Z 65535      // CUDA's limit on gridDim.z.
#endif
#ifndef UPFIRDN2D_MAX_GENERAL_BLOCKS
#define UPFIRDN2D_MAX_GENERAL_BLOCKS (1 << 20)
#endif
constexpr int kMaxGridZ = UPFIRDN2D_MAX_GRID_Z;
constexpr int kMaxGeneralBlocks = UPFIRDN2D_MAX_GENERAL_BLOCKS;

// Input samples needed along one axis by `tile_out` consecutive outputs, at worst: their taps cover
// (tile_out - 1) * down + taps positions of u, holding at most that many input samples (up = 1).
__host__ __device__ constexpr int tiled_in_extent(int tile_out)
{
    return (tile_out - 1) * kTiledMaxFactor + kTiledMaxTaps;
}

// ----------------------------------------------------------------------------
// Integer division rounding down / up; b > 0, a may be negative (positions left of the input).

__host__ __device__ __forceinline__ int floor_div(int a, int b)
{
    const int q = a / b;                // Truncates towards zero...
    return (q * b > a) ? q - 1 : q;     // ...which is one too high for negative non-multiples.
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b)
{
    return -floor_div(-a, b);
}

// ----------------------------------------------------------------------------
// Element type conversions.

template <typename T> __device__ __forceinline__ float load_as_float(const T* ptr);
template <> __device__ __forceinline__ float load_as_float<float>(const float* ptr) { return *ptr; }
template <> __device__ __forceinline__ float load_as_float<__half>(const __half* ptr) { return __half2float(*ptr); }

template <typename T> __device__ __forceinline__ void store_from_float(T* ptr, float value);
template <> __device__ __forceinline__ void store_from_float<float>(float* ptr, float value) { *ptr = value; }
template <> __device__ __forceinline__ void store_from_float<__half>(__half* ptr, float value)
{
    *ptr = __float2half_rn(value);
}

// ----------------------------------------------------------------------------
// General kernel.

template <typename T>
__global__ void __launch_bounds__(kThreads) upfirdn2d_general_kernel(const Upfirdn2dParams p, bool channels_inner)
{
    const T* __restrict__ x = static_cast<const T*>(p.x);
    T* __restrict__ y = static_cast<T*>(p.y);
    const float* __restrict__ f = p.f;
    const int64_t total = (int64_t)p.n * p.c * p.out_h * p.out_w;

    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x)
    {
        // Enumerate outputs in the output's memory order, so that a warp writes contiguous memory.
        int n, c, oy, ox;
        int64_t rest = idx;
        if (channels_inner)
        {
            c = (int)(rest % p.c);      rest /= p.c;
            ox = (int)(rest % p.out_w); rest /= p.out_w;
            oy = (int)(rest % p.out_h); rest /= p.out_h;
            n = (int)rest;
        }
        else
        {
            ox = (int)(rest % p.out_w); rest /= p.out_w;
            oy = (int)(rest % p.out_h); rest /= p.out_h;
            c = (int)(rest % p.c);      rest /= p.c;
            n = (int)rest;
        }

        // Position of tap 0 in u, and the input samples under the taps: i * up in [j, j + taps - 1],
        // clipped to the input (everything outside it is padding, i.e. zero).
        const int jx = ox * p.down_x - p.pad_x0;
        const int jy = oy * p.down_y - p.pad_y0;
        const int ix_begin = max(ceil_div(jx, p.up_x), 0);
        const int ix_end = min(floor_div(jx + p.filter_w - 1, p.up_x) + 1, p.in_w);
        const int iy_begin = max(ceil_div(jy, p.up_y), 0);
        const int iy_end = min(floor_div(jy + p.filter_h - 1, p.up_y) + 1, p.in_h);

        const T* x_plane = x + n * p.x_stride[0] + c * p.x_stride[1];
        float acc = 0.f;
        for (int iy = iy_begin; iy < iy_end; ++iy)
        {
            const int ky = iy * p.up_y - jy;                                // Tap index, convolution order.
            const int fy = p.flip_filter ? ky : p.filter_h - 1 - ky;        // Row of f holding g[ky].
            const T* x_row = x_plane + iy * p.x_stride[2];
            for (int ix = ix_begin; ix < ix_end; ++ix)
            {
                const int kx = ix * p.up_x - jx;
                const int fx = p.flip_filter ? kx : p.filter_w - 1 - kx;
                acc += load_as_float(x_row + ix * p.x_stride[3]) * f[fy * p.filter_w + fx];
            }
        }
        T* y_ptr = y + n * p.y_stride[0] + c * p.y_stride[1] + oy * p.y_stride[2] + ox * p.y_stride[3];
        store_from_float(y_ptr, acc * p.gain);
    }
}

// ----------------------------------------------------------------------------
// Tiled kernel.
//
// Block (bx, by, bz) computes the outputs ox0 .. ox0 + TILE_W - 1, oy0 .. oy0 + TILE_H - 1 (clipped to the
// image) of channel groups bz, bz + gridDim.z, ..., each group being CG consecutive channels of one image.
// Thread t owns channel t % CG of the group and column (t / CG) % TILE_W of the tile, and computes the rows
// t / (CG * TILE_W), + kRowStep, ... together: its index math is done once, each filter tap is read once for
// all of its rows, and the remaining divisions are by compile-time powers of two. Factors are 1 or 2 here, so dividing an exact multiple of `up` by `up` is a
// shift by up - 1 and a position modulo `up` is a mask with up - 1 (both also right for negative values).

static_assert(kTiledMaxFactor == 2, "the tiled kernel divides by up with a shift of up - 1");

template <typename T, int CG, int TILE_W, int TILE_H>
__global__ void __launch_bounds__(kThreads) upfirdn2d_tiled_kernel(const Upfirdn2dParams p)
{
    static_assert(kThreads % (CG * TILE_W) == 0, "every thread keeps one column and channel in all rows");
    static_assert(32 % CG == 0, "a warp stages whole channel groups");
    constexpr int kRowStep = kThreads / (CG * TILE_W);     // Output rows the block computes per pass.
    constexpr int kRows = TILE_H / kRowStep;                // Output rows per thread.
    static_assert(TILE_H % kRowStep == 0, "the threads cover the tile's rows exactly");
    static_assert(kRowStep % kTiledMaxFactor == 0, "a thread's rows are a multiple of up apart in u");
    constexpr int kStageW = 32 / CG;                        // Input columns a warp stages per pass.
    constexpr int kStageRowStep = kThreads / 32;            // Input rows the block stages per pass (one a warp).
    constexpr int kInW = tiled_in_extent(TILE_W);
    constexpr int kInH = tiled_in_extent(TILE_H);
    __shared__ float s_f[kTiledMaxTaps * kTiledMaxTaps];    // g with the gain folded in, [ky][kx].
    __shared__ float s_x[kInH * kInW * CG];                 // Staged input, [ly][lx][channel], rows in_tw long.

    const T* __restrict__ x = static_cast<const T*>(p.x);
    T* __restrict__ y = static_cast<T*>(p.y);
    const int fw = p.filter_w;
    const int fh = p.filter_h;
    const int down_x = p.down_x, down_y = p.down_y;
    const int up_mask_x = p.up_x - 1, up_mask_y = p.up_y - 1;   // Also the shift that divides by up.

    // The filter in convolution order: s_f[ky * fw + kx] weighs the sample under tap (kx, ky). Made visible
    // to the whole block by the first __syncthreads() of the loop below.
    for (int i = threadIdx.x; i < fw * fh; i += kThreads)
    {
        const int ky = i / fw;
        const int kx = i % fw;
        const int src = p.flip_filter ? i : (fh - 1 - ky) * fw + (fw - 1 - kx);
        s_f[i] = p.f[src] * p.gain;
    }

    // This tile's outputs, the position in u under tap 0 of its first output, and the input samples its
    // taps can reach: i * up in [j0, j0 + (tile - 1) * down + taps - 1]. The staged region starts at
    // (ix_lo, iy_lo) and is in_tw x in_th samples (possibly none, for a 1-tap filter that only sees
    // inserted zeros); tiled_in_extent() bounds it.
    const int ox0 = blockIdx.x * TILE_W;
    const int oy0 = blockIdx.y * TILE_H;
    const int tw = min(TILE_W, p.out_w - ox0);
    const int th = min(TILE_H, p.out_h - oy0);
    const int jx0 = ox0 * down_x - p.pad_x0;
    const int jy0 = oy0 * down_y - p.pad_y0;
    const int ix_lo = ceil_div(jx0, p.up_x);
    const int iy_lo = ceil_div(jy0, p.up_y);
    const int in_tw = floor_div(jx0 + (tw - 1) * down_x + fw - 1, p.up_x) - ix_lo + 1;
    const int in_th = floor_div(jy0 + (th - 1) * down_y + fh - 1, p.up_y) - iy_lo + 1;

    // This thread's output column. Tap 0 sits at jx in u; the first tap that lands on an input sample is the
    // one that brings jx up to a multiple of up, and that sample's staged column is (jx + kx) / up - ix_lo.
    // Later taps on samples follow every `up` taps, one staged sample apart.
    const int cl = threadIdx.x % CG;
    const int lx = (threadIdx.x / CG) % TILE_W;
    const int ly_first = threadIdx.x / (CG * TILE_W);
    const int jx = jx0 + lx * down_x;
    const int kx_first = (-jx) & up_mask_x;
    const int sx_first = ((jx + kx_first) >> up_mask_x) - ix_lo;

    // This thread's part of the staging: channel cl (the same as above), columns stage_lx, + kStageW, ...
    // of rows stage_ly, + kStageRowStep, ... A warp covers kStageW whole columns of its channel group, so
    // neighbouring lanes read neighbouring addresses in both layouts (x innermost, or channels innermost).
    const int stage_lx = (threadIdx.x % 32) / CG;
    const int stage_ly = threadIdx.x / 32;

    const int groups_per_image = (p.c + CG - 1) / CG;
    const int64_t num_groups = (int64_t)p.n * groups_per_image;
    for (int64_t group = blockIdx.z; group < num_groups; group += gridDim.z)
    {
        const int n = (int)(group / groups_per_image);
        const int c = (int)(group % groups_per_image) * CG + cl;
        const bool channel_exists = c < p.c;

        // Wait until every thread is done with the previous group's s_x (and, the first time, s_f is full).
        __syncthreads();

        // Stage the input region as float; zeros outside the image stand for the padding.
        for (int ly = stage_ly; ly < in_th; ly += kStageRowStep)
        {
            const int iy = iy_lo + ly;
            const bool row_exists = channel_exists && iy >= 0 && iy < p.in_h;
            const T* x_row = x + n * p.x_stride[0] + c * p.x_stride[1] + iy * p.x_stride[2];
            for (int sx = stage_lx; sx < in_tw; sx += kStageW)
            {
                const int ix = ix_lo + sx;
                float v = 0.f;
                if (row_exists && ix >= 0 && ix < p.in_w)
                    v = load_as_float(x_row + ix * p.x_stride[3]);
                s_x[(ly * in_tw + sx) * CG + cl] = v;
            }
        }
        __syncthreads();

        if (!channel_exists || lx >= tw || ly_first >= th)
            continue;  // No output of this thread in this group; the next barrier is at the top of the loop.

        // This thread's rows are ly_first + r * kRowStep. Tap 0 of the first sits at jy in u, and the same
        // construction as for the column gives its first tap on a sample and that sample's staged row. From
        // one of the thread's rows to the next, tap 0 moves by kRowStep * down positions, a multiple of up:
        // every row has the same first tap, and its staged rows are kRowStep * down / up further down. So
        // one filter tap read from shared memory serves all of the thread's rows.
        const int rows = min(kRows, (th - ly_first + kRowStep - 1) / kRowStep);
        const int jy = jy0 + ly_first * down_y;
        const int ky_first = (-jy) & up_mask_y;
        const int sy_first = ((jy + ky_first) >> up_mask_y) - iy_lo;
        const int row_step = ((kRowStep * down_y) >> up_mask_y) * in_tw * CG;  // In elements of s_x.

        float acc[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
            acc[r] = 0.f;
        for (int ky = ky_first, sy = sy_first; ky < fh; ky += p.up_y, ++sy)
        {
            const float* f_row = s_f + ky * fw;
            const float* x_row = s_x + (sy * in_tw + sx_first) * CG + cl;
            for (int kx = kx_first, k = 0; kx < fw; kx += p.up_x, k += CG)
            {
                const float weight = f_row[kx];
#pragma unroll
                for (int r = 0; r < kRows; ++r)
                    if (r < rows)
                        acc[r] += x_row[k + r * row_step] * weight;
            }
        }

        const int ox = ox0 + lx;
        T* y_column = y + n * p.y_stride[0] + c * p.y_stride[1] + ox * p.y_stride[3];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
            if (r < rows)
                store_from_float(y_column + (oy0 + ly_first + r * kRowStep) * p.y_stride[2], acc[r]);
    }
}

// ----------------------------------------------------------------------------
// Launching.

// Channels innermost in memory (channels_last) and enough of them to fill a channel group.
bool channels_innermost(const Upfirdn2dParams& p)
{
    return p.x_stride[1] == 1 && p.c >= kChannelGroup;
}

template <typename T, int CG, int TILE_W, int TILE_H>
void launch_tiled(const Upfirdn2dParams& p, cudaStream_t stream)
{
    const int64_t num_groups = (int64_t)p.n * ((p.c + CG - 1) / CG);
    const dim3 grid((p.out_w + TILE_W - 1) / TILE_W, (p.out_h + TILE_H - 1) / TILE_H,
                    (unsigned)std::min<int64_t>(num_groups, kMaxGridZ));
    upfirdn2d_tiled_kernel<T, CG, TILE_W, TILE_H><<<grid, kThreads, 0, stream>>>(p);
}

// The tiled kernel pays off once a tile holds at least one output per thread; below that (tiny images,
// few channels) most of its threads would idle, and the general kernel spreads the work better.
bool tiled_worth_it(const Upfirdn2dParams& p)
{
    if (channels_innermost(p))
        return (int64_t)std::min(p.out_w, 8) * std::min(p.out_h, 8) * kChannelGroup >= kThreads;
    return (int64_t)std::min(p.out_w, 32) * std::min(p.out_h, 32) >= kThreads;
}

template <typename T>
int launch(const Upfirdn2dParams& p, int variant, void* stream_handle)
{
    cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
    const int64_t total = (int64_t)p.n * p.c * p.out_h * p.out_w;
    if (total == 0)
        return (int)cudaSuccess;

    if (variant == UPFIRDN2D_AUTO && upfirdn2d_tiled_supports(p) && tiled_worth_it(p))
    {
        if (channels_innermost(p))
            launch_tiled<T, kChannelGroup, 8, 8>(p, stream);
        else
            launch_tiled<T, 1, 32, 32>(p, stream);
    }
    else
    {
        const int blocks = (int)std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxGeneralBlocks);
        const bool channels_inner = (p.y_stride[1] == 1 && p.c > 1);
        upfirdn2d_general_kernel<T><<<blocks, kThreads, 0, stream>>>(p, channels_inner);
    }
    return (int)cudaGetLastError();
}

} // namespace

// ----------------------------------------------------------------------------
// Entry points declared in upfirdn2d.h.

bool upfirdn2d_tiled_supports(const Upfirdn2dParams& p)
{
    const bool factors_ok = p.up_x >= 1 && p.up_x <= kTiledMaxFactor && p.up_y >= 1 && p.up_y <= kTiledMaxFactor &&
                            p.down_x >= 1 && p.down_x <= kTiledMaxFactor &&
                            p.down_y >= 1 && p.down_y <= kTiledMaxFactor;
    const bool taps_ok = p.filter_w >= 1 && p.filter_w <= kTiledMaxTaps &&
                         p.filter_h >= 1 && p.filter_h <= kTiledMaxTaps;
    // The smallest tile height in use (8) decides how many rows of tiles gridDim.y can address.
    const bool grid_ok = (p.out_h + 7) / 8 <= kMaxGridY;
    return factors_ok && taps_ok && grid_ok;
}

int upfirdn2d_launch_float(const Upfirdn2dParams& p, int variant, void* stream)
{
    return launch<float>(p, variant, stream);
}

int upfirdn2d_launch_half(const Upfirdn2dParams& p, int variant, void* stream)
{
    return launch<__half>(p, variant, stream);
}

const char* upfirdn2d_error_string(int error)
{
    return cudaGetErrorString(static_cast<cudaError_t>(error));
}
