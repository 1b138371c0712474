// pybind11 module dfp._C: the compiled core on raw buffers. Python passes data pointers
// of tensors it has checked (dtype, contiguity, shapes); the GIL is released while the
// kernels run. No torch headers: one build serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/api.h"
#include "cpu/batch_norm.h"
#include "cpu/conv.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/layer.h"
#include "cpu/numerics.h"
#include "cpu/peak.h"
#include "cpu/threads.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Calls fn with a value of the element type a tensor holds: float, or bfloat16.
template <typename Fn>
void with_element_type(bool bfloat16, Fn fn) {
  if (bfloat16)
    fn(dfp::BFloat16{});
  else
    fn(float{});
}

// A fused ReLU's gate from its addresses (all 0: none).
template <typename T>
dfp::ReluGate<T> relu_gate(uintptr_t scale, uintptr_t shift, uintptr_t out) {
  return {ptr<const float>(scale), ptr<const float>(shift), ptr<const T>(out)};
}

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (dfp::Isa isa : dfp::supported_isas()) names.emplace_back(dfp::isa_name(isa));
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dfp's compiled DFP16 core (quantize, pack, int16 GEMM) on raw CPU buffers";
  m.def("supported_isas", &supported_isa_names, "CPU paths this machine can run, fastest first");
  m.def("isa", [] { return std::string(dfp::isa_name(dfp::active_isa())); }, "the active CPU path");
  m.def("set_isa", &dfp::set_isa, "force a CPU path by name", py::arg("name"));
  m.def("thread_runtime", &dfp::thread_runtime, "whose threads run dfp's parallel loops");
  m.def(
      "micro_kernel", [](int64_t columns) { return std::string(dfp::micro_kernel(dfp::active_isa(), columns).name); },
      "the micro-kernel that a product of this many columns runs", py::arg("columns") = 1 << 20);
  m.def("chain_length", [](int ha, int hb) { return dfp::chain_length(ha, hb); });
#ifdef DFP_X86_KERNELS
  m.def(
      "peak_gmacs_avx2",
      [](int64_t iterations) {
        double int16, fp32;
        {
          py::gil_scoped_release release;
          int16 = dfp::peak_int16_gmacs_avx2(iterations);
          fp32 = dfp::peak_fp32_gmacs_avx2(iterations);
        }
        return py::make_tuple(int16, fp32);
      },
      "(int16 vpmaddwd+vpaddd, fp32 FMA) multiply-adds per second of one core, in GMAC/s; AVX2 hosts only",
      py::arg("iterations") = 50'000'000);
#endif
  m.def(
      "peak_gmacs",
      [](int64_t iterations) {
        py::gil_scoped_release release;
        return dfp::peak_probes(iterations);
      },
      "[(path, GMAC/s)] register-only multiply-add peaks of one core for every path cpuid reports (fp32 FMA "
      "ymm/zmm, int16 vpmaddwd+vpaddd ymm/zmm, vpdpwssd zmm, bf16 vdpbf16ps zmm); empty off x86",
      py::arg("iterations") = 10'000'000);
  m.def(
      "micro_kernel_gmacs",
      [](int headroom, int64_t calls) {
        if (headroom < 0 || headroom > 13)
          throw py::value_error("headroom must be in 0..13, got " + std::to_string(headroom));
        if (calls < 1) throw py::value_error("calls must be at least 1, got " + std::to_string(calls));
        py::gil_scoped_release release;
        return dfp::micro_kernel_gmacs(headroom, calls);
      },
      "(name, GMAC/s) of the active path's wide micro-kernel alone, its tile in L1, chains as long as headroom "
      "allows", py::arg("headroom"), py::arg("calls") = 2000);

  m.def(
      "quantize3d",
      [](uintptr_t x, int64_t O, int64_t N, int64_t I, int mode, int64_t block, int headroom, int rounding,
         uint64_t seed, uintptr_t mantissa, uintptr_t exponent, int nthreads) {
        py::gil_scoped_release release;
        return dfp::quantize3d(ptr<const float>(x), O, N, I, mode, block, headroom, rounding, seed,
                               ptr<int16_t>(mantissa), ptr<int32_t>(exponent), nthreads);
      },
      "quantize a contiguous (O, N, I) float32 buffer; False on NaN/Inf");

  m.def(
      "quantize_gradient",
      [](uintptr_t x, int64_t rows, int64_t cols, int headroom, uint64_t seed, uintptr_t q_blocks, uintptr_t e_blocks,
         int64_t block, int blocks_rounding, uintptr_t q_groups, uintptr_t e_groups, int64_t group_rows,
         int64_t group_cols, int groups_rounding, int nthreads) {
        py::gil_scoped_release release;
        const dfp::GradientQuantization out{ptr<int16_t>(q_blocks), ptr<int32_t>(e_blocks), block,
                                            dfp::Rounding(blocks_rounding), ptr<int16_t>(q_groups),
                                            ptr<int32_t>(e_groups), group_rows, dfp::Rounding(groups_rounding),
                                            group_cols};
        return dfp::quantize_gradient(ptr<const float>(x), rows, cols, headroom, seed, out, nthreads);
      },
      "quantize a contiguous (rows, cols) float32 buffer per block of rows and column and/or per group of rows "
      "and columns (a q pointer of 0: not that one), each rounded its own way, in two passes; False on NaN/Inf");

  m.def(
      "quantize_padded",
      [](uintptr_t x, int64_t images, int64_t rows, int64_t cols, int64_t channels, int64_t pad_rows,
         int64_t pad_cols, int64_t out_channels, int headroom, uintptr_t out, uintptr_t exponent, int nthreads) {
        py::gil_scoped_release release;
        const dfp::PaddedImage image{images, rows, cols, channels, pad_rows, pad_cols, out_channels};
        return dfp::quantize_padded(ptr<const float>(x), image, headroom, ptr<int16_t>(out), ptr<int32_t>(exponent),
                                    nthreads);
      },
      "quantize a contiguous (N, H, W, C) float32 image per tensor into its zero-padded int16 copy; False on "
      "NaN/Inf");

  m.def(
      "quantize_input",
      [](uintptr_t x, int64_t images, int64_t rows, int64_t cols, int64_t channels, int64_t pad_rows,
         int64_t pad_cols, int64_t out_channels, int headroom, uintptr_t q_rows, uintptr_t e_rows, int64_t row_block,
         uintptr_t q_channels, uintptr_t e_channels, int64_t group_samples, int nthreads) {
        py::gil_scoped_release release;
        const dfp::PaddedImage image{images, rows, cols, channels, pad_rows, pad_cols, out_channels};
        const dfp::InputQuantization out{ptr<int16_t>(q_rows),     ptr<int32_t>(e_rows),     row_block,
                                         ptr<int16_t>(q_channels), ptr<int32_t>(e_channels), group_samples};
        return dfp::quantize_input(ptr<const float>(x), image, headroom, out, nthreads);
      },
      "quantize a contiguous (N, H, W, C) float32 image into two zero-padded int16 copies: per image row and "
      "channel block, and per group of samples and channel; False on NaN/Inf");

  m.def(
      "to_channel_major",
      [](uintptr_t x, int64_t n, int64_t pixels, int64_t channels, uintptr_t out, int nthreads) {
        py::gil_scoped_release release;
        dfp::to_channel_major(ptr<const int16_t>(x), n, pixels, channels, ptr<int16_t>(out), nthreads);
      },
      "a contiguous int16 (N, pixels, C) image into channel planes (N, C, pixels)");

  m.def(
      "copy_window",
      [](uintptr_t x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
         int64_t out_channels, uintptr_t out, int nthreads) {
        py::gil_scoped_release release;
        dfp::copy_window(ptr<const int16_t>(x), n, h, w, c, {r0, r1, c0, c1, out_channels}, ptr<int16_t>(out),
                         nthreads);
      },
      "rows [r0, r1), columns [c0, c1) of a contiguous int16 (N, H, W, C) image with out_channels channels, zeros "
      "past its edges");

  m.def(
      "gemm_int16",
      [](uintptr_t a, int64_t sam, int64_t sak, uintptr_t b, int64_t sbk, int64_t sbn, int64_t M, int64_t N,
         int64_t K, uintptr_t ea, uintptr_t eb, int64_t kblock, int ha, int hb, uintptr_t bias, uintptr_t c,
         int nthreads) {
        py::gil_scoped_release release;
        dfp::gemm_int16(ptr<const int16_t>(a), sam, sak, ptr<const int16_t>(b), sbk, sbn, M, N, K,
                        ptr<const int32_t>(ea), ptr<const int32_t>(eb), kblock, ha, hb, ptr<const float>(bias),
                        ptr<float>(c), nthreads);
      },
      "C = A B on int16 mantissas (element strides), exponents (M, KB) and (KB, N)");

  m.def(
      "matmul_float",
      [](uintptr_t x, uintptr_t y, int64_t M, int64_t N, int64_t K, int headroom, int grouping, int64_t block,
         int rounding, uint64_t seed_x, uint64_t seed_y, uintptr_t bias, uintptr_t c, int nthreads) {
        py::gil_scoped_release release;
        return dfp::matmul_float(ptr<const float>(x), ptr<const float>(y), M, N, K, headroom,
                                 dfp::MatmulGrouping(grouping), block, rounding, seed_x, seed_y,
                                 ptr<const float>(bias), ptr<float>(c), nthreads);
      },
      "quantize x and y into packed panels and multiply; False on NaN/Inf");

  py::class_<dfp::ConvGeometry>(m, "ConvGeometry")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t>(),
           py::arg("n"), py::arg("hp"), py::arg("wp"), py::arg("channels"), py::arg("groups"), py::arg("kh"),
           py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("dh"), py::arg("dw"));

  m.def(
      "conv_gemm_int16",
      [](uintptr_t x, const dfp::ConvGeometry& geometry, uintptr_t ex, int64_t ex_count, int64_t ex_channel_block,
         int hx, uintptr_t w, int64_t swg, int64_t swk, int64_t swn, int64_t nout, uintptr_t ew, int64_t kblock,
         int hw, uintptr_t bias, uintptr_t y, int nthreads) {
        py::gil_scoped_release release;
        dfp::conv_gemm_int16(ptr<const int16_t>(x), geometry, {ptr<const int32_t>(ex), ex_count, ex_channel_block},
                             hx, ptr<const int16_t>(w), swg, swk, swn, nout, ptr<const int32_t>(ew), kblock, hw,
                             ptr<const float>(bias), ptr<float>(y), nthreads);
      },
      "y = patches(x) w per group (x's exponents per tensor, per image, or per image row and channel block), "
      "patches read in place or gathered per cache block (no im2col matrix)");

  m.def(
      "conv_grad_weight_int16",
      [](uintptr_t dy, int64_t cout, uintptr_t ey, int64_t kblock, int hy, uintptr_t x,
         const dfp::ConvGeometry& geometry, uintptr_t ex, bool ex_per_sample, int hx, uintptr_t dw, int nthreads) {
        py::gil_scoped_release release;
        dfp::conv_grad_weight_int16(ptr<const int16_t>(dy), cout, ptr<const int32_t>(ey), kblock, hy,
                                    ptr<const int16_t>(x), geometry, {ptr<const int32_t>(ex), ex_per_sample}, hx,
                                    ptr<float>(dw), 0, nthreads);
      },
      "dw = dy^T patches(x) per group (dy's exponents per block of pixels and channel), patches read in place "
      "or gathered per cache block");

  m.def("grad_weight_reads_channel_major", &dfp::grad_weight_reads_channel_major,
        "whether conv_grad_weight reads the padded image (geometry, cout output channels) as channel planes, "
        "which the forward then writes so");

  py::class_<dfp::ConvLayer>(m, "ConvLayer")
      .def(py::init([](std::vector<int64_t> sizes, std::vector<int64_t> weight_strides, int headroom,
                       bool weight_per_channel) {
             if (sizes.size() != 15 || weight_strides.size() != 4)
               throw std::invalid_argument("ConvLayer: 15 sizes and 4 weight strides");
             dfp::ConvLayer l{};
             int64_t* fields[] = {&l.n,  &l.h,  &l.w,  &l.c,  &l.cout, &l.groups, &l.kh,      &l.kw,
                                  &l.sh, &l.sw, &l.ph, &l.pw, &l.dh,   &l.dw,     &l.channels};
             for (size_t i = 0; i < sizes.size(); ++i) *fields[i] = sizes[i];
             std::copy(weight_strides.begin(), weight_strides.end(), l.weight_strides);
             l.headroom = headroom;
             l.weight_per_channel = weight_per_channel;
             return l;
           }),
           py::arg("sizes"), py::arg("weight_strides"), py::arg("headroom"), py::arg("weight_per_channel"),
           "sizes: (n, h, w, c, cout, groups, kh, kw, sh, sw, ph, pw, dh, dw, channels of the padded image)");

  m.def(
      "conv_forward",
      [](uintptr_t x, uintptr_t weight, uintptr_t bias, const dfp::ConvLayer& layer, int64_t row_block,
         int64_t group_samples, bool channel_major, uintptr_t x_padded, uintptr_t x_exponent, uintptr_t y,
         uintptr_t y_mean, uintptr_t y_variance, int nthreads) {
        py::gil_scoped_release release;
        return dfp::conv_forward(ptr<const float>(x), ptr<const float>(weight), ptr<const float>(bias), layer,
                                 {row_block, group_samples, channel_major}, ptr<int16_t>(x_padded),
                                 ptr<int32_t>(x_exponent), ptr<float>(y), ptr<double>(y_mean),
                                 ptr<double>(y_variance), nthreads);
      },
      "a layer's forward from float32 x (channels last) and weight: x quantized and zero-padded, y = conv + bias, "
      "and y's per channel mean and biased variance (float64) where y_mean is not 0; False on NaN/Inf");

  m.def(
      "conv_grad_input",
      [](uintptr_t dy, uintptr_t ey, int64_t ey_count, int64_t ey_channel_block, uintptr_t weight, int64_t block,
         const dfp::ConvLayer& layer, uintptr_t dx, int nthreads) {
        py::gil_scoped_release release;
        return dfp::conv_grad_input(ptr<const int16_t>(dy), {ptr<const int32_t>(ey), ey_count, ey_channel_block},
                                    ptr<const float>(weight), block, layer, ptr<float>(dx), nthreads);
      },
      "a layer's dx from int16 dy and the float32 weight, quantized here for the reduction over output "
      "channels; False on NaN/Inf");

  m.def(
      "conv_grad_weight",
      [](uintptr_t dy, uintptr_t ey, int64_t ey_count, int64_t kblock, uintptr_t x_padded, uintptr_t x_exponent,
         bool x_per_sample, bool x_channel_major, const dfp::ConvLayer& layer, uintptr_t dw, int nthreads) {
        py::gil_scoped_release release;
        return dfp::conv_grad_weight(ptr<const int16_t>(dy), ptr<const int32_t>(ey), ey_count, kblock,
                                     ptr<const int16_t>(x_padded),
                                     {ptr<const int32_t>(x_exponent), x_per_sample, x_channel_major}, layer,
                                     ptr<float>(dw), 0, nthreads);
      },
      "a layer's dW from int16 dy and the padded int16 input, written at the layer's weight strides; False on "
      "NaN/Inf");

  py::class_<dfp::NormInputGradient>(m, "NormInputGradient")
      .def(py::init([](uintptr_t x, uintptr_t dy, uintptr_t mean, uintptr_t x_scale, uintptr_t dy_scale,
                       uintptr_t shift, uintptr_t gate_scale, uintptr_t gate_shift, int64_t channels) {
             return dfp::NormInputGradient{ptr<const float>(x),
                                           ptr<const float>(dy),
                                           ptr<const float>(mean),
                                           ptr<const float>(x_scale),
                                           ptr<const float>(dy_scale),
                                           ptr<const float>(shift),
                                           relu_gate<float>(gate_scale, gate_shift, 0),
                                           channels};
           }),
           "a batch norm's float32 input gradient, unwritten (csrc/cpu/batch_norm.h): (x - mean) * x_scale + g * "
           "dy_scale + shift per channel, g = dy gated by the forward's output recomputed from gate_scale and "
           "gate_shift (0: no gate)")
      .def(
          "write",
          [](const dfp::NormInputGradient& self, int64_t rows, uintptr_t out, int nthreads) {
            py::gil_scoped_release release;
            float* dx = ptr<float>(out);
            dfp::for_row_chunks(rows, self.channels, nthreads,
                                [&](int64_t r0, int64_t r1) { self.rows(r0, r1, dx + r0 * self.channels); });
          },
          "all its rows into out (float32, rows x channels)");

  m.def(
      "conv_backward",
      [](uintptr_t dy, uintptr_t weight, uintptr_t x_padded, uintptr_t x_exponent, bool x_per_sample,
         bool x_channel_major, const dfp::ConvLayer& layer, int64_t dy_block, int input_groups, int64_t row_block,
         int dy_block_rounding, int input_rounding, uint64_t seed, int64_t weight_block, uintptr_t dx, uintptr_t dw,
         int nthreads, const dfp::NormInputGradient& norm) {
        py::gil_scoped_release release;
        const dfp::GradientRounding rounding{dy_block,
                                             dfp::InputGroups(input_groups),
                                             row_block,
                                             dfp::Rounding(dy_block_rounding),
                                             dfp::Rounding(input_rounding),
                                             seed,
                                             weight_block};
        return dfp::conv_backward(ptr<const float>(dy), ptr<const float>(weight), ptr<const int16_t>(x_padded),
                                  {ptr<const int32_t>(x_exponent), x_per_sample, x_channel_major}, layer, rounding,
                                  ptr<float>(dx), ptr<float>(dw), nthreads,
                                  norm.channels ? &norm : nullptr);
      },
      "a layer's backward from the float32 output gradient (channels last): dy quantized for both products, then "
      "dx (0: not asked) and dW at the weight's strides (0: not asked); False on NaN/Inf. Where norm is given "
      "(NormInputGradient), dy is 0: the input gradient of the batch norm behind the layer, made as it is read",
      py::arg("dy"), py::arg("weight"), py::arg("x_padded"), py::arg("x_exponent"), py::arg("x_per_sample"),
      py::arg("x_channel_major"), py::arg("layer"), py::arg("dy_block"), py::arg("input_groups"),
      py::arg("row_block"), py::arg("dy_block_rounding"), py::arg("input_rounding"), py::arg("seed"),
      py::arg("weight_block"), py::arg("dx"), py::arg("dw"), py::arg("nthreads"),
      py::arg("norm") = dfp::NormInputGradient{});

  m.def(
      "batch_norm_statistics",
      [](uintptr_t x, int64_t images, int64_t pixels, int64_t channels, uintptr_t mean, uintptr_t variance,
         bool bfloat16, int nthreads) {
        py::gil_scoped_release release;
        with_element_type(bfloat16, [&](auto element) {
          using T = decltype(element);
          dfp::batch_norm_statistics(ptr<const T>(x), images, pixels, channels, ptr<double>(mean),
                                     ptr<double>(variance), nthreads);
        });
      },
      "per channel mean and biased variance (float64) of x (float32, or bfloat16 where bfloat16), images x "
      "pixels rows x channels");

  m.def(
      "batch_norm_train_forward",
      [](uintptr_t x, uintptr_t mean, uintptr_t variance, double eps, uintptr_t weight, uintptr_t bias,
         uintptr_t residual, bool relu, int64_t rows, int64_t channels, uintptr_t out, uintptr_t mean32,
         uintptr_t invstd, uintptr_t scale, uintptr_t shift, bool bfloat16, int nthreads) {
        py::gil_scoped_release release;
        with_element_type(bfloat16, [&](auto element) {
          using T = decltype(element);
          dfp::batch_norm_train_forward(ptr<const T>(x), ptr<const double>(mean), ptr<const double>(variance), eps,
                                        ptr<const float>(weight), ptr<const float>(bias), ptr<const T>(residual),
                                        relu, rows, channels, ptr<T>(out), ptr<float>(mean32), ptr<double>(invstd),
                                        ptr<float>(scale), ptr<float>(shift), nthreads);
        });
      },
      "out = (x - mean) * invstd * weight + bias per channel, + residual (0: none), then max(., 0) where relu, "
      "from the batch's mean and variance (float64); also writes mean32, invstd (float64), scale and shift; x, "
      "residual and out float32 (or bfloat16 where bfloat16), rows x channels; weight and bias float32 or 0");

  m.def(
      "batch_norm_backward_scales",
      [](uintptr_t dy, uintptr_t x, uintptr_t mean32, uintptr_t invstd, uintptr_t weight, uintptr_t gate_scale,
         uintptr_t gate_shift, uintptr_t gate_out, int64_t rows, int64_t channels, uintptr_t x_scale,
         uintptr_t dy_scale, uintptr_t shift, uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t gated_dy,
         int nthreads) {
        py::gil_scoped_release release;
        dfp::batch_norm_backward_scales(ptr<const float>(dy), ptr<const float>(x), ptr<const float>(mean32),
                                        ptr<const double>(invstd), ptr<const float>(weight),
                                        relu_gate<float>(gate_scale, gate_shift, gate_out), rows, channels,
                                        ptr<float>(x_scale), ptr<float>(dy_scale), ptr<float>(shift),
                                        ptr<float>(grad_weight), ptr<float>(grad_bias), ptr<float>(gated_dy), nthreads);
      },
      "batch_norm_train_backward but its pass over dx, float32: the weight's and bias's gradients (0: not asked), "
      "the gated dy where gate_out gates dy, and dx's x_scale, dy_scale and shift per channel");

  m.def(
      "batch_norm_train_backward",
      [](uintptr_t dy, uintptr_t x, uintptr_t mean32, uintptr_t invstd, uintptr_t weight, uintptr_t gate_scale,
         uintptr_t gate_shift, uintptr_t gate_out, int64_t rows, int64_t channels, uintptr_t dx,
         uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t gated_dy, bool bfloat16, int nthreads) {
        py::gil_scoped_release release;
        with_element_type(bfloat16, [&](auto element) {
          using T = decltype(element);
          dfp::batch_norm_train_backward(ptr<const T>(dy), ptr<const T>(x), ptr<const float>(mean32),
                                         ptr<const double>(invstd), ptr<const float>(weight),
                                         relu_gate<T>(gate_scale, gate_shift, gate_out), rows, channels, ptr<T>(dx),
                                         ptr<float>(grad_weight), ptr<float>(grad_bias), ptr<T>(gated_dy),
                                         nthreads);
        });
      },
      "the norm's backward: dx (0: not asked), the weight's and bias's gradients (float32, 0: not asked) and, where "
      "gate_out gates dy, the gated dy; dy, x and dx float32 (or bfloat16 where bfloat16), rows x channels");
}
