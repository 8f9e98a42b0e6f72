// Torch binding of the fused bias + activation kernels: checks the arguments, brings every tensor into the
// one memory layout the kernels expect (see bias_act.h), allocates the result and launches on the current
// stream of the input's device.
//
// Only device-generic c10 headers are used (no c10/cuda, no ATen/cuda), so this file also compiles against a
// CPU-only torch, which is how CI checks it.

#include <torch/extension.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <optional>

#include "bias_act.h"

namespace {

// Whether two tensors of the same sizes put every element at the same memory offset. Strides of size-1
// dimensions do not matter (their index is always 0), so they are not compared.
bool same_layout(const torch::Tensor& a, const torch::Tensor& b)
{
    if (a.sizes() != b.sizes())
        return false;
    for (int64_t d = 0; d < a.dim(); d++)
        if (a.size(d) > 1 && a.stride(d) != b.stride(d))
            return false;
    return true;
}

// `t` with the layout of `layout` (which is dense and non-overlapping): itself when it already has it,
// otherwise a copy. empty_like preserves the strides of a dense non-overlapping tensor exactly.
torch::Tensor with_layout_of(const torch::Tensor& t, const torch::Tensor& layout)
{
    if (same_layout(t, layout))
        return t;
    torch::Tensor copy = torch::empty_like(layout);
    copy.copy_(t);
    return copy;
}

void check_like_x(const torch::Tensor& t, const torch::Tensor& x, const char* name)
{
    TORCH_CHECK(t.device() == x.device(), "bias_act: ", name, " must be on the same device as x");
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "bias_act: ", name, " must have the same dtype as x");
    TORCH_CHECK(t.sizes() == x.sizes(), "bias_act: ", name, " must have the same shape as x");
}

BiasActDtype kernel_dtype(torch::ScalarType type)
{
    if (type == torch::kHalf)
        return BiasActDtype::Float16;
    if (type == torch::kDouble)
        return BiasActDtype::Float64;
    TORCH_CHECK(type == torch::kFloat, "bias_act: the kernel supports float16, float32 and float64, not ", type);
    return BiasActDtype::Float32;
}

torch::Tensor dense(const torch::Tensor& t)
{
    return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// Runs one mode of the kernel (see BiasActParams for the meaning of each argument). Tensors that a mode does
// not use are passed as None. The result has the layout of xref or yref when given (so that gradients come
// out in the layout of the forward tensors), otherwise of x; any other tensor of a different layout is copied
// into that layout first.
torch::Tensor bias_act(
    torch::Tensor                   x,      // Input, upstream gradient, or gradient of the grad-1 output.
    std::optional<torch::Tensor>    b,      // Bias along `dim`, or None.
    std::optional<torch::Tensor>    xref,   // Forward input (x-based activations, grad 1/2), or None.
    std::optional<torch::Tensor>    yref,   // Forward output (y-based activations, grad 1/2), or None.
    std::optional<torch::Tensor>    dy,     // Upstream gradient of grad 1 (grad 2 only), or None.
    int64_t                         grad,   // 0: forward, 1: first derivative, 2: second-order term.
    int64_t                         dim,    // Dimension of x that the bias runs along.
    int64_t                         act,    // Activation index (BiasActFunc).
    double                          alpha,  // Activation parameter.
    double                          gain,   // Scale after the activation.
    double                          clamp)  // Clamp limit; negative: none.
{
    TORCH_CHECK(x.is_cuda(), "bias_act: x must be a CUDA tensor");
    c10::DeviceGuard guard(x.device());
    const BiasActDtype dtype = kernel_dtype(x.scalar_type());
    TORCH_CHECK(act >= kBiasActLinear && act <= kBiasActSwish, "bias_act: invalid activation index ", act);
    TORCH_CHECK(grad >= 0 && grad <= 2, "bias_act: grad must be 0, 1 or 2, got ", grad);

    const bool from_x = bias_act_grad_uses_x(static_cast<int>(act));
    const bool has_b = b.has_value() && b->defined();
    const bool has_xref = xref.has_value() && xref->defined();
    const bool has_yref = yref.has_value() && yref->defined();
    const bool has_dy = dy.has_value() && dy->defined();
    if (grad > 0 && from_x)
        TORCH_CHECK(has_xref, "bias_act: the gradient of this activation needs xref");
    if (grad > 0 && !from_x && (act != kBiasActLinear || clamp >= 0))
        TORCH_CHECK(has_yref, "bias_act: the gradient of this activation needs yref");
    if (grad == 2)
        TORCH_CHECK(has_dy, "bias_act: the second-order mode needs dy");
    if (has_xref)
        check_like_x(*xref, x, "xref");
    if (has_yref)
        check_like_x(*yref, x, "yref");
    if (has_dy)
        check_like_x(*dy, x, "dy");

    int64_t dim_size = 1;
    int64_t dim_stride = 1;
    torch::Tensor bias;
    if (has_b) {
        TORCH_CHECK(dim >= 0 && dim < x.dim(), "bias_act: dim ", dim, " is out of range for a ", x.dim(), "-D x");
        TORCH_CHECK(b->device() == x.device(), "bias_act: b must be on the same device as x");
        TORCH_CHECK(b->scalar_type() == x.scalar_type(), "bias_act: b must have the same dtype as x");
        TORCH_CHECK(b->dim() == 1 && b->size(0) == x.size(dim), "bias_act: b must be 1-D with x.shape[dim] = ",
                    x.size(dim), " elements");
        bias = b->contiguous();
        dim_size = x.size(dim);
    }

    // The layout everything is brought into: that of the forward tensor where there is one, made dense if needed.
    torch::Tensor xr = has_xref ? dense(*xref) : torch::Tensor();
    torch::Tensor yr = has_yref ? dense(*yref) : torch::Tensor();
    if (!has_xref && !has_yref)
        x = dense(x);
    const torch::Tensor layout = has_xref ? xr : (has_yref ? yr : x);
    x = with_layout_of(x, layout);
    if (has_yref)
        yr = with_layout_of(yr, layout);
    torch::Tensor d = has_dy ? with_layout_of(*dy, layout) : torch::Tensor();
    // A size-1 dimension may carry any stride; its index is 0 whatever the stride, so use 1 (never divide by 0).
    if (has_b && dim_size > 1)
        dim_stride = layout.stride(dim);

    torch::Tensor out = torch::empty_like(layout);
    if (out.numel() == 0)
        return out;

    BiasActParams p;
    p.x = x.data_ptr();
    p.b = has_b ? bias.data_ptr() : nullptr;
    // Only the tensor the activation's gradient is computed from is passed, so the kernel never reads
    // a tensor that the mode does not define.
    p.xref = (grad > 0 && from_x) ? xr.data_ptr() : nullptr;
    p.yref = (grad > 0 && !from_x && has_yref) ? yr.data_ptr() : nullptr;
    p.dy = grad == 2 ? d.data_ptr() : nullptr;
    p.out = out.data_ptr();
    p.numel = out.numel();
    p.dim_size = dim_size;
    p.dim_stride = dim_stride;
    p.act = static_cast<int>(act);
    p.grad = static_cast<int>(grad);
    p.alpha = alpha;
    p.gain = gain;
    p.clamp = clamp;

    void* stream = c10::impl::getDeviceGuardImpl(x.device().type())->getStream(x.device()).native_handle();
    const char* error = bias_act_launch(p, dtype, stream);
    TORCH_CHECK(error == nullptr, "bias_act: kernel launch failed: ", error);
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("bias_act", &bias_act, "Fused bias + activation + gain + clamp and its derivatives (see bias_act.h).",
          pybind11::arg("x"), pybind11::arg("b"), pybind11::arg("xref"), pybind11::arg("yref"), pybind11::arg("dy"),
          pybind11::arg("grad"), pybind11::arg("dim"), pybind11::arg("act"), pybind11::arg("alpha"),
          pybind11::arg("gain"), pybind11::arg("clamp"));
}
