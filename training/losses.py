"""Losses shared by the trainers: CogVideoX's v-prediction loss in x0 space, face masking, identity."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def x0_from_v(scheduler, noisy: torch.Tensor, v_pred: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x̂0 = sqrt(ᾱ_t) x_t − sqrt(1 − ᾱ_t) v  (what ``scheduler.get_velocity(v, x_t, t)`` returns)."""
    return scheduler.get_velocity(v_pred, noisy, timesteps)


def loss_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """CogVideoX's per-sample weight 1 / (1 − ᾱ_t) for the x0-space loss: [B]."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    return (1.0 / (1.0 - alphas)).float()


def v_prediction_loss(x0_pred: torch.Tensor, x0: torch.Tensor, weights: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weighted MSE in x0 space: [B].

    ``x0_pred``/``x0``: [B, T, C, H, W]; ``weights``: [B]; ``mask`` (optional): [B, 1, 1, H, W] or
    broadcastable, 1 inside the region that counts — the loss is the mean over that region only.
    """
    err = (x0_pred.float() - x0.float()) ** 2
    if mask is None:
        per_sample = err.flatten(1).mean(dim=1)
    else:
        mask = mask.to(err.dtype).expand_as(err)
        per_sample = (err * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp(min=1.0)
    return weights.float() * per_sample


def box_to_latent_mask(boxes: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    """Pixel boxes [B, 4] (x1, y1, x2, y2) -> latent masks [B, 1, 1, height/scale, width/scale] in {0, 1}.

    A latent cell counts when it overlaps the box (the box is expanded outwards to whole cells).
    """
    h, w = height // scale, width // scale
    ys = torch.arange(h, device=boxes.device).view(1, h, 1)
    xs = torch.arange(w, device=boxes.device).view(1, 1, w)
    x1 = (boxes[:, 0] / scale).floor().view(-1, 1, 1)
    y1 = (boxes[:, 1] / scale).floor().view(-1, 1, 1)
    x2 = (boxes[:, 2] / scale).ceil().view(-1, 1, 1)
    y2 = (boxes[:, 3] / scale).ceil().view(-1, 1, 1)
    mask = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    return mask.float()[:, None, None]


def identity_loss(cosine: torch.Tensor) -> torch.Tensor:
    """1 − cos(ArcFace(reference), ArcFace(decoded x̂0)), per sample."""
    return 1.0 - cosine


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """err = mean squared error per sample: [B]."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def regdpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, *,
                beta: float, mode: str = "regdpo", r: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reg-DPO (arXiv 2511.01450, Eq. 6): ``L = −log σ(−β·s) + r·err_θ(w)`` per pair, averaged.

    ``s = (err_θ(w) − err_ref(w)) − (err_θ(l) − err_ref(l))`` = Win Gap − Lose Gap (errors are mean
    v-prediction MSEs). β multiplies s directly (no 0.5 factor). ``DGR = β(1 − σ(−β·s))`` is the
    DPO gradient ratio. ``mode``: ``regdpo`` (r = DGR, detached), ``fixed`` (the given r), ``dpo``
    (r = 0) or ``sft`` (only err_θ(w)). Returns the loss and every logged quantity (batch means).
    """
    win_gap = err_w - ref_err_w
    lose_gap = err_l - ref_err_l
    s = win_gap - lose_gap
    l_dpo = -F.logsigmoid(-beta * s)
    dgr = beta * (1 - torch.sigmoid(-beta * s))
    if mode == "regdpo":
        reg = dgr.detach()
    elif mode == "fixed":
        reg = torch.full_like(dgr, float(r))
    elif mode in ("dpo", "sft"):
        reg = torch.zeros_like(dgr)
    else:
        raise ValueError(f"unknown Reg-DPO mode {mode!r} (regdpo, fixed, dpo, sft)")
    loss = err_w if mode == "sft" else l_dpo + reg * err_w
    logs = {"DGR": dgr.mean().detach(), "r": reg.mean().detach(), "DGR+r": (dgr + reg).mean().detach(),
            "win_gap": win_gap.mean().detach(), "lose_gap": lose_gap.mean().detach(), "s": s.mean().detach(),
            "L_DPO": l_dpo.mean().detach(), "implicit_accuracy": (s < 0).float().mean(),
            "err_w": err_w.mean().detach(), "err_l": err_l.mean().detach()}
    return loss.mean(), logs
