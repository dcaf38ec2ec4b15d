"""The additive attention mask stays finite in every graph precision: fp16 ends at 65504, and -1e9 rounded to -inf
there, so a row with every key masked (the padding of a left-padded batch) would softmax to NaN on kernels
without a guard, reaching the other rows through the cached keys and values."""

import numpy as np
import onnx
import pytest
import torch

from apet_export.export.cpu_graph import PREFIX, rewrite_cache_in_place
from apet_export.export.llm import causal_padding_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_fully_masked_row_softmaxes_to_finite_numbers(dtype):
    padding = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded by 3
    mask = causal_padding_mask(padding, query_length=5, dtype=dtype)  # [2, 1, 5, 5]
    assert mask.dtype == dtype and torch.isfinite(mask).all()
    assert (mask[0, 0, 0] < -1e4).all()  # the first padding query sees no key at all
    scores = torch.randn(2, 4, 5, 5, dtype=torch.float32).to(dtype) * 30  # [B, H, S, T]
    probabilities = torch.softmax(scores + mask, dim=-1)
    assert torch.isfinite(probabilities).all()
    hidden = mask[1, 0] != 0  # row 1 (no padding): the causal mask
    assert (probabilities[1, :, hidden] == 0).all()  # exp(mask) is 0: masked keys get no weight


def test_cpu_graph_pads_the_mask_with_a_finite_value(llava_build):
    model = onnx.load(str(llava_build / "llm.onnx"), load_external_data=False)
    rewrite_cache_in_place(model)
    (masked,) = [t for t in model.graph.initializer if t.name == f"{PREFIX}/masked"]
    value = onnx.numpy_helper.to_array(masked)
    assert np.isfinite(value) and value < -1e4
    fp16 = onnx.load(str(llava_build / "llm.onnx"), load_external_data=False)  # declared fp16, as fp16 builds are
    next(t for t in fp16.graph.input if t.name == "inputs_embeds").type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    rewrite_cache_in_place(fp16)
    (masked,) = [t for t in fp16.graph.initializer if t.name == f"{PREFIX}/masked"]
    value = onnx.numpy_helper.to_array(masked)
    assert value.dtype == np.float16 and np.isfinite(value) and value < -1e4
