"""Integer-valued decoding: a latent decodes to the same 16-bit pixels on any machine.

Floating-point inference depends on the batch size, the thread count, the BLAS and the
device (summation order, fused kernels, float16 autocast), so a derived SOP Instance UID
decoded twice could carry two different images. :func:`build_integer_decoder` turns a
loaded model's float decoder into an integer one whose every intermediate value is an
exact integer, so the order of any sum cannot change the result.

Building (deterministic; elementwise IEEE float64 operations, exact maxima and
``frexp``, integer sums only):

1. The latent dequantisation of :class:`~latentpacs.codec.latent.LatentFormat`
   (z_d = low_d + (q_d + 1/2) step_d) is folded into the first dense layer, whose input
   is then the integer bin indices q_d in [0, 2**bits - 1]: W'_jd = W_jd step_d and
   b'_j = b_j + sum_d W_jd (low_d + step_d / 2), the sum taken over integers after
   quantisation.
2. An eval-mode BatchNorm is folded into the (transposed) convolution before it:
   s_c = gamma_c / sqrt(var_c + eps), W'_c = W_c s_c, b'_c = (b_c - mean_c) s_c + beta_c.
3. Weights are quantised per output channel c to integers |Wq| <= 2**WEIGHT_BITS at the
   scale 2**-f_c, with f_c = WEIGHT_BITS - e_c where max |W'_c| = m 2**e_c, 1/2 <= m < 1
   (lowered when needed so that the bias stays within 2**BIAS_BITS).
4. Activations are integers A at a per-layer scale 2**-F (value A 2**-F). F is chosen
   from an integer calibration pass (:data:`CALIBRATION_CODES` deterministic latents,
   one at a time, through the integer layers already built) so that the largest
   accumulator seen
   lands below 2**(ACTIVATION_BITS - HEADROOM_BITS); at run time activations are
   clamped to |A| <= 2**ACTIVATION_BITS.

Running one layer (torch float64 on the engine's device, cuDNN disabled so only exact
gemm / im2col / col2im kernels run; a strided transposed convolution whose kernel is
larger than its stride runs as one matrix product per output phase and tap on shifted
views of the padded input, :class:`_SubpixelConvTranspose`, the same integer products
summed without a col2im scatter; on the CPU one latent at a time, in place):

- accumulate: acc = sum Wq A + Bq (Bq = rint(b' 2**(F_in + f_c))), an integer at the
  scale 2**-(F_in + f_c);
- requantise: A' = floor((acc + 2**(k - 1)) / 2**k) with k = F_in + f_c - F_out (round
  half up; a multiplication by 2**-k when k < 0), then clamp to +-2**ACTIVATION_BITS;
- LeakyReLU: A' < 0 becomes floor(A' n / 2**SLOPE_BITS) with n = rint(slope
  2**SLOPE_BITS) (0.2 -> 13107 / 65536);
- the last layer's output is the logit at scale 2**-LOGIT_FRAC_BITS, clamped to
  +-LOGIT_LIMIT and mapped through a sigmoid lookup table computed with :mod:`decimal`
  (software arithmetic, the same everywhere) to 16-bit values 0 to 65535 (for a model
  whose output is the value itself, ``pca``, an integer identity table clipped to [0, 1]).

Exactness bound (checked for every layer at build time, :class:`ModelError` otherwise):
for each output channel, ``B_in * sum |Wq| + |Bq| + 2**(k - 1) < 2**53``, where B_in is
the input bound (2**bits - 1 for latent indices, 2**ACTIVATION_BITS otherwise). Every
product and every partial sum is then an integer of magnitude below 2**53, which float64
represents exactly, so any summation order, blocking or fused multiply-add gives the same
result; division by a power of two and ``floor`` are exact too. With the defaults
(18-bit weights, 20-bit activations) a layer may sum a little under 2**15 full-scale
weights per output channel; the shipped decoders sum at most 64 x 4 x 4 = 1024, whose
bound is about 2**48.

Resizing the 16-bit model output back to rows x cols (:func:`resize_uint16`) is integer
too (numpy int32, separable, in blocks of output rows, weights of
:data:`RESIZE_FRAC_BITS` bits that sum exactly to 2**RESIZE_FRAC_BITS): bilinear with
``align_corners=False`` for an enlargement, and a triangle (antialiased bilinear) filter of support ``in / out`` for a shrink, the kernels
of :func:`~latentpacs.codec.engine.resize_bilinear`, each pass rounded half up to 16 bits. The
canonical image handed to callers is then ``v / 65535`` in float32, an exact function of
the 16-bit image.
"""

from __future__ import annotations

import decimal
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentpacs.codec.latent import LatentFormat
from latentpacs.codec.models import LatentAutoencoder
from latentpacs.errors import LatentFormatError, ModelError

logger = logging.getLogger(__name__)

#: Largest magnitude of a quantised weight is 2**WEIGHT_BITS.
WEIGHT_BITS = 18
#: Activations are clamped to +-2**ACTIVATION_BITS.
ACTIVATION_BITS = 20
#: Bits between the largest calibrated activation and the clamp.
HEADROOM_BITS = 2
#: Largest magnitude of a quantised bias is 2**BIAS_BITS.
BIAS_BITS = 44
#: LeakyReLU slopes are integers over 2**SLOPE_BITS.
SLOPE_BITS = 16
#: Fractional bits of the output logit.
LOGIT_FRAC_BITS = 10
#: Logits are clamped to +-LOGIT_LIMIT; sigmoid(12) * 65535 rounds to 65535.
LOGIT_LIMIT = 12
#: Largest output value (16 bits).
OUTPUT_MAX = 65535
#: Fractional bits of the resize weights.
RESIZE_FRAC_BITS = 14
#: Output rows :func:`resize_uint16` computes at a time (both passes, in cache).
RESIZE_BLOCK_ROWS = 32
#: Number of deterministic latents of the calibration pass.
CALIBRATION_CODES = 6
#: Every integer of magnitude below this is exact in float64.
EXACT_LIMIT = 2**53

_CONV_KINDS = {nn.ConvTranspose2d: "conv_transpose", nn.Conv2d: "conv"}
#: One float layer to quantise: kind, weight, bias (terms), slope numerator, geometry.
_Spec = tuple[str, np.ndarray, np.ndarray, int | None, dict[str, tuple[int, ...]]]


@dataclass(frozen=True)
class IntegerLayer:
    """One integer layer: integer weights and bias, a requantising shift, an activation.

    Attributes
    ----------
    kind:
        ``"linear"``, ``"conv"`` or ``"conv_transpose"``.
    weight, bias:
        Integer values (float64 arrays) in the torch layout of the float layer.
    shift:
        Per output channel k: the accumulator is divided by 2**k (int64, (Cout,)).
    in_frac, out_frac:
        Fractional bits F of the input and output activations.
    clamp:
        Output activations are clamped to +-clamp.
    slope:
        LeakyReLU numerator over 2**SLOPE_BITS, or ``None`` for no activation.
    accumulator_bound:
        Proven bound on |accumulator + rounding offset|, below 2**53.
    """

    kind: str
    weight: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    in_frac: int
    out_frac: int
    clamp: int
    slope: int | None
    accumulator_bound: int
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    output_padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)


@dataclass(frozen=True)
class IntegerPlan:
    """A whole integer decoder, device-free: latent indices -> 16-bit image.

    Attributes
    ----------
    layers:
        The dense layer, then the convolutions, the last producing logits.
    lut:
        Sigmoid table (uint16) indexed by logit + LOGIT_LIMIT 2**LOGIT_FRAC_BITS.
    latent_dim, levels:
        Latent size D and number of bins per dimension (2**bits).
    channels, side:
        Shape (C, s, s) the dense output is viewed as.
    image_size:
        Side S of the square output.
    """

    layers: tuple[IntegerLayer, ...]
    lut: np.ndarray
    latent_dim: int
    levels: int
    channels: int
    side: int
    image_size: int


class IntegerDecoder:
    """Run an :class:`IntegerPlan` on one device in float64 holding exact integers.

    On the CPU a batch runs one latent at a time (the result does not depend on the
    batch, and the temporaries of one image are all that is held); on CUDA it runs whole.

    Parameters
    ----------
    plan:
        From :func:`build_integer_decoder`.
    device:
        Torch device the tensors live on.
    """

    def __init__(self, plan: IntegerPlan, device: torch.device | str = "cpu") -> None:
        self.plan = plan
        self.device = torch.device(device)
        self._layers = [_LayerTensors(layer, self.device) for layer in plan.layers]
        self._lut = torch.from_numpy(plan.lut.astype(np.int32)).to(self.device)
        self._chunk = 1 if self.device.type == "cpu" else 1 << 30

    def decode_indices(self, indices: np.ndarray) -> np.ndarray:
        """Decode latent bin indices (B, D) to 16-bit images (B, S, S), uint16.

        Raises
        ------
        LatentFormatError
            When the array has the wrong shape or an index is out of range.
        """
        plan = self.plan
        codes = np.asarray(indices)
        if codes.ndim != 2 or codes.shape[1] != plan.latent_dim:
            raise LatentFormatError(
                f"expected latent indices (B, {plan.latent_dim}), got shape {codes.shape}"
            )
        if not np.issubdtype(codes.dtype, np.integer):
            raise LatentFormatError(f"latent indices must be integers, got {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= plan.levels):
            raise LatentFormatError(f"latent indices must lie in [0, {plan.levels - 1}]")
        size = plan.image_size
        out = np.empty((codes.shape[0], size, size), np.uint16)
        for start in range(0, codes.shape[0], self._chunk):
            stop = min(codes.shape[0], start + self._chunk)
            x = torch.from_numpy(codes[start:stop].astype(np.float64)).to(self.device)
            with torch.inference_mode(), torch.backends.cudnn.flags(enabled=False):
                logits = _forward(self._layers, x, plan.channels, plan.side)
                # exact integers in [0, 2 LOGIT_LIMIT 2**LOGIT_FRAC_BITS]: the table's index
                index = logits.add_(LOGIT_LIMIT << LOGIT_FRAC_BITS)[:, 0].to(torch.int32)
                if self.device.type == "cpu":
                    np.take(plan.lut, index.numpy(), out=out[start:stop], mode="clip")
                else:
                    out[start:stop] = self._lut[index.long()].cpu().numpy().astype(np.uint16)
        return out


class _LayerTensors:
    """An :class:`IntegerLayer`'s arrays as float64 tensors on a device, and its two steps."""

    def __init__(self, layer: IntegerLayer, device: torch.device) -> None:
        self.layer = layer
        view = (-1,) if layer.kind == "linear" else (-1, 1, 1)
        self.weight = torch.from_numpy(layer.weight).to(device)
        self.bias = torch.from_numpy(layer.bias).to(device).view(view)
        # exact powers of two: 2**-k and the rounding offset 2**(k - 1) (0 when k <= 0)
        self.scale = torch.from_numpy(np.ldexp(1.0, -layer.shift)).to(device).view(view)
        offset = np.where(layer.shift > 0, np.ldexp(1.0, layer.shift - 1), 0.0)
        self.offset = torch.from_numpy(offset).to(device).view(view)
        # Bq + 2**(k - 1): an integer below the proven bound, so exact
        self.bias_offset = self.bias + self.offset
        self.slope = None if layer.slope is None else float(np.ldexp(layer.slope, -SLOPE_BITS))
        self.transposed = (
            transposed_sums(
                self.weight, layer.stride, layer.padding, layer.output_padding, layer.dilation
            )
            if layer.kind == "conv_transpose" else None
        )

    def accumulate(self, x: Tensor) -> Tensor:
        """sum Wq A, without the bias (exact: every partial sum is below the bound)."""
        layer = self.layer
        if layer.kind == "linear":
            return F.linear(x, self.weight)
        if self.transposed is not None:
            return self.transposed(x)
        return F.conv2d(x, self.weight, None, layer.stride, layer.padding, layer.dilation)

    def requantise_(self, acc: Tensor, *, biased: bool = False) -> Tensor:
        """In place: add Bq (unless ``biased``) and 2**(k-1), scale, floor, clamp, activate.

        Each step is exact on integers below 2**53: adding integers, multiplying by a
        power of two, ``floor``, clamping to integers, and the LeakyReLU product
        y n 2**-SLOPE_BITS (|y n| < 2**53) before its ``floor``. For y >= 0 the floor
        leaves y; for y < 0, floor(y n / 2**SLOPE_BITS) is the integer LeakyReLU.
        """
        layer = self.layer
        acc.add_(self.offset if biased else self.bias_offset).mul_(self.scale).floor_()
        acc.clamp_(-layer.clamp, layer.clamp)
        if self.slope is not None:
            F.leaky_relu(acc, self.slope, inplace=True).floor_()
        return acc


def transposed_sums(
    weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
    output_padding: tuple[int, ...], dilation: tuple[int, ...],
) -> Callable[[Tensor], Tensor]:
    """The integer sums of a transposed convolution (no bias), by the cheapest exact route.

    A kernel equal to its stride with no padding (non-overlapping patches) is one matrix
    product and a reordering copy; a kernel larger than a stride above 1 runs by output
    phases (:class:`_SubpixelConvTranspose`); anything else is torch's
    ``conv_transpose2d``. Each route sums the same exact integer products, so all agree
    bit for bit with ``conv_transpose2d``.
    """
    stride, padding = tuple(int(n) for n in stride), tuple(int(n) for n in padding)
    output_padding, dilation = tuple(int(n) for n in output_padding), tuple(dilation)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if dilation == (1, 1) and kernel == stride and padding == output_padding == (0, 0):
        return functools.partial(_patches, _patch_matrix(weight), kernel, int(weight.shape[1]))
    subpixel = _SubpixelConvTranspose(weight, stride, padding, dilation)
    if subpixel.useful:
        return functools.partial(subpixel, output_padding=output_padding)
    return functools.partial(
        F.conv_transpose2d, weight=weight, bias=None, stride=stride, padding=padding,
        output_padding=output_padding, groups=1, dilation=dilation,
    )


def _patch_matrix(weight: Tensor) -> Tensor:
    """(Cin, Cout, kh, kw) -> (kh kw Cout, Cin): one row per output pixel of a patch."""
    cin, cout, kh, kw = (int(n) for n in weight.shape)
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * cout, cin).contiguous()


def _patches(matrix: Tensor, kernel: tuple[int, int], cout: int, x: Tensor) -> Tensor:
    """Transposed convolution with kernel = stride, no padding: each input pixel owns the
    kh x kw output patch it multiplies, so out = reorder(matrix @ x) with no overlap."""
    batch, cin, h, w = (int(n) for n in x.shape)
    kh, kw = kernel
    out = x.new_empty((batch, cout, h * kh, w * kw))
    for b in range(batch):
        product = torch.mm(matrix, x[b].reshape(cin, h * w))
        patches = product.view(kh, kw, cout, h, w).permute(2, 3, 0, 4, 1)
        out[b].view(cout, h, kh, w, kw).copy_(patches)
    return out


class _SubpixelConvTranspose:
    """A strided transposed convolution as s_h s_w ordinary matrix products, one per phase.

    Output row Y = s m + r (phase r) gathers only the kernel rows k = r + p (mod s), each
    from input row m + (r + p - k) / s; so each phase (r_h, r_w) is a sum, over its taps,
    of (Cout x Cin) weight matrices times shifted views of the zero-padded input, taken
    as flat offsets into it (no im2col copy, no col2im scatter-add). Phases with the same
    shifts share one product (their weights stacked). The sums are of the same exact
    integer products as :func:`torch.nn.functional.conv_transpose2d`'s, so the result is
    identical (every partial sum is an integer below 2**53).
    """

    def __init__(
        self, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
        dilation: tuple[int, ...],
    ) -> None:
        cin, cout, kh, kw = (int(n) for n in weight.shape)
        self.cin, self.cout, self.kernel = cin, cout, (kh, kw)
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))
        # worth it when taps of a phase overlap: a stride above 1 and a larger kernel
        self.useful = tuple(dilation) == (1, 1) and any(
            s > 1 and k > s for s, k in zip(self.stride, self.kernel)
        )
        rows = _axis_phases(kh, self.stride[0], self.padding[0])
        cols = _axis_phases(kw, self.stride[1], self.padding[1])
        taps = weight.permute(2, 3, 1, 0)  # (kh, kw, Cout, Cin)
        grouped: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, int]]] = {}
        for ry, (y_taps, _) in enumerate(rows):
            for rx, (x_taps, _) in enumerate(cols):
                grouped.setdefault((rows[ry][1], cols[rx][1]), []).append((ry, rx))
        #: per group: phases, shifts (dy, dx) per tap, stacked weights per tap
        self.groups: list[tuple[list[tuple[int, int]], list[tuple[int, int]], list[Tensor]]] = []
        for (dys, dxs), phases in grouped.items():
            shifts, mats = [], []
            for iy, dy in enumerate(dys):
                for ix, dx in enumerate(dxs):
                    shifts.append((dy, dx))
                    mats.append(torch.cat(
                        [taps[rows[ry][0][iy], cols[rx][0][ix]] for ry, rx in phases]
                    ).contiguous())
            self.groups.append((phases, shifts, mats))
        all_dy = [dy for _, shifts, _ in self.groups for dy, _ in shifts] or [0]
        all_dx = [dx for _, shifts, _ in self.groups for _, dx in shifts] or [0]
        self._dy, self._dx = (min(all_dy), max(all_dy)), (min(all_dx), max(all_dx))

    def __call__(self, x: Tensor, output_padding: tuple[int, ...]) -> Tensor:
        batch, _, h, w = (int(n) for n in x.shape)
        (sh, sw), (ph, pw), (kh, kw) = self.stride, self.padding, self.kernel
        ho = (h - 1) * sh - 2 * ph + kh + int(output_padding[0])
        wo = (w - 1) * sw - 2 * pw + kw + int(output_padding[1])
        rows_max, cols_max = -(-ho // sh), -(-wo // sw)  # phase 0 has the most
        top, left = max(0, -self._dy[0]), max(0, -self._dx[0])
        width = max(w + left, cols_max + self._dx[1] + left)
        height = max(h + top, rows_max + self._dy[1] + top) + 1  # a spare row for the flat views
        padded = x.new_zeros((batch, self.cin, height, width))
        padded[:, :, top : top + h, left : left + w] = x
        flat = padded.view(batch, self.cin, height * width)
        out = x.new_empty((batch, self.cout, ho, wo))
        span = rows_max * width
        for phases, shifts, mats in self.groups:
            acc = x.new_empty((len(phases) * self.cout, span))
            grid = acc.view(len(phases), self.cout, rows_max, width)
            for b in range(batch):
                if not shifts:
                    acc.zero_()
                for i, ((dy, dx), mat) in enumerate(zip(shifts, mats)):
                    start = (dy + top) * width + dx + left
                    source = flat[b, :, start : start + span]
                    if i == 0:
                        torch.mm(mat, source, out=acc)
                    else:
                        acc.addmm_(mat, source)
                for j, (ry, rx) in enumerate(phases):
                    target = out[b, :, ry::sh, rx::sw]
                    target.copy_(grid[j, :, : target.shape[1], : target.shape[2]])
        return out


def _axis_phases(
    kernel: int, stride: int, padding: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per output phase r along one axis: its kernel taps k and their input shifts d.

    Output index s m + r takes kernel tap k = r + p (mod s) from input index m + d,
    d = (r + p - k) / s.
    """
    phases = []
    for r in range(stride):
        taps = tuple(k for k in range(kernel) if (r + padding - k) % stride == 0)
        phases.append((taps, tuple((r + padding - k) // stride for k in taps)))
    return phases


def _forward(layers: list[_LayerTensors], x: Tensor, channels: int, side: int) -> Tensor:
    """Run integer layers on latent indices (B, D); the dense output is viewed (C, s, s)."""
    for position, layer in enumerate(layers):
        x = layer.requantise_(layer.accumulate(x))
        if position == 0:
            x = x.view(-1, channels, side, side)
    return x


def build_integer_decoder(
    model: LatentAutoencoder,
    latent_format: LatentFormat,
    *,
    weight_bits: int = WEIGHT_BITS,
    activation_bits: int = ACTIVATION_BITS,
) -> IntegerPlan:
    """Build the integer decoder of ``model`` (its ``from_latent`` layer and ``head``).

    Parameters
    ----------
    model:
        A float model in eval mode (its BatchNorm running statistics are folded).
    latent_format:
        The model's stored latent format; its dequantisation is folded in.
    weight_bits, activation_bits:
        Magnitude bounds 2**bits of quantised weights and activations.

    Raises
    ------
    ModelError
        When a layer is of an unsupported kind, or could not be computed exactly (a
        bound of 2**53 or more).
    """
    if latent_format.latent_dim != model.latent_dim:
        raise ModelError("latent format and model disagree on the latent size")
    blocks = _parse_head(model.head)
    levels = 1 << latent_format.bits
    calibration = torch.from_numpy(_calibration_codes(model.latent_dim, levels))
    act_max = 1 << activation_bits
    target = activation_bits - HEADROOM_BITS

    weight, bias = _fold_latent(model.from_latent, latent_format)
    layers: list[IntegerLayer] = []
    cpu = torch.device("cpu")
    # One calibration latent at a time (the peaks are maxima, the same for any batching):
    # between layers each latent's activations are kept as int32 (exact: |A| <= clamp),
    # and a layer's accumulators are reused for its output once its scale is chosen.
    inputs: list[Tensor] = [calibration[i : i + 1] for i in range(len(calibration))]
    specs: list[_Spec] = [("linear", weight, bias, None, {})] + blocks
    in_frac, in_bound = 0, levels - 1
    out_shape: tuple[int, ...] = ()
    for position, (kind, w, b, slope, geometry) in enumerate(specs):
        last = position == len(specs) - 1
        wq, bq, w_frac = _quantise(w, b, kind, in_frac, weight_bits)
        name = f"{model.arch} decoder layer {position} ({kind})"
        abs_sum = _abs_sum_per_channel(wq, kind)
        draft = IntegerLayer(
            kind, wq, bq, np.zeros(len(bq), np.int64), in_frac, 0, 0, slope, 0, **geometry
        )
        tensors = _LayerTensors(draft, cpu)
        accumulators: list[Tensor] = []
        peaks: Tensor | None = None
        with torch.inference_mode():
            while inputs:
                acc = tensors.accumulate(inputs.pop(0).to(torch.float64)).add_(tensors.bias)
                peak = _channel_peaks(acc, kind)
                peaks = peak if peaks is None else torch.maximum(peaks, peak)
                out_shape = tuple(acc.shape)
                accumulators.append(acc)
        if last:
            out_frac, clamp = LOGIT_FRAC_BITS, LOGIT_LIMIT << LOGIT_FRAC_BITS
        else:
            if peaks is None:
                raise ModelError(f"{name}: no calibration latents")
            out_frac, clamp = _choose_frac(peaks, in_frac + w_frac, target), act_max
        shift = (in_frac + w_frac - out_frac).astype(np.int64)
        offsets = [1 << int(k - 1) if k > 0 else 0 for k in shift]
        bounds = [
            in_bound * int(s) + abs(int(c)) + o for s, c, o in zip(abs_sum, bq, offsets)
        ]
        bound = max(max(bounds), clamp * (slope or 0))  # the LeakyReLU product too
        if bound >= EXACT_LIMIT:
            raise ModelError(
                f"{name}: accumulator bound {bound} >= 2**53, float64 would not be exact "
                f"(input bound {in_bound}, weights summing to {max(abs_sum)})"
            )
        layer = IntegerLayer(
            kind, wq, bq, shift, in_frac, out_frac, clamp, slope, bound, **geometry
        )
        layers.append(layer)
        if not last:
            final = _LayerTensors(layer, cpu)
            store = torch.int32 if clamp < 1 << 31 else torch.float64
            with torch.inference_mode():
                while accumulators:
                    y = final.requantise_(accumulators.pop(0), biased=True)
                    if position == 0:
                        y = y.view(-1, model.channels, model.side, model.side)
                    inputs.append(y.to(store))
        accumulators.clear()
        in_frac, in_bound = out_frac, clamp
    if out_shape[1:] != (1, model.image_size, model.image_size):
        raise ModelError(f"{model.arch}: decoder output {out_shape[1:]} is not one image")
    table = (identity_table(LOGIT_FRAC_BITS, LOGIT_LIMIT) if model.output == "identity"
             else sigmoid_table(LOGIT_FRAC_BITS, LOGIT_LIMIT))
    plan = IntegerPlan(
        tuple(layers), table, model.latent_dim, levels,
        model.channels, model.side, model.image_size,
    )
    logger.info(
        "integer decoder for %s: %d layers, activation fractions %s",
        model.arch, len(layers), [layer.out_frac for layer in layers],
    )
    return plan


def _parse_head(head: nn.Module) -> list[_Spec]:
    """(kind, weight, bias, slope numerator, geometry) of each convolution of ``head``."""
    modules = list(_leaves(head))
    blocks: list[_Spec] = []
    i = 0
    while i < len(modules):
        conv = modules[i]
        kind = _CONV_KINDS.get(type(conv))
        if kind is None or not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            raise ModelError(f"integer decoding does not support {type(conv).__name__} here")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ModelError("integer decoding needs groups=1 and explicit zero padding")
        out_dim = 1 if kind == "conv_transpose" else 0
        w = _array(conv.weight)
        b = _array(conv.bias) if conv.bias is not None else np.zeros(w.shape[out_dim])
        i += 1
        if i < len(modules) and isinstance(modules[i], nn.BatchNorm2d):
            w, b = _fold_batchnorm(w, b, modules[i], out_dim)
            i += 1
        slope: int | None = None
        activation = modules[i] if i < len(modules) else None
        if isinstance(activation, nn.LeakyReLU):
            slope = int(np.rint(np.ldexp(float(activation.negative_slope), SLOPE_BITS)))
            if not 0 <= slope < 1 << SLOPE_BITS:
                raise ModelError(f"LeakyReLU slope {activation.negative_slope} is not in [0, 1)")
            i += 1
        elif isinstance(activation, nn.ReLU):
            slope = 0
            i += 1
        geometry = {
            "stride": tuple(conv.stride),
            "padding": tuple(int(p) for p in conv.padding),
            "dilation": tuple(conv.dilation),
        }
        if kind == "conv_transpose":
            geometry["output_padding"] = tuple(conv.output_padding)
        blocks.append((kind, w, b, slope, geometry))
    if not blocks or blocks[-1][3] is not None:
        raise ModelError("the decoder must end with a convolution producing logits")
    return blocks


def _array(tensor: Tensor) -> np.ndarray:
    """A float64 copy of a parameter or buffer (float32 -> float64 is exact)."""
    return tensor.detach().to("cpu", torch.float64).numpy().copy()


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    else:
        yield module


def _fold_batchnorm(
    w: np.ndarray, b: np.ndarray, bn: nn.Module, out_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BatchNorm into the weights and bias before it (elementwise)."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        raise ModelError("integer decoding needs BatchNorm with running statistics")
    mean, var = _array(bn.running_mean), _array(bn.running_var)
    gamma = _array(bn.weight) if bn.weight is not None else np.ones_like(mean)
    beta = _array(bn.bias) if bn.bias is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + float(bn.eps))
    shape = [1] * w.ndim
    shape[out_dim] = -1
    return w * scale.reshape(shape), (b - mean) * scale + beta


def _fold_latent(
    dense: nn.Module, latent_format: LatentFormat
) -> tuple[np.ndarray, np.ndarray]:
    """W'_jd = W_jd step_d; the bias is the per-term array W_jd c_d plus b (summed later).

    Returns the weight (J, D) and a bias array (J, D + 1) whose row sum is b'_j; the
    sum is taken over integers by :func:`_quantise`.
    """
    if not isinstance(dense, nn.Linear):
        raise ModelError("the decoder must start with a dense layer")
    w = _array(dense.weight)
    b = _array(dense.bias) if dense.bias is not None else np.zeros(w.shape[0])
    step = latent_format.step
    centre0 = np.asarray(latent_format.low, dtype=np.float64) + 0.5 * step
    terms = np.concatenate([w * centre0[None, :], b[:, None]], axis=1)
    return w * step[None, :], terms


def _quantise(
    w: np.ndarray, b: np.ndarray, kind: str, in_frac: int, weight_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer weights, integer bias and the weight fraction f_c of each output channel.

    ``b`` is (Cout,) or (Cout, T) of terms summed after quantisation. Scales are powers
    of two found with ``frexp`` of exact maxima, so the result is machine-independent.
    """
    out_dim = 1 if kind == "conv_transpose" else 0
    moved = np.moveaxis(w, out_dim, 0).reshape(w.shape[out_dim], -1)
    terms = b.reshape(len(b), -1)
    _, w_exp = np.frexp(np.max(np.abs(moved), axis=1))
    _, b_exp = np.frexp(np.max(np.abs(terms), axis=1))
    frac = weight_bits - w_exp.astype(np.int64)
    frac = np.minimum(frac, BIAS_BITS - in_frac - b_exp.astype(np.int64) - 1)
    frac = np.where(np.max(np.abs(moved), axis=1) == 0, 0, frac).astype(np.int64)
    shape = [1] * w.ndim
    shape[out_dim] = -1
    wq = np.rint(np.ldexp(w, frac.reshape(shape)))
    bq_terms = np.rint(np.ldexp(terms, (frac + in_frac)[:, None])).astype(np.int64)
    bq = np.sum(bq_terms, axis=1)  # int64: exact in any order
    return wq, bq.astype(np.float64), frac


def _abs_sum_per_channel(wq: np.ndarray, kind: str) -> list[int]:
    out_dim = 1 if kind == "conv_transpose" else 0
    moved = np.moveaxis(wq, out_dim, 0).reshape(wq.shape[out_dim], -1)
    return [int(s) for s in np.sum(np.abs(moved).astype(np.int64), axis=1)]


def _channel_peaks(acc: Tensor, kind: str) -> Tensor:
    """Largest |accumulator| of each output channel: max(max, -min), exact, no copy."""
    dims = [0] if kind == "linear" else [0, 2, 3]
    return torch.maximum(torch.amax(acc, dim=dims), torch.neg(torch.amin(acc, dim=dims)))


def _choose_frac(peaks: Tensor, acc_frac: np.ndarray, target_bits: int) -> int:
    """Largest F so the calibration's largest |accumulator| sits below 2**target_bits."""
    candidates = [
        target_bits + int(f) - int(peak).bit_length()
        for peak, f in zip(peaks.numpy(), acc_frac)
        if peak > 0
    ]
    return min(candidates) if candidates else target_bits


def _calibration_codes(latent_dim: int, levels: int) -> np.ndarray:
    """Deterministic calibration latents: the centre, then a multiplicative hash."""
    rows = [[levels // 2] * latent_dim]
    for i in range(1, CALIBRATION_CODES):
        rows.append([((i * 2654435761 + d * 40503 + i * d * 97) % 4294967291) % levels
                     for d in range(latent_dim)])
    return np.asarray(rows, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def sigmoid_table(frac_bits: int = LOGIT_FRAC_BITS, limit: int = LOGIT_LIMIT) -> np.ndarray:
    """round(65535 sigmoid(i / 2**frac_bits)) for i in [-limit 2**frac_bits, +...], uint16.

    Computed with :mod:`decimal` at 40 significant digits (software arithmetic,
    identical on every machine): e**(-1/2**frac_bits) once, its powers by repeated
    multiplication, sigmoid(x) = 1 / (1 + e**-x) and sigmoid(-x) = 1 - sigmoid(x), each
    rounded half-even to an integer.
    """
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    one = decimal.Decimal(1)
    base = ctx.exp(ctx.divide(-one, decimal.Decimal(1 << frac_bits)))
    count = limit << frac_bits
    full = decimal.Decimal(OUTPUT_MAX)
    positive: list[int] = []
    negative: list[int] = []
    power = one
    for _ in range(count + 1):
        s = ctx.divide(one, ctx.add(one, power))
        positive.append(int(ctx.multiply(s, full).to_integral_value(decimal.ROUND_HALF_EVEN)))
        negative.append(
            int(ctx.multiply(ctx.subtract(one, s), full).to_integral_value(decimal.ROUND_HALF_EVEN))
        )
        power = ctx.multiply(power, base)
    table = np.asarray(negative[:0:-1] + positive, dtype=np.uint16)
    table.setflags(write=False)
    return table


def identity_table(frac_bits: int = LOGIT_FRAC_BITS, limit: int = LOGIT_LIMIT) -> np.ndarray:
    """The output table of a model whose head gives the value itself (``output = "identity"``).

    Entry ``i + limit 2**frac_bits`` is ``65535 i / 2**frac_bits`` rounded half up and
    clipped to [0, 65535], in integer arithmetic: values below 0 and above 1 clip, and the
    output has ``frac_bits`` bits of precision.
    """
    index = np.arange(-(limit << frac_bits), (limit << frac_bits) + 1, dtype=np.int64)
    values = (index * OUTPUT_MAX + (1 << (frac_bits - 1))) >> frac_bits
    table = np.clip(values, 0, OUTPUT_MAX).astype(np.uint16)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=64)
def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps (n_out, T) and integer weights (n_out, T) summing to 2**RESIZE_FRAC_BITS."""
    one = 1 << RESIZE_FRAC_BITS
    i = np.arange(n_out, dtype=np.int64)
    if n_out >= n_in:
        # bilinear, align_corners=False: source = ((2i + 1) n_in - n_out) / (2 n_out), >= 0
        num = np.maximum((2 * i + 1) * n_in - n_out, 0)
        den = 2 * n_out
        i0 = num // den
        rest = num - i0 * den
        w1 = (rest * 2 * one + den) // (2 * den)
        taps = np.stack([i0, np.minimum(i0 + 1, n_in - 1)], axis=1)
        weights = np.stack([one - w1, w1], axis=1)
    else:
        # triangle of half-width n_in / n_out centred on (i + 1/2) n_in / n_out; the
        # weight of source j is 2 n_in - |(2j + 1) n_out - (2i + 1) n_in|, if positive
        width = (2 * n_in) // n_out + 3
        first = ((2 * i - 1) * n_in) // (2 * n_out) - 1
        j = first[:, None] + np.arange(width, dtype=np.int64)[None, :]
        raw = 2 * n_in - np.abs((2 * j + 1) * n_out - (2 * i[:, None] + 1) * n_in)
        raw = np.where((j >= 0) & (j < n_in) & (raw > 0), raw, 0)
        total = np.sum(raw, axis=1, keepdims=True)
        weights = (raw * 2 * one + total) // (2 * total)
        largest = np.argmax(weights, axis=1)
        weights[i, largest] += one - np.sum(weights, axis=1)
        taps = np.clip(j, 0, n_in - 1)
    taps.setflags(write=False)
    weights.setflags(write=False)
    return taps, weights


@functools.lru_cache(maxsize=64)
def _axis_taps(n_in: int, n_out: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per tap t: (source indices (n_out,) intp, weights (n_out,) int32), contiguous."""
    taps, weights = _axis_weights(n_in, n_out)
    columns = []
    for t in range(taps.shape[1]):
        index = np.ascontiguousarray(taps[:, t], dtype=np.intp)
        weight = np.ascontiguousarray(weights[:, t], dtype=np.int32)
        index.setflags(write=False)
        weight.setflags(write=False)
        columns.append((index, weight))
    return tuple(columns)


def _interpolate(
    source: np.ndarray, taps: tuple[tuple[np.ndarray, np.ndarray], ...], axis: int,
    acc: np.ndarray, term: np.ndarray,
) -> np.ndarray:
    """acc = sum_t w_t source[taps_t] along ``axis`` (int32, exact: see below), unrounded."""
    for t, (index, weight) in enumerate(taps):
        target = acc if t == 0 else term
        np.take(source, index, axis=axis, out=target, mode="clip")
        np.multiply(target, weight[:, None] if axis == 0 else weight, out=target)
        if t:
            np.add(acc, term, out=acc)
    return acc


def resize_uint16(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D uint16 image to ``shape`` in exact integer arithmetic (int32).

    Rows first, then columns, each pass with weights summing to 2**RESIZE_FRAC_BITS
    and rounded half up back to 16 bits. Values stay in the input's range (the weights
    are non-negative), so a constant image stays constant.

    Every product is at most 65535 x 2**RESIZE_FRAC_BITS and the weights of an output
    sample sum to 2**RESIZE_FRAC_BITS, so each sum stays below 2**31: int32 is exact,
    and integer addition gives the same result in any order. The work runs in blocks of
    :data:`RESIZE_BLOCK_ROWS` output rows (both passes on one block while it is in
    cache), so no temporary is larger than a block and the only full-size array is the
    uint16 result.

    Raises
    ------
    ValueError
        When ``shape`` is not positive or the image is not 2-D.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1 or image.ndim != 2:
        raise ValueError(f"cannot resize an image of shape {image.shape} to {shape}")
    source = np.ascontiguousarray(image, dtype=np.int32)
    in_rows, in_cols = source.shape
    row_taps = _axis_taps(in_rows, rows) if in_rows != rows else None
    col_taps = _axis_taps(in_cols, cols) if in_cols != cols else None
    out = np.empty((rows, cols), np.uint16)
    half = 1 << (RESIZE_FRAC_BITS - 1)  # round half up
    block = RESIZE_BLOCK_ROWS
    row_acc = np.empty((block, in_cols), np.int32)
    row_term = np.empty_like(row_acc)
    col_acc = np.empty((block, cols), np.int32)
    col_term = np.empty_like(col_acc)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        n = stop - start
        if row_taps is None:
            part = source[start:stop]
        else:
            block_taps = tuple(
                (index[start:stop], weight[start:stop])
                for index, weight in row_taps
            )
            part = _interpolate(source, block_taps, 0, row_acc[:n], row_term[:n])
            np.add(part, half, out=part)
            np.right_shift(part, RESIZE_FRAC_BITS, out=part)
        if col_taps is None:
            out[start:stop] = part
            continue
        result = _interpolate(part, col_taps, 1, col_acc[:n], col_term[:n])
        np.add(result, half, out=result)
        np.right_shift(result, RESIZE_FRAC_BITS, out=out[start:stop], casting="unsafe")
    return out


def to_canonical(image: np.ndarray) -> np.ndarray:
    """The canonical float32 image of a 16-bit one: ``v / 65535`` (correctly rounded).

    One float32 division per pixel (uint16 -> float32 is exact), cast inside the ufunc's
    loop, so no float32 copy of the image is made first.
    """
    return np.divide(image, np.float32(OUTPUT_MAX), dtype=np.float32)
