// Torch binding of the upfirdn2d CUDA kernels (upfirdn2d.cu): checks the arguments, allocates the output and
// launches on the current stream.
//
// Only device-generic c10 APIs are used (DeviceGuard, the device guard interface for the current stream), so
// this file also compiles against a CPU-only torch installation, which is how CI checks it.

#include <torch/extension.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <climits>
#include <cstdlib>

#include "upfirdn2d.h"

namespace {

// Sizes, paddings and positions are plain ints inside the kernels; refuse anything that could overflow one.
// Every position the kernels form is bounded by the padded length plus a filter extent, hence the margin.
constexpr int64_t kMaxExtent = INT_MAX / 4;

int64_t checked_output_size(int64_t in_size, int64_t up, int64_t down, int64_t pad0, int64_t pad1, int64_t taps,
                            const char* axis)
{
    TORCH_CHECK(in_size * up + std::abs(pad0) + std::abs(pad1) + taps <= kMaxExtent,
                "upfirdn2d: the ", axis, " extent is too large for the kernel");
    const int64_t padded = in_size * up + pad0 + pad1;
    TORCH_CHECK(padded >= taps, "upfirdn2d: along ", axis, ", the upsampled and padded input (", padded,
                " samples) is shorter than the filter (", taps, " taps)");
    return (padded - taps) / down + 1;
}

torch::Tensor upfirdn2d(
    const torch::Tensor&    x,              // [N, C, H, W], float32 or float16, CUDA, any strides.
    const torch::Tensor&    f,              // [fh, fw], float32, on x's device.
    int64_t                 up_x,           // Zero-insertion factors.
    int64_t                 up_y,
    int64_t                 down_x,         // Decimation factors.
    int64_t                 down_y,
    int64_t                 pad_x0,         // Padding after zero insertion, negative crops.
    int64_t                 pad_x1,
    int64_t                 pad_y0,
    int64_t                 pad_y1,
    bool                    flip_filter,    // Correlate instead of convolving.
    double                  gain,           // Multiplies the output.
    int64_t                 variant)        // Upfirdn2dVariant: 0 picks the kernel, 1 forces the general one.
{
    TORCH_CHECK(x.is_cuda(), "upfirdn2d: x must be a CUDA tensor");
    TORCH_CHECK(x.dim() == 4, "upfirdn2d: x must be 4-D [N, C, H, W], got ", x.dim(), " dimensions");
    TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kHalf,
                "upfirdn2d: x must be float32 or float16, got ", x.scalar_type());
    TORCH_CHECK(f.device() == x.device(), "upfirdn2d: f must be on x's device (", x.device(), "), got ", f.device());
    TORCH_CHECK(f.scalar_type() == torch::kFloat, "upfirdn2d: f must be float32, got ", f.scalar_type());
    TORCH_CHECK(f.dim() == 2 && f.size(0) >= 1 && f.size(1) >= 1,
                "upfirdn2d: f must be a non-empty 2-D filter [fh, fw], got ", f.sizes());
    TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1,
                "upfirdn2d: up and down factors must be >= 1");
    TORCH_CHECK(variant == UPFIRDN2D_AUTO || variant == UPFIRDN2D_GENERAL, "upfirdn2d: unknown variant ", variant);
    TORCH_CHECK(x.size(0) <= INT_MAX && x.size(1) <= INT_MAX, "upfirdn2d: batch or channel count too large");

    const int64_t out_w = checked_output_size(x.size(3), up_x, down_x, pad_x0, pad_x1, f.size(1), "x");
    const int64_t out_h = checked_output_size(x.size(2), up_y, down_y, pad_y0, pad_y1, f.size(0), "y");

    c10::DeviceGuard device_guard(x.device());
    const torch::Tensor filter = f.contiguous();
    // The output keeps the input's layout (channels_last stays channels_last).
    torch::Tensor y = torch::empty({x.size(0), x.size(1), out_h, out_w},
                                   x.options().memory_format(x.suggest_memory_format()));

    Upfirdn2dParams p;
    p.x = x.data_ptr();
    p.f = filter.data_ptr<float>();
    p.y = y.data_ptr();
    for (int d = 0; d < 4; ++d)
    {
        p.x_stride[d] = x.stride(d);
        p.y_stride[d] = y.stride(d);
    }
    p.n = (int)x.size(0);
    p.c = (int)x.size(1);
    p.in_h = (int)x.size(2);
    p.in_w = (int)x.size(3);
    p.out_h = (int)out_h;
    p.out_w = (int)out_w;
    p.up_x = (int)up_x;
    p.up_y = (int)up_y;
    p.down_x = (int)down_x;
    p.down_y = (int)down_y;
    p.pad_x0 = (int)pad_x0;
    p.pad_y0 = (int)pad_y0;
    p.filter_w = (int)filter.size(1);
    p.filter_h = (int)filter.size(0);
    p.gain = (float)gain;
    p.flip_filter = flip_filter ? 1 : 0;

    // The stream torch would use for this device right now, without naming any CUDA type here.
    void* stream = c10::impl::getDeviceGuardImpl(x.device().type())->getStream(x.device()).native_handle();
    const int error = (x.scalar_type() == torch::kHalf) ? upfirdn2d_launch_half(p, (int)variant, stream)
                                                        : upfirdn2d_launch_float(p, (int)variant, stream);
    TORCH_CHECK(error == 0, "upfirdn2d: kernel launch failed: ", upfirdn2d_error_string(error));
    return y;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("upfirdn2d", &upfirdn2d, "Upsample, pad, FIR-filter and downsample a batch of images (CUDA).",
          pybind11::arg("x"), pybind11::arg("f"), pybind11::arg("up_x"), pybind11::arg("up_y"),
          pybind11::arg("down_x"), pybind11::arg("down_y"), pybind11::arg("pad_x0"), pybind11::arg("pad_x1"),
          pybind11::arg("pad_y0"), pybind11::arg("pad_y1"), pybind11::arg("flip_filter"), pybind11::arg("gain"),
          pybind11::arg("variant") = 0);
}
