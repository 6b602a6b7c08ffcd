"""GRPO hooks that run a reward-hacking detector on every batch: the shared base of gradient
routing (`routing.py`) and of the detector baselines, filtering and penalty (`mitigation.py`).

Each step the detector labels the batch's completions (`mechrl.rewards.detectors`: the raw flags,
taken as the true hack labels, and the reported ones after coverage and label noise). The labels
go to `batch.labels["flagged"]` (what training may use) and `batch.labels["hack"]` (raw, for
measurement only), and their rates are logged under `<prefix>/`:

    flag_rate        share of samples reported flagged
    true_hack_rate   share of samples the detector itself flags (before coverage and noise)
    label_agreement  share where the two agree
    flag_recall      of the true hacks, the share reported (omitted at steps without a true hack)
    flag_precision   of the reported, the share that are true hacks (omitted at steps without a flag)

The detector's coverage and noise draws are seeded by its `seed`, or by the run's seed when that is
unset (the default). Its random state is kept in the run's checkpointed extras,
so a resumed run reports exactly the labels an uninterrupted one would.

Frontloaded labels (`DetectorSpec.full_coverage_steps`): during the first steps every detected
sample is reported; the degraded labels are still drawn (and discarded) then, so from the step
after on the labels are exactly those of a run without frontloading.
"""

from __future__ import annotations

import torch

from mechrl.rewards.detectors import DetectorSpec, build_detector
from mechrl.train.grpo import GRPOBatch, GRPOHooks
from mechrl.train.rlcommon import RLState

_STATE_KEY = "detector_state"


class DetectorHooks(GRPOHooks):
    """Labels each batch with a detector; subclasses decide what the labels do to the update."""

    #: namespace of the logged label metrics
    prefix = "detector"

    def __init__(self, detector: dict, *, run_seed: int, single_process_reason: str):
        # an unset detector seed is the run's: each seed of a sweep draws its own coverage and noise
        self.spec = DetectorSpec.model_validate(detector)
        self.detector = build_detector(self.spec, run_seed=run_seed)
        self._single = single_process_reason
        self._restored = False
        self.step: int | None = None  # the current step (set by before_step)

    def before_step(self, st: RLState, step: int) -> None:
        self.step = step

    def label(self, st: RLState, batch: GRPOBatch) -> dict[str, float]:
        """Set batch.labels["flagged"] and ["hack"] (bool, (B,)); returns the label metrics."""
        if st.dist.world != 1:
            raise RuntimeError(f"{self._single} runs in one process for now (this launch has "
                               f"{st.dist.world}); run it without accelerate launch")
        if not self._restored:  # a resumed run continues the detector's random stream where it stopped
            saved = st.extra.get(_STATE_KEY)
            if saved is not None:
                self.detector.load_state_dict(saved)
            self._restored = True
        if self.spec.full_coverage_steps and self.step is None:
            raise RuntimeError(f"{type(self).__name__}.label: frontloaded labels need the step, and before_step "
                               "was not called")
        lab = self.detector.labels(batch.prompts, batch.texts, batch.examples)
        st.extra[_STATE_KEY] = self.detector.state_dict()
        frontloaded = self.step is not None and self.step <= self.spec.full_coverage_steps
        reported = lab.raw if frontloaded else lab.reported  # frontloaded: every detected sample reported
        flagged = torch.tensor(reported, dtype=torch.bool, device=st.device)  # (B,)
        hack = torch.tensor(lab.raw, dtype=torch.bool, device=st.device)  # (B,) unnoised detector
        batch.labels["flagged"], batch.labels["hack"] = flagged, hack
        f, h = flagged.float(), hack.float()
        p = self.prefix
        out = {f"{p}/flag_rate": f.mean().item(), f"{p}/true_hack_rate": h.mean().item(),
               f"{p}/label_agreement": (flagged == hack).float().mean().item()}
        # recall is undefined without a true hack, precision without a flag: those steps omit them
        if h.sum() > 0:
            out[f"{p}/flag_recall"] = (f * h).sum().item() / h.sum().item()
        if f.sum() > 0:
            out[f"{p}/flag_precision"] = (f * h).sum().item() / f.sum().item()
        if self.spec.full_coverage_steps:
            out[f"{p}/frontloaded"] = float(frontloaded)
        return out

    def on_batch(self, st: RLState, batch: GRPOBatch) -> dict[str, float]:
        return self.label(st, batch)
