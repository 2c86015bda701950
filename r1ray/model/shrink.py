"""A smaller model cut out of a trained one, along every axis: hidden width, depth, attention groups and MLP
channels (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation").

A student built fresh must learn language and the task from the teacher's distributions alone; one cut out of
the teacher starts with the teacher's own embeddings, attention and MLP rows, the least important removed, and
distillation only has to repair the cut. Importance is measured on calibration token ids by forward hooks:

- **hidden channels** (the residual stream, shared by every layer): the mean ``|x_c|`` of every RMSNorm's output
  (each layer's two and the final one), summed (Minitron's embedding-channel score);
- **layers**: block influence, ``1 - cos(h_in, h_out)`` of the residual stream across the layer, averaged over
  tokens (ShortGPT, Men et al. 2024); the most influential layers are kept, in their order;
- **attention groups** (a KV head with its query heads, so grouped-query attention stays grouped): the mean norm
  of the group's query heads' outputs (the input of ``o_proj``), per layer;
- **MLP channels**: the mean ``|a_c|`` of the input of ``down_proj`` times ``||W_down[:, c]||``, per layer.

``head_dim`` and the query heads per KV head are the teacher's. Llama and Qwen2 (attention biases sliced too);
tied or untied embeddings. The result is a plain ``transformers`` model of the same class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

__all__ = ["ShrinkShape", "activation_statistics", "shrink_model"]


@dataclass(frozen=True)
class ShrinkShape:
    hidden_size: int
    num_hidden_layers: int
    num_key_value_heads: int
    intermediate_size: int


def _check(shape: ShrinkShape, c: Any) -> None:
    problems = [f"{k} {getattr(shape, k)} is not in 1..{getattr(c, k)} (the teacher's)"
                for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size")
                if not 1 <= getattr(shape, k) <= getattr(c, k)]
    if problems:
        raise ValueError("cannot cut this shape out of the model: " + "; ".join(problems))


def activation_statistics(model: Any, calibration: list[list[int]]) -> dict[str, Any]:
    """Forward hooks over ``calibration`` (lists of token ids, one forward each: no padding to mask out), summed
    over tokens: ``hidden`` [hidden] (``|x|`` of every RMSNorm's output), per layer ``heads`` [query heads] (the
    norm of each head's output, the input of ``o_proj``) and ``channels`` [intermediate] (``|a|`` at the input of
    ``down_proj``), ``influence`` [layers] (``1 - cos`` across each layer), and ``tokens``. The one measurement
    behind this module's cut and ``r1ray.compress.prune``'s ``activation`` score."""
    import torch

    inner = model.model
    layers = list(inner.layers)
    c = model.config
    dev = next(model.parameters()).device
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    hidden = torch.zeros(c.hidden_size, dtype=torch.float64, device=dev)
    heads = [torch.zeros(c.num_attention_heads, dtype=torch.float64, device=dev) for _ in layers]
    chans = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64, device=dev) for layer in layers]
    influence = torch.zeros(len(layers), dtype=torch.float64, device=dev)
    tokens = 0
    hooks = []

    def norm_hook(_m: Any, _i: Any, out: Any) -> None:
        hidden.add_(out.detach().abs().double().sum((0, 1)))

    def o_hook(i: int):
        def f(_m: Any, inp: Any) -> None:
            x = inp[0].detach().double()
            heads[i].add_(x.view(*x.shape[:-1], c.num_attention_heads, -1).norm(dim=-1).sum((0, 1)))
        return f

    def down_hook(i: int):
        def f(_m: Any, inp: Any) -> None:
            chans[i].add_(inp[0].detach().abs().double().sum((0, 1)))
        return f

    def layer_hook(i: int):
        def f(_m: Any, inp: Any, out: Any) -> None:
            h_in = inp[0] if inp else None
            h_out = out[0] if isinstance(out, tuple) else out
            if h_in is not None:
                cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
                influence[i] += (1 - cos).sum()
        return f

    for i, layer in enumerate(layers):
        hooks += [layer.input_layernorm.register_forward_hook(norm_hook),
                  layer.post_attention_layernorm.register_forward_hook(norm_hook),
                  layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i)),
                  layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)),
                  layer.register_forward_hook(layer_hook(i))]
    hooks.append(inner.norm.register_forward_hook(norm_hook))
    try:
        with torch.no_grad():
            for ids in calibration:
                if not ids:
                    continue
                model(input_ids=torch.tensor([ids], device=dev))
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        raise ValueError("activation statistics need calibration token ids (at least one non-empty sequence)")
    return {"hidden": hidden.cpu(), "heads": [h.cpu() for h in heads], "channels": [ch.cpu() for ch in chans],
            "influence": influence.cpu(), "tokens": tokens, "head_dim": hd}


def _importance(model: Any, calibration: list[list[int]]) -> dict[str, Any]:
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    stats = activation_statistics(model, calibration)
    groups = [h.view(c.num_key_value_heads, group).sum(-1) for h in stats["heads"]]
    mlp = [ch / stats["tokens"] * layer.mlp.down_proj.weight.detach().double().cpu().norm(dim=0)
           for ch, layer in zip(stats["channels"], model.model.layers, strict=True)]
    return {"hidden": stats["hidden"], "layers": stats["influence"], "groups": groups, "mlp": mlp,
            "head_dim": stats["head_dim"], "group": group}


def _top(scores: Any, k: int) -> Any:
    import torch

    return torch.sort(torch.topk(scores, k).indices).values


def shrink_model(model: Any, shape: ShrinkShape, calibration: list[list[int]]) -> Any:
    """A new model of ``model``'s class and family with ``shape``, its weights sliced out of ``model``'s (which is
    left unchanged): the hidden channels, layers, KV groups and MLP channels that matter most on
    ``calibration`` (lists of token ids) are kept."""
    import torch

    c = model.config
    _check(shape, c)
    model.eval()
    imp = _importance(model, calibration)
    hd, group = imp["head_dim"], imp["group"]
    keep_h = _top(imp["hidden"], shape.hidden_size)
    keep_l = _top(imp["layers"], shape.num_hidden_layers).tolist()

    new_cfg = copy.deepcopy(c)
    new_cfg.hidden_size = shape.hidden_size
    new_cfg.num_hidden_layers = shape.num_hidden_layers
    new_cfg.num_key_value_heads = shape.num_key_value_heads
    new_cfg.num_attention_heads = shape.num_key_value_heads * group
    new_cfg.intermediate_size = shape.intermediate_size
    new_cfg.head_dim = hd
    if getattr(new_cfg, "layer_types", None):
        new_cfg.layer_types = [c.layer_types[i] for i in keep_l]
    student = type(model)(new_cfg).to(next(model.parameters()).dtype)

    def rows(w: Any, idx: Any) -> Any:
        return w.detach().index_select(0, idx)

    def heads_idx(kv_keep: Any, per: int) -> Any:
        return torch.cat([torch.arange(g * per * hd, (g + 1) * per * hd) for g in kv_keep.tolist()])

    with torch.no_grad():
        src, dst = model.model, student.model
        dst.embed_tokens.weight.copy_(src.embed_tokens.weight[:, keep_h])
        dst.norm.weight.copy_(src.norm.weight[keep_h])
        for j, i in enumerate(keep_l):
            a, b = src.layers[i], dst.layers[j]
            kv = _top(imp["groups"][i], shape.num_key_value_heads)
            q_idx, kv_idx = heads_idx(kv, group), heads_idx(kv, 1)
            ch = _top(imp["mlp"][i], shape.intermediate_size)
            b.input_layernorm.weight.copy_(a.input_layernorm.weight[keep_h])
            b.post_attention_layernorm.weight.copy_(a.post_attention_layernorm.weight[keep_h])
            for name, idx in (("q_proj", q_idx), ("k_proj", kv_idx), ("v_proj", kv_idx)):
                pa, pb = getattr(a.self_attn, name), getattr(b.self_attn, name)
                pb.weight.copy_(rows(pa.weight, idx)[:, keep_h])
                if pa.bias is not None:
                    pb.bias.copy_(pa.bias[idx])
            b.self_attn.o_proj.weight.copy_(rows(a.self_attn.o_proj.weight, keep_h)[:, q_idx])
            if a.self_attn.o_proj.bias is not None:
                b.self_attn.o_proj.bias.copy_(a.self_attn.o_proj.bias[keep_h])
            for name in ("gate_proj", "up_proj"):
                getattr(b.mlp, name).weight.copy_(rows(getattr(a.mlp, name).weight, ch)[:, keep_h])
            b.mlp.down_proj.weight.copy_(rows(a.mlp.down_proj.weight, keep_h)[:, ch])
        if not c.tie_word_embeddings:
            student.lm_head.weight.copy_(model.lm_head.weight[:, keep_h])
    student.tie_weights()
    return student
