// A DFP16 convolution layer's products from its float32 tensors, each in one call (and
// the whole backward in one): the weight quantized straight into the layout the
// product reads, no Python between the steps (a small layer's glue cost more than its
// products).
#pragma once
#include <cstdint>

#include "api.h"
#include "conv.h"

namespace dfp {

// The input x (n, h, w, c) channels-last float32; the weight (cout, c / groups, kh, kw)
// float32 at element strides weight_strides; symmetric zero padding; the padded image's
// channel count (c, or c + 1 where c is odd and groups is 1: docs/design.md).
struct ConvLayer {
  int64_t n, h, w, c, cout, groups, kh, kw, sh, sw, ph, pw, dh, dw, channels;
  int64_t weight_strides[4];
  int headroom;
  bool weight_per_channel;  // else one exponent for the whole weight
  ConvGeometry padded() const { return {n, h + 2 * ph, w + 2 * pw, channels, groups, kh, kw, sh, sw, dh, dw}; }
  // the output's size, as a group of the padded image gives it
  ConvShape shape() const {
    return {n, h + 2 * ph, w + 2 * pw, channels, channels / groups, kh, kw, sh, sw, dh, dw};
  }
};

// How the forward groups its input: per tensor (row_block 0), or per image row and
// block of row_block channels, with grad_weight's copy per group of group_samples
// samples and channel (quantize_input), as channel planes where channel_major.
struct InputGrouping {
  int64_t row_block = 0, group_samples = 0;
  bool channel_major = false;
};

// x quantized into the zero-padded x_padded (n, h + 2 ph, w + 2 pw, channels) that
// grad_weight reads, with its exponents (one, or (n, channels): see quantize_input),
// and y (n, oh, ow, cout) = conv(x, W) + bias (bias null or (cout,)), with x per tensor
// or per image row and channel block. The bits of quantizing and multiplying step by
// step. x_padded and x_exponent may be null where x has exponents per image row (no
// weight gradient asked: the forward reads its own copy). Where y_mean and y_variance are
// given, also y's per channel mean and biased variance, the bits of batch_norm_statistics
// (batch_norm.h): a batch norm fed y needs no pass of its own over it, and where the
// forward runs a few images at a time their blocks are summed while still in the cache.
// False, with y and x_padded partly written, where x or the weight holds NaN or Inf.
bool conv_forward(const float* x, const float* weight, const float* bias, const ConvLayer& layer,
                  InputGrouping grouping, int16_t* x_padded, int32_t* x_exponent, float* y, double* y_mean,
                  double* y_variance, int nthreads);

// dx (n, h, w, c) of a convolution from dy (n, oh, ow, cout) int16 with its exponents
// ey (one, one per image, or one per image row and block of channels, see
// ImageExponents): per phase of dx (every stride-th pixel from one on: all of dx at
// stride 1) a stride-1 convolution of dy, zero-padded, with the taps of the flipped
// kernel that reach it, whose channel axes are swapped (grad_input.h). The weight is
// quantized for that reduction over output channels: per tensor as in the forward, or (weight_per_channel) per block of `block`
// output channels and (kh, kw, ci); block divides cout / groups and is dy's channel
// block where it has one. False, with dx unwritten, where a NaN or Inf reached dy's
// exponents or the weight.
bool conv_grad_input(const int16_t* dy, ImageExponents ey, const float* weight, int64_t block,
                     const ConvLayer& layer, float* dx, int nthreads);

// dW = dy^T patches(x) of the layer into dw (cout, c / groups, kh, kw) at the layer's
// weight strides (the padding channel's columns dropped): dy (n, oh, ow, cout) int16 with
// exponents ey, one (ey_count 1) or one per block of `kblock` output pixels and channel
// (ceil(pixels / kblock) * cout of them), x_padded and its exponents ex as conv_forward
// makes them (the layer's padding 0, its h and w the padded image's); dy_panel_width > 0:
// dy in that product's K-pair panels; channels: as conv_grad_weight_int16's. False, with dw
// unwritten, where a NaN or Inf reached an exponent.
bool conv_grad_weight(const int16_t* dy, const int32_t* ey, int64_t ey_count, int64_t kblock,
                      const int16_t* x_padded, InputExponents ex, const ConvLayer& layer, float* dw,
                      int64_t dy_panel_width, int nthreads, ChannelRange channels = {});

// The backward from the float32 output gradient dy (n, oh, ow, cout), channels last:
// dy quantized for both products in one pass pair (quantize_gradient: per block of
// `dy_block` pixels and channel for grad_weight; per tensor, per sample, or per image
// row and block of `row_block` channels for grad_input; each rounded its own way from
// `seed`), then dx as conv_grad_input (dx null: not asked) and dw as
// conv_grad_weight, at the layer's weight strides (dw null: not asked); on more than one
// thread, where grad_weight reads channel planes, both at once. The bits of the three
// calls. False, with nothing written, where dy, the weight or x held NaN or Inf.
enum class InputGroups { tensor, sample, row };  // dfp.formats.GRAD_INPUT_EXPONENTS
struct GradientRounding {
  int64_t dy_block;           // > 0 where dw is asked
  InputGroups input_groups;   // grad_input's dy
  int64_t row_block;          // its channel block, for InputGroups::row
  Rounding dy_block_rounding, input_rounding;
  uint64_t seed;              // stochastic rounding's
  int64_t weight_block;       // conv_grad_input's block (weight_per_channel)
};
struct NormInputGradient;  // batch_norm.h
// Where dy_made is given, dy is null: dy is the input gradient of the batch norm behind
// the layer, made a block at a time as its quantization reads it (NormInputGradient,
// batch_norm.h), with the same bits.
bool conv_backward(const float* dy, const float* weight, const int16_t* x_padded, InputExponents x_exponent,
                   const ConvLayer& layer, const GradientRounding& rounding, float* dx, float* dw, int nthreads,
                   const NormInputGradient* dy_made = nullptr);

}  // namespace dfp
