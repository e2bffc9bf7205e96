"""The calling model's trace (regional graphs, graph breaks): data-dependent steps take the call's values.

A small model reads its text length from a mask (boolean indexing) and branches on a tensor, as
HunyuanVideo 1.5 does; the layout of its attention must follow each call's mask, and tracing it
must neither change the caller's tensors nor draw from the random generator.
"""

import pytest
import torch
import torch.nn.functional as F

from rf_compile.layout import VideoLayout
from rf_compile.passes.parent_trace import layout_from_calling_model, trace_model

GRID = (2, 4, 6)  # frames, height, width of the video (patch size 1)


class MaskedText(torch.nn.Module):
    """Video tokens, then the valid text tokens (a data-dependent count), in one self-attention."""

    def __init__(self, dim: int = 16, heads: int = 2, mutate_view: bool = False) -> None:
        super().__init__()
        self.heads, self.mutate_view = heads, mutate_view
        self.embed = torch.nn.Conv3d(4, dim, kernel_size=1)
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, video: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(video).flatten(2).transpose(1, 2)
        text.mul_(2.0)  # an in-place op on an input, on the way to a data-dependent step
        if torch.all(text_mask):  # a Python branch on a tensor
            text = text + torch.randn_like(text)
        if self.mutate_view:
            text[:, :1].zero_()  # changes ``text`` through a view
        valid = text[0][text_mask[0]].unsqueeze(0)  # boolean-mask index: a data-dependent length
        tokens = torch.cat([x, valid], dim=1)
        B, N, C = tokens.shape
        q, k, v = self.qkv(tokens).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def _call(valid: int, length: int = 9) -> tuple[tuple, dict]:
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[:, :valid] = True
    return (torch.randn(1, 4, *GRID), torch.randn(1, length, 16), mask), {}


@pytest.mark.parametrize("valid", [5, 9], ids=["padded", "all-valid: the branch draws noise"])
def test_branch_and_mask_index_take_the_calls_values(valid):
    model = MaskedText()
    call = _call(valid)
    inputs = [x.clone() for x in call[0]]
    state = torch.random.get_rng_state()
    layout = layout_from_calling_model(model, call, seq_len=48 + valid)
    assert layout == VideoLayout(*GRID, suffix=valid)
    assert all(torch.equal(a, b) for a, b in zip(call[0], inputs))  # the replay worked on copies
    assert torch.equal(torch.random.get_rng_state(), state)  # and drew no random numbers


def test_a_cached_trace_is_made_again_for_another_length():
    model = MaskedText()
    assert layout_from_calling_model(model, _call(valid=5), seq_len=53) == VideoLayout(*GRID, suffix=5)
    # Same input shapes, another prompt length: the trace that held 5 valid tokens is redone.
    assert layout_from_calling_model(model, _call(valid=9), seq_len=57) == VideoLayout(*GRID, suffix=9)
    assert trace_model(model, *_call(valid=9), seq_len=57).read_values


def test_a_value_changed_through_a_view_is_not_replayed():
    reason = layout_from_calling_model(MaskedText(mutate_view=True), _call(valid=5), seq_len=53)
    assert isinstance(reason, str) and "changed in place through a view" in reason
