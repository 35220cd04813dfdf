"""FusedAdam: a whole SAE training step (forward, backward, Adam, decoder constraints) in one fused pass.

The unfused step is ``sae(x).loss.backward()``, ``sae.remove_parallel_grad_()`` (unit-norm decoders),
``torch.optim.Adam.step()``, ``sae.normalize_decoder_()``: several passes over (n, d) tensors, the
gradients among them. ``FusedAdam.step_fused(x)`` runs the fused encoder, then a small autograd graph
over the selected entries only (their pre-activations, the reconstruction and the per-latent norms and
thresholds: (B, K), (B, d) and (n,) tensors), and hands the per-entry gradients to the backend's
``fused_adam_step``: one latent-sorted pass that, per latent row while it is in cache, reduces the
W_enc, b_enc and W_dec gradient rows, adds the L1 term, removes the parallel component, updates Adam's
moments and the parameters and renormalises the decoder row. The (n, d) gradients are never written.
Latents with no entry get Adam's exact update from their moments in the same streaming pass. b_dec and
JumpReLU's log-thresholds (vectors) get the same Adam update in torch. A Matryoshka SAE's prefixes come
from one decode; the kernel then runs once per group on that group's rows (``matryoshka.grouped_adam_step``:
its decoder rows are the suffix sums of the prefixes' gradients), still one update per latent.

The state is ``torch.optim.Adam``'s (this class is one: ``exp_avg``, ``exp_avg_sq``, ``step`` per
parameter, in ``sae.parameters()`` order), so checkpoints resume across fused and unfused steps, and
``step()`` is plain Adam on ``.grad``. Where no fused kernel applies (the torch and reference backends,
16-bit activations or autocast on CPU, eval mode, a param group changed to weight decay, amsgrad or
maximize, a Matryoshka SAE, a transcoder whose output is wider or narrower than its input) ``step_fused``
runs the unfused step instead, with the same result up to float rounding.

A transcoder (``step_fused(x, target=y)``) runs the same kernels with a zero encoder bias and ``xc = x``; its
loss reads y, and a skip connection's W_skip (dense) gets its gradient from the small graph and Adam in torch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference as R
from .checks import check_encoder, dead_bound
from .dispatch import get_backend
from .matryoshka import _MatryoshkaDecode, grouped_adam_step, prefix_fvus
from .ops import _SparseDecode, gather_latents
from .sae import SAEOutput, SparseAutoencoder

UNIT_NORM_ACTIVATIONS = ("topk", "batchtopk")


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where this torch build has a fused kernel for the parameters' device (the trainer's and
    the bench's optimizer for unfused steps)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The activations' dtype in the step: autocast's when it is on (over fp32 master weights)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def training_loss(sae: SparseAutoencoder, out: SAEOutput, sparsity_weight: float = 1.0) -> Tensor:
    """The loss a training step backpropagates: the module's, with ReLU's L1 and JumpReLU's L0 terms
    scaled by ``sparsity_weight`` (the trainer's warm-up)."""
    if sae.cfg.activation in ("relu", "jumprelu"):
        return out.mse + sparsity_weight * (out.loss - out.mse)
    return out.loss


def adam_(p: Tensor, g: Tensor, m: Tensor, s: Tensor, step_size: float, bc2_sqrt: float, beta1: float,
          beta2: float, eps: float) -> None:
    """torch.optim.Adam's single-tensor update, in place (the fused kernel's per-element formula)."""
    m.lerp_(g, 1 - beta1)
    s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.addcdiv_(m, (s.sqrt() / bc2_sqrt).add_(eps), value=-step_size)


class FusedAdam(torch.optim.Adam):
    """Adam over ``sae.parameters()`` whose ``step_fused(x)`` is a whole fused training step.

    >>> opt = FusedAdam(sae, lr=1e-3)
    >>> out = opt.step_fused(x)        # forward, backward, Adam, decoder renormalisation; returns SAEOutput

    ``unit_norm_decoder`` (default: TopK and BatchTopK, as the trainer does) removes the decoder
    gradient's component parallel to each row before Adam and renormalises the rows after it."""

    def __init__(self, sae: SparseAutoencoder, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, unit_norm_decoder: bool | None = None):
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"sae must be a SparseAutoencoder; got {type(sae).__name__}")
        super().__init__(sae.parameters(), lr=lr, betas=betas, eps=eps)
        self.sae = sae
        self.unit_norm_decoder = sae.unit_norm_decoder if unit_norm_decoder is None else bool(unit_norm_decoder)
        self._t: int | None = 0  # Python copy of the shared step count: bias corrections without a host read

    # ------------------------------------------------------------------ torch.optim.Adam compatibility
    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._t = None  # read once, lazily, from the loaded state

    def step(self, closure=None):
        """Plain Adam on the parameters' ``.grad`` (torch.optim.Adam.step)."""
        loss = super().step(closure)
        self._t = None
        return loss

    def _step_count(self) -> int:
        if self._t is None:
            steps = {int(st["step"]) for st in self.state.values() if "step" in st}
            if len(steps) > 1:
                raise ValueError(f"FusedAdam needs one step count for all parameters; the state has {sorted(steps)}")
            self._t = steps.pop() if steps else 0
        return self._t

    # ------------------------------------------------------------------ the step
    def fused_reason(self, x: Tensor) -> str | None:
        """Why ``step_fused(x)`` would run the unfused step, or None when it runs fused."""
        sae = self.sae
        if sae.d_out != sae.d_in:
            return "a transcoder with d_out != d_in: the fused kernel takes one width for x and the output"
        backend = get_backend(x.device)
        dtype = _compute_dtype(x)
        supported = getattr(backend, "fused_step_supported", None)  # the reference backend has no primitives
        if supported is None or not supported(dtype):
            return f"the {backend.name} backend has no fused step for {dtype} activations on {x.device.type}"
        if not sae.training:
            return "the SAE is in eval mode"
        params = list(sae.parameters())
        if len(self.param_groups) != 1 or len(self.param_groups[0]["params"]) != len(params) or any(
                a is not b for a, b in zip(self.param_groups[0]["params"], params)):
            return "the param groups are not the SAE's parameters"
        group = self.param_groups[0]
        if group["weight_decay"] or group["amsgrad"] or group["maximize"]:
            return "weight decay, amsgrad or maximize is set"
        if any(p.dtype != torch.float32 for p in params):
            return "the parameters are not float32"
        if any(p.grad is not None for p in params):
            return "gradients are pending (accumulated micro-batches)"
        return None

    def step_fused(self, x: Tensor, sparsity_weight: float = 1.0, target: Tensor | None = None) -> SAEOutput:
        """One training step on the batch ``x`` (..., d_in) (a transcoder: and its ``target`` (..., d_out));
        returns the forward's SAEOutput (detached; ``loss`` is the module's, the backpropagated one scales
        ReLU's/JumpReLU's sparsity term by ``sparsity_weight``)."""
        x2 = self.sae._flatten(x)
        y2 = self.sae._target(x2, target)
        if self.fused_reason(x2) is not None:
            return self._unfused(x, sparsity_weight, target)
        dtype = _compute_dtype(x2)
        with torch.autocast(x2.device.type, enabled=False):  # 16-bit activations beside fp32 weights, explicitly
            return self._fused(x2.to(dtype), float(sparsity_weight), x.shape[:-1], y2.to(dtype))

    def _unfused(self, x: Tensor, sparsity_weight: float, target: Tensor | None = None) -> SAEOutput:
        sae = self.sae
        out = sae(x) if target is None else sae(x, target=target)
        training_loss(sae, out, sparsity_weight).backward()
        if self.unit_norm_decoder:
            sae.remove_parallel_grad_()
        t = self._step_count()
        super().step()
        self._t = t + 1
        self.zero_grad(set_to_none=True)
        if self.unit_norm_decoder:
            sae.normalize_decoder_()
        return SAEOutput(*(None if o is None else o.detach() for o in out))

    def _adam_scalars(self) -> tuple[float, float, float, float, float]:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        t = self._step_count() + 1
        step_size = float(group["lr"]) / (1 - beta1 ** t)
        return step_size, math.sqrt(1 - beta2 ** t), float(beta1), float(beta2), float(group["eps"])

    def _state(self, p: Tensor) -> dict:
        st = self.state[p]
        if not st:  # torch.optim.Adam's layout, so either optimizer can continue from the other's state
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _fused(self, x: Tensor, weight: float, lead, y: Tensor) -> SAEOutput:
        sae, cfg = self.sae, self.sae.cfg
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        # A transcoder's encoder reads x itself (zero encoder bias); its target y is the module's output.
        b_in = sae._encoder_bias(b_dec.detach())
        check_encoder(x, W_enc.detach(), b_enc.detach(), b_in)
        backend = get_backend(x.device)
        act = cfg.activation
        # AuxK with a fixed list width: dead latents fewer than k_aux leave padding (-inf, skipped by the
        # kernel), none at all makes the loss term zero. No host read of the dead count.
        k_aux = min(cfg.k_aux, cfg.n_latents) if act == "topk" else 0
        with torch.no_grad():
            dead = sae.dead_mask if k_aux else None
            theta = sae.log_threshold.exp() if act == "jumprelu" else None
            if act == "topk":
                with dead_bound(sae.dead_bound if k_aux else None):
                    pre, idx, aux_pre, aux_idx = backend.topk_select(x, W_enc, b_enc, b_in, cfg.k, dead, k_aux)
            elif act == "batchtopk":
                pre, idx = backend.batch_topk_select(x, W_enc, b_enc, b_in, cfg.k)
            elif act == "relu":
                pre, idx = backend.threshold_select(x, W_enc, b_enc, b_in, torch.zeros_like(b_enc))
            else:  # every entry inside the estimator's window, as ops.jumprelu_encode lists them
                pre, idx = backend.threshold_select(x, W_enc, b_enc, b_in, theta - cfg.jumprelu_bandwidth / 2)
            W_d = W_dec.detach()
        with torch.enable_grad():
            pre_l = pre.detach().requires_grad_()
            inputs = [pre_l]
            l0_soft = None
            if act == "jumprelu":
                log_thr = sae.log_threshold
                theta_l = gather_latents(log_thr.exp(), idx)
                values = R.JumpReLUFn.apply(pre_l, theta_l, cfg.jumprelu_bandwidth)
                l0_soft = R.StepFn.apply(pre_l, theta_l, cfg.jumprelu_bandwidth).sum(-1).mean()
            else:
                values = torch.relu(pre_l)
            widths = cfg.matryoshka
            b_dec_l = b_dec.detach().requires_grad_()
            if widths is None:
                xh = _SparseDecode.apply(values, idx, W_d, None, backend.name)
                x_hat = xh + b_dec_l
            else:  # every prefix (G, B, d) from one decode; their gradients, suffix-summed, feed the kernel
                xh = _MatryoshkaDecode.apply(values, idx, W_d, None, widths, backend.name)
                prefixes = xh + b_dec_l
                x_hat = prefixes[-1]
            inputs += [xh, b_dec_l]
            if cfg.skip_connection:  # a dense (d_out, d_in) term: a plain gradient and Adam below
                W_skip_l = sae.W_skip.detach().requires_grad_()
                x_hat = x_hat + x.float() @ W_skip_l.T  # fp32 master weight beside 16-bit x
                inputs.append(W_skip_l)
            xf, x_hat_f = y.float(), x_hat.float()
            mse = R.mse(x_hat_f, xf)
            prefix_fvu = None if widths is None else prefix_fvus(prefixes, xf)
            fvu = R.fvu(x_hat_f, xf) if widths is None else prefix_fvu[-1]
            norms = W_d.float().norm(dim=-1).requires_grad_(act == "relu")
            l1 = (values.float() * gather_latents(norms, idx)).sum(-1).mean()
            aux_loss = x.new_zeros((), dtype=torch.float32)
            if k_aux:
                aux_l = aux_pre.detach().requires_grad_()
                aux_values = torch.relu(aux_l)
                e_hat = _SparseDecode.apply(aux_values, aux_idx, W_d, None, backend.name)
                residual = (y - x_hat).detach().float()
                aux_loss = R.fvu(e_hat.float(), residual) * dead.any()
                inputs += [aux_l, e_hat]
            if act in UNIT_NORM_ACTIVATIONS:
                loss = (fvu if widths is None else prefix_fvu.sum()) + cfg.aux_coeff * aux_loss
                train_loss = loss
            elif act == "relu":
                loss = mse + cfg.l1_coeff * l1
                train_loss = mse + weight * cfg.l1_coeff * l1
                inputs.append(norms)
            else:
                loss = mse + cfg.l0_coeff * l0_soft.float()
                train_loss = mse + weight * cfg.l0_coeff * l0_soft.float()
                inputs.append(log_thr)
            grads = torch.autograd.grad(train_loss, inputs, allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, inputs)]
        dp, g, g_b_dec = grads[:3]
        g_skip = grads[3] if cfg.skip_connection else None
        rest = grads[4:] if cfg.skip_connection else grads[3:]
        with torch.no_grad():
            v = values.detach()
            if k_aux:
                adp, g_aux = rest[:2]
                idx_all, pre_all = torch.cat([idx, aux_idx], 1), torch.cat([pre, aux_pre], 1)
                dp_all, v_all = torch.cat([dp, adp], 1), torch.cat([v, aux_values.detach()], 1)
                g_all = None if widths else torch.cat([g, g_aux.to(g.dtype)], 0)
            else:
                idx_all, pre_all, dp_all, v_all, g_all = idx, pre, dp, v, g
                g_aux = None
            # b_dec enters the encoder through x - b_dec: its gradient there is -sum_e dp[e] W_enc[idx[e]]
            # (W_enc before the update): summed by the kernel where it can, with the rows in cache. Not for a
            # transcoder, whose encoder does not read b_dec.
            sums_encoder = getattr(backend, "fused_step_sums_encoder", False)
            if not sums_encoder and not cfg.transcode:
                dp_real = torch.where(torch.isneginf(pre_all), 0.0, dp_all)
                g_b_dec = g_b_dec - backend.sparse_decode(dp_real, idx_all, W_enc.detach(), None).sum(0)
            xc = (x.float() - b_in.float()).contiguous()
            adam = self._adam_scalars()
            params = [W_enc, b_enc, W_dec]
            moments = [t for p in params for t in (self._state(p)["exp_avg"], self._state(p)["exp_avg_sq"])]
            d_norm = rest[-1] if act == "relu" else None
            if widths is None:
                enc_sum = backend.fused_adam_step(idx_all, pre_all, idx.shape[1], dp_all, xc, v_all, g_all, d_norm,
                                                  [p.data for p in params], moments, adam, self.unit_norm_decoder,
                                                  self.unit_norm_decoder)
            else:
                enc_sum = grouped_adam_step(backend, widths, idx_all, pre_all, idx.shape[1], dp_all, xc, v_all,
                                            g, g_aux, d_norm, [p.data for p in params], moments, adam,
                                            self.unit_norm_decoder, self.unit_norm_decoder)
            if sums_encoder and not cfg.transcode:
                g_b_dec = g_b_dec - enc_sum.to(g_b_dec.dtype)
            small = [(b_dec, g_b_dec)] + ([(sae.log_threshold, rest[-1])] if act == "jumprelu" else []) \
                + ([(sae.W_skip, g_skip)] if cfg.skip_connection else [])
            for p, gr in small:
                st = self._state(p)
                adam_(p.data, gr.to(p.dtype), st["exp_avg"], st["exp_avg_sq"], *adam)
            for p in sae.parameters():
                self._state(p)["step"] += 1
            self._t += 1
            sae._update_training_state(v, idx)
            l0 = (v > 0).sum(-1).float().mean()
        d = sae.d_out
        return SAEOutput(x_hat.detach().reshape(*lead, d), v.reshape(*lead, -1), idx.reshape(*lead, -1),
                         loss.detach(), mse.detach(), fvu.detach(), aux_loss.detach(), l1.detach(), l0,
                         None if prefix_fvu is None else prefix_fvu.detach())
