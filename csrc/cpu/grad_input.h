// grad_input of a convolution layer in DFP16 (dfp._grad_input, the same bits): dx as
// stride-1 convolutions of the quantized dy with the flipped kernel, one per phase of
// the input (the sub-pixel split), each written straight into its pixels of dx.
#pragma once
#include <cstdint>
#include <vector>

#include "api.h"
#include "conv.h"
#include "layer.h"

namespace dfp {

// grad_input's zero-padded dy at stride 1: dy's rows and columns from r0 and c0 on,
// padded by the kernel's reach past the layer's padding.
Window stride_one_window(const ConvLayer& l);

class GradInput {
 public:
  explicit GradInput(const ConvLayer& l);
  // The weight quantized for the reduction over output channels (conv_grad_input) and
  // gathered for every phase, dy's exponents ey; false where a NaN or Inf reached them.
  bool prepare(ImageExponents ey, const float* weight, int64_t block, int nthreads);
  // dx (n, h, w, c) from dy (n, oh, ow, cout): each phase's window of dy copied (dy
  // itself where that is the window), then multiplied into the phase's pixels of dx.
  void run(const int16_t* dy, float* dx, int nthreads) const;
  // At stride 1: dx of images [n0, n0 + count) from the window of all of dy
  // (stride_one_window); no exponent spans images, so any run of them gives its bits.
  void images(const int16_t* window_dy, int64_t n0, int64_t count, float* dx, int nthreads) const;
  // The images of a piece for `images`: those whose window of dy fits kPieceBytes.
  int64_t images_per_piece() const;

 private:
  // One phase along an axis: dx's positions first, first + stride, ... (count of them),
  // which receive from the kernel's taps first_tap, first_tap + step, ... (taps of them)
  // through a stride-1 convolution, dilated by `dilation`, of dy's positions [window0,
  // window1) (zeros past dy's edges).
  struct Axis {
    int64_t first, count, first_tap, step, taps, dilation, window0, window1;
    int64_t window() const { return window1 - window0; }
  };
  static std::vector<Axis> axes(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation);
  // A phase of dx: its weight (groups, taps, cout / groups, c / groups), the taps flipped,
  // with exponents ew in K-blocks of kblock (one row for all where the weight has one
  // exponent), and dy's exponents per row of its window.
  struct Phase {
    Axis rows, cols;
    std::vector<int16_t> w;
    std::vector<int32_t> ew;
    int64_t kblock;
    std::vector<int32_t> row_exponents;
  };
  // (take_w: w may be moved into it)
  Phase phase(const Axis& rows, const Axis& cols, std::vector<int16_t>& w, bool take_w, const std::vector<int32_t>& ew,
              int64_t block) const;
  void multiply(const Phase& p, const int16_t* window, int64_t n0, int64_t count, float* dx, int nthreads) const;

  const ConvLayer& l_;
  ImageExponents ey_{};
  std::vector<Phase> phases_;
  bool uncovered_ = false;  // a phase that no tap reaches (a 1x1 kernel at stride 2): zeros
};

}  // namespace dfp
