"""The MFU yardstick: FLOP counts against the formulas, and a measured peak that is the better of
its matmul and its convolution."""
import torch
import torch.nn.functional as F

from infd.utils.mfu import count_flops, measure_peak, mfu


def test_flop_counts_are_the_textbook_ones_forward_and_backward():
    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(16, 32)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 32
    # backward of a @ b with only `a` requiring grad: one more matmul of the same size
    assert count_flops(lambda: (a @ b).sum().backward()) == 2 * (2 * 8 * 16 * 32)
    x, w = torch.randn(2, 3, 10, 12), torch.randn(5, 3, 3, 3)
    assert count_flops(lambda: F.conv2d(x, w, padding=1)) == 2 * 2 * 5 * 3 * 9 * 10 * 12


def test_peak_is_the_better_of_matmul_and_convolution_and_mfu_is_a_fraction():
    peak = measure_peak(torch.device("cpu"), torch.float32, size=256)
    assert peak.flops_per_s == max(peak.matmul_flops_per_s, peak.conv_flops_per_s) > 0
    assert (peak.dtype, peak.device) == ("float32", "cpu")
    assert abs(mfu(int(peak.flops_per_s), 2.0, peak) - 0.5) < 1e-9
