"""A training stage that is not pretraining, exercising every part of the stage contract:

- a frozen model beside the trained one (a reference copy of the initial weights, ``self.frozen["ref"]``);
- mu = 2 optimizer updates per step, each on its own half of the step's samples;
- an after-update hook whose count is stage state, saved in checkpoints and restored on resume;
- its own metrics (a weighted mean, a max, a total) and a sequence-mean normaliser instead of tokens;
- the default, collective-safe evaluation.

Loss per sequence: mean token cross-entropy + ``beta`` x mean k3-KL to the frozen reference.
Imported by the Ray Train workers by name (``tests.ray.contract_stage:ContractStage``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from r1ray.config import R1Config
from r1ray.train.core.config import TrainJobConfig
from r1ray.train.stage import Metrics, RunPlan, Stage, StepInputs, WorkerInfo


class ContractSection(R1Config):
    tokenizer_dir: str = ""
    """Tokenizer of the toy model."""
    samples: int = Field(default=256, ge=8)
    seq_len: int = 16
    beta: float = 0.1


class ContractConfig(TrainJobConfig):
    contract: ContractSection = ContractSection()


class ContractStage(Stage):
    name = "contract"
    config_class = ContractConfig

    @classmethod
    def plan(cls, cfg: ContractConfig) -> RunPlan:
        if not cfg.contract.tokenizer_dir:
            raise ValueError("contract.tokenizer_dir is unset")
        return RunPlan(config=cfg, inputs=[], baselines={"toy_baseline": 1.0})  # no upstream artifact

    def setup(self, worker: WorkerInfo, resources: dict[str, Any]) -> None:
        from r1ray.model.tokenizer import load_tokenizer

        c = self.cfg.contract
        self.tokenizer = load_tokenizer(c.tokenizer_dir)
        rng = np.random.default_rng(1234)
        # a learnable toy language: each row counts up from a random start modulo a small range
        start = rng.integers(10, 60, size=(c.samples, 1))
        self.rows = (start + np.arange(c.seq_len)[None, :]) % 70 + 10
        self.updates_done = 0

    def build_model(self) -> Any:
        from r1ray.model import build_model

        return build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed)

    def frozen_models(self) -> dict[str, Any]:
        return {"ref": self.build_model()}  # the same seeded init: the reference policy

    def num_samples(self) -> int:
        return len(self.rows)

    def make_batch(self, rows: np.ndarray, device: Any) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(self.rows[rows].astype(np.int64)).to(device)
        return {"input_ids": ids, "n_seqs": ids.shape[0], "n_tokens": ids.numel()}

    def step_inputs(self, step: int, rows: list[np.ndarray], model: Any) -> StepInputs:
        # two updates per step, each on half of every micro-batch's rows (so each keeps `accumulation` batches)
        device = self.worker.device
        halves = [[r[: len(r) // 2] for r in rows], [r[len(r) // 2 :] for r in rows]]
        m = Metrics()
        m.total("prompts_seen", float(sum(len(r) for r in rows)))
        return StepInputs(updates=[[self.make_batch(r, device) for r in h] for h in halves], metrics=m)

    def batch_weight(self, batch: dict[str, Any]) -> float:
        return float(batch["n_seqs"])  # a sequence-mean objective, not a token mean

    def loss(self, model: Any, batch: dict[str, Any], metrics: Metrics) -> Any:
        import torch
        import torch.nn.functional as F

        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        ce = ce.view(targets.shape).mean(dim=1)  # per sequence
        with torch.no_grad():
            ref_logits = self.frozen["ref"](input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        delta = ref_logp - logp
        kl = (delta.exp() - delta - 1).mean(dim=1)  # k3 estimator, per sequence
        metrics.mean("contract_kl", float(kl.detach().mean()), weight=ids.shape[0])
        metrics.max("contract_max_seq_loss", float(ce.detach().max()))
        return (ce + self.cfg.contract.beta * kl).sum()

    def after_update(self, model: Any, step: int, update: int) -> None:
        self.updates_done += 1

    def eval_batches(self):
        w = self.worker
        mine = np.arange(w.rank, 24, w.world_size)  # 24 rows: uneven batch counts on 5 workers, say
        for i in range(0, len(mine), 4):
            yield self.make_batch(mine[i : i + 4], w.device)

    def state_dict(self) -> dict[str, Any]:
        return {"updates_done": self.updates_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates_done = int(state.get("updates_done", 0))
