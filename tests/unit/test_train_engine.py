"""The pieces of a training step that no end-to-end run pins down, on a real single-process DeepSpeed engine:
gradient clipping changes the update, label smoothing changes the loss by the exact formula, activation
checkpointing recomputes to the same gradients."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def dist():
    """A one-process gloo group, as Ray Train gives each worker."""
    import socket

    import torch.distributed as td

    if not td.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        td.init_process_group("gloo", rank=0, world_size=1)
    yield
    td.destroy_process_group()


def _model(tokenizer_dir, **model_kw):
    from r1ray.model import ModelConfig, build_model
    from r1ray.model.tokenizer import load_tokenizer

    return build_model(ModelConfig(preset="debug", **model_kw), load_tokenizer(tokenizer_dir), seed=3)


def _ids(vocab: int, n: int = 4, t: int = 24):
    return torch.from_numpy(np.random.default_rng(0).integers(5, vocab, size=(n, t))).long()


def _one_step_delta(tokenizer_dir, grad_clip: float) -> float:
    from r1ray.config import DeepSpeedConfig, OptimConfig
    from r1ray.train.core.deepspeed import build_engine, ds_config

    model = _model(tokenizer_dir)
    before = [p.detach().clone() for p in model.parameters()]
    ds, optim = DeepSpeedConfig(zero_stage=1), OptimConfig(lr=1e-2, grad_clip=grad_clip, eps=1e-8, weight_decay=0.0)
    engine = build_engine(model, ds, optim, ds_config(ds, optim, micro_batch_size=4, grad_accum=1, world_size=1,
                                                      use_gpu=False))
    ids = _ids(model.config.vocab_size)
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    return float(sum((p.detach() - b).abs().sum() for p, b in zip(engine.module.parameters(), before, strict=True)))


def test_gradient_clipping_shrinks_the_update(dist, tiny_tokenizer_dir):
    # AdamW divides by sqrt(v): a clip to 1e-12 makes |g| << eps, so the step all but vanishes; unclipped,
    # every parameter moves by ~lr
    free, clipped = _one_step_delta(tiny_tokenizer_dir, 0.0), _one_step_delta(tiny_tokenizer_dir, 1e-12)
    assert free > 0 and clipped < free * 1e-2, (free, clipped)


def test_label_smoothing_is_the_exact_mixture(tiny_tokenizer_dir):
    from r1ray.train.stage import Metrics
    from r1ray.train.stages.pretrain import PretrainConfig, PretrainStage

    model = _model(tiny_tokenizer_dir).eval()
    ids = _ids(model.config.vocab_size)
    batch = {"input_ids": ids, "n_tokens": ids.numel() - ids.shape[0]}
    eps = 0.2
    stage = PretrainStage(PretrainConfig.model_validate({"train": {"label_smoothing": eps}}))
    smooth = float(stage.loss(model, batch, Metrics()))
    plain = float(PretrainStage(PretrainConfig()).loss(model, batch, Metrics()))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    uniform = float(-logp.mean(-1).sum())  # sum over tokens of the mean NLL over the vocabulary
    assert smooth == pytest.approx((1 - eps) * plain + eps * uniform, rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tiny_tokenizer_dir):
    ids = None
    grads = []
    for ckpt in (False, True):
        model = _model(tiny_tokenizer_dir, activation_checkpointing=ckpt).train()
        on = getattr(model, "is_activation_checkpointing", None)
        assert (on if on is not None else model.is_gradient_checkpointing) == ckpt
        ids = _ids(model.config.vocab_size) if ids is None else ids
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
