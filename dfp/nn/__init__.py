"""dfp layers: ``Conv2d`` and ``Linear`` (subclasses of torch's, same parameters and
state_dict), and ``convert`` / ``revert`` to swap them into and out of a model;
``BatchNorm2d``, torch's with dfp's kernels where torch's training kernel stalls on
several threads (any format).

Example::

    model = torchvision.models.resnet18()
    dfp.nn.convert(model, "dfp16", filter_fn=lambda name, m: name != "conv1")

autocast
    A dfp layer computes in its own format whatever ``torch.autocast`` says (the
    functional ops switch autocast off inside): a DFP format quantizes the float32
    input (a bf16 or fp16 input is widened exactly) and returns float32; "fp32", "bf16"
    and "fp16" compute in that dtype and return the input's dtype. Autocast still
    governs the torch ops between the layers, so a converted model runs under autocast
    unchanged and its dfp layers keep their precision.

GradScaler
    Master weights and gradients stay float32, so ``torch.amp.GradScaler`` works as with
    torch layers. A NaN or Inf that reaches a DFP product leaves its shared exponent
    undefined, so the whole product comes out NaN: the scaler sees a non-finite gradient,
    skips ``step`` and lowers the scale, and training never stops on an exception. DFP16
    itself needs no loss scaling (every tensor gets its own exponent, so small gradients
    do not underflow); a scaler matters only for layers in "fp16".
"""

from .batch_norm import BatchNorm2d
from .conv import Conv2d
from .convert import convert, revert
from .linear import Linear

__all__ = ["BatchNorm2d", "Conv2d", "Linear", "convert", "revert"]
