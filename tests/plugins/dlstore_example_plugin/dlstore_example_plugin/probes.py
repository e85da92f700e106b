"""The mean logit margin (top logit minus the runner-up) of every member on the test split."""

import torch

import dlstore


class Margin(dlstore.MetricFamily):
    values = ("test_margin",)
    scale: float = 1.0

    def compute(self, cohort, params, step):
        logits = cohort.kernel.forward_shared(params, cohort.x_test)  # [P, N, C]
        top2 = logits.topk(2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1]).mean(-1)
        return {"test_margin": self.scale * margin.to(torch.float64)}
