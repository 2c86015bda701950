"""The model path on CUDA in bf16: forward, backward, and an HF round trip on the GPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_bf16_forward_backward_on_cuda(tiny_tokenizer_dir, tmp_path):
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.model import ModelConfig, build_model, load_model, save_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0).cuda().to(torch.bfloat16)
    x = torch.randint(0, len(tok), (4, 64), device="cuda")
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    save_model(model, tok, tmp_path / "m")
    again = load_model(tmp_path / "m", dtype=torch.bfloat16).cuda()
    assert torch.equal(model(input_ids=x).logits, again(input_ids=x).logits)
