"""Structured pruning of a Llama/Qwen2 model: whole attention heads and MLP channels, by an importance score.

Every layer loses the same number of heads and channels (transformers' Llama and Qwen2 read one
``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` for all layers), but each layer
chooses its own: the ones with the lowest importance there. ``head_dim`` is written into the config, so the
heads that remain keep their size. The result is a plain Hugging Face directory that ``from_pretrained`` loads.

Grouped-query attention: query head ``h`` reads KV head ``h // G`` (G query heads per KV head), so

- ``head_unit=query`` removes the same number ``r`` of query heads from every KV group (the groups stay
  contiguous; KV heads are kept): ``H' = K (G - r)``;
- ``head_unit=kv_group`` removes whole groups, a KV head with its G query heads: ``H' = H - nG, K' = K - n``.

With one query head per KV head (multi-head attention) both remove whole (query, KV) pairs.

Importance (``score``):

- ``magnitude``: a head scores ``||W_q[h]|| * ||W_o[:, h]||`` (Frobenius), a channel
  ``||W_gate[c]|| * ||W_up[c]|| * ||W_down[:, c]||``;
- ``activation``: on calibration text, a head scores the mean over tokens of the norm of its attention output
  (the input of ``o_proj`` for that head) times ``||W_o[:, h]||``; a channel the mean ``|a_c|`` of its
  activation (the input of ``down_proj``) times ``||W_down[:, c]||`` (Wanda-style: activation x weight).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r1ray.compress.config import PruneConfig
from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["PrunePlan", "plan_counts", "prune_dir", "prune_model"]


@dataclass
class PrunePlan:
    """What pruning removed (the same counts in every layer)."""

    heads_before: int
    heads_after: int
    kv_heads_before: int
    kv_heads_after: int
    intermediate_before: int
    intermediate_after: int
    head_dim: int
    kept_heads: list[list[int]] = field(default_factory=list)
    """Per layer: indices of the query heads kept."""
    kept_channels: list[list[int]] = field(default_factory=list, repr=False)
    """Per layer: indices of the MLP channels kept."""

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kept_channels")
        d["heads_removed_share"] = 1 - self.heads_after / self.heads_before
        d["mlp_removed_share"] = 1 - self.intermediate_after / self.intermediate_before
        return d


def plan_counts(heads: int, kv_heads: int, intermediate: int, cfg: PruneConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, MLP channels) left per layer by ``cfg``; ValueError when a share cannot be met
    (every head or channel would go)."""
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    group = heads // kv_heads
    h, k = heads, kv_heads
    if cfg.heads_fraction:
        if cfg.head_unit == "query" and group > 1:
            r = round(cfg.heads_fraction * group)
            if r >= group:
                raise ValueError(f"prune.heads_fraction={cfg.heads_fraction} removes every query head of each "
                                 f"KV group ({group} per group); lower it or use head_unit=kv_group")
            h = kv_heads * (group - r)
        else:
            n = round(cfg.heads_fraction * kv_heads)
            if n >= kv_heads:
                raise ValueError(f"prune.heads_fraction={cfg.heads_fraction} removes all {kv_heads} KV groups; "
                                 "lower it")
            h, k = (kv_heads - n) * group, kv_heads - n
        if h == heads:
            log.warning("prune.heads_fraction=%s rounds to no head removed (%d heads, %d KV heads, unit %s)",
                        cfg.heads_fraction, heads, kv_heads, cfg.head_unit)
    m = cfg.mlp_multiple_of
    kept = max(m, int(round(intermediate * (1 - cfg.mlp_fraction) / m)) * m)
    if kept > intermediate:
        kept = intermediate
    return h, k, kept


def _layers(model: Any) -> list[Any]:
    return list(model.model.layers)


def _activation_stats(model: Any, tokenizer: Any, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Per layer: the summed attention-output norm of each head and |activation| of each MLP channel over the
    calibration texts' tokens (``r1ray.model.shrink.activation_statistics``, one document per forward)."""
    from r1ray.model.shrink import activation_statistics

    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens] for text in texts]
    if not any(ids):
        raise ValueError("prune.score=activation: the calibration texts hold no tokens")
    return activation_statistics(model, ids)


def _scores(model: Any, cfg: PruneConfig, tokenizer: Any, texts: list[str] | None) -> tuple[list[Any], list[Any]]:
    """Per layer: (query-head scores [H], MLP-channel scores [I]); higher is more important."""
    import torch

    heads = model.config.num_attention_heads
    stats = None
    if cfg.score == "activation":
        if not texts:
            raise ValueError("prune.score=activation needs calibration texts; give some or use score=magnitude")
        stats = _activation_stats(model, tokenizer, texts, cfg.calibration_max_tokens)
    head_scores, chan_scores = [], []
    for i, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        wq = attn.q_proj.weight.detach().double()
        wo = attn.o_proj.weight.detach().double()
        hd = wq.shape[0] // heads
        o_norm = wo.reshape(wo.shape[0], heads, hd).norm(dim=(0, 2))
        wd = mlp.down_proj.weight.detach().double()
        d_norm = wd.norm(dim=0)
        if stats is None:
            head_scores.append(wq.reshape(heads, hd, -1).norm(dim=(1, 2)) * o_norm)
            chan_scores.append(mlp.gate_proj.weight.detach().double().norm(dim=1)
                               * mlp.up_proj.weight.detach().double().norm(dim=1) * d_norm)
        else:
            n = stats["tokens"]
            head_scores.append(stats["heads"][i] / n * o_norm)
            chan_scores.append(stats["channels"][i] / n * d_norm)
    return [s.to(torch.float64) for s in head_scores], [s.to(torch.float64) for s in chan_scores]


def _keep_heads(scores: Any, heads: int, kv_heads: int, h_new: int, k_new: int) -> tuple[list[int], list[int]]:
    """(query heads kept, KV heads kept), each sorted, for one layer."""
    group = heads // kv_heads
    if k_new < kv_heads:  # whole KV groups, by the sum of their query heads' scores
        g_scores = scores.reshape(kv_heads, group).sum(1)
        kv_keep = sorted(g_scores.argsort(descending=True)[:k_new].tolist())
        return [g * group + j for g in kv_keep for j in range(group)], kv_keep
    per_group = h_new // kv_heads
    keep = []
    for g in range(kv_heads):
        local = scores[g * group:(g + 1) * group].argsort(descending=True)[:per_group]
        keep += sorted(g * group + int(j) for j in local)
    return keep, list(range(kv_heads))


def _rows(t: Any, idx: list[int], width: int) -> Any:
    """Rows of ``t`` (out x in, or a bias) for unit indices ``idx``, each unit ``width`` rows wide."""
    import torch

    rows = torch.tensor([u * width + j for u in idx for j in range(width)], dtype=torch.long)
    return t.index_select(0, rows).clone()


def prune_model(model: Any, cfg: PruneConfig, tokenizer: Any = None, texts: list[str] | None = None
                ) -> tuple[Any, PrunePlan]:
    """A new, pruned model (same class, smaller config) and what was removed. ``model`` is left as it was."""
    import torch
    from transformers import AutoModelForCausalLM

    c = model.config
    heads, kv_heads, inter = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    h_new, k_new, i_new = plan_counts(heads, kv_heads, inter, cfg)
    head_scores, chan_scores = _scores(model, cfg, tokenizer, texts)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = PrunePlan(heads, h_new, kv_heads, k_new, inter, i_new, head_dim)
    for i in range(len(_layers(model))):
        p = f"model.layers.{i}."
        q_keep, kv_keep = _keep_heads(head_scores[i], heads, kv_heads, h_new, k_new)
        c_keep = sorted(chan_scores[i].argsort(descending=True)[:i_new].tolist())
        plan.kept_heads.append(q_keep)
        plan.kept_channels.append(c_keep)
        for name, keep in (("q_proj", q_keep), ("k_proj", kv_keep), ("v_proj", kv_keep)):
            for suffix in ("weight", "bias"):
                key = f"{p}self_attn.{name}.{suffix}"
                if key in sd:
                    sd[key] = _rows(sd[key], keep, head_dim)
        key = f"{p}self_attn.o_proj.weight"
        sd[key] = _rows(sd[key].t(), q_keep, head_dim).t().contiguous()
        cols = torch.tensor(c_keep, dtype=torch.long)
        for name in ("gate_proj", "up_proj"):
            sd[f"{p}mlp.{name}.weight"] = sd[f"{p}mlp.{name}.weight"].index_select(0, cols).clone()
        sd[f"{p}mlp.down_proj.weight"] = sd[f"{p}mlp.down_proj.weight"].index_select(1, cols).contiguous()
    new_cfg = c.__class__.from_dict({**c.to_dict(), "num_attention_heads": h_new, "num_key_value_heads": k_new,
                                     "intermediate_size": i_new, "head_dim": head_dim})
    pruned = AutoModelForCausalLM.from_config(new_cfg, dtype=next(model.parameters()).dtype)
    missing, unexpected = pruned.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(new_cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned state dict does not fit the pruned config: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    log.info("pruned: heads %d -> %d, KV heads %d -> %d, MLP channels %d -> %d per layer (%s score)", heads, h_new,
             kv_heads, k_new, inter, i_new, cfg.score)
    return pruned.eval(), plan


def prune_dir(src: str | Path, out: str | Path, cfg: PruneConfig, texts: list[str] | None = None) -> PrunePlan:
    """Prune the HF model in ``src`` (fp32, on CPU) and save it with its tokenizer to ``out``."""
    import torch

    from r1ray.model.build import load_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    model = load_model(src, dtype=torch.float32).eval()
    pruned, plan = prune_model(model, cfg, tok, texts)
    save_model(pruned, tok, out)
    return plan
