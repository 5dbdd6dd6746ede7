"""The three coordinate-wise meta-optimizer networks, as plain differentiable torch modules.

Every net shares one interface so that the optimizer wrapper, ``meta_fit`` and ``finetune``
treat them alike:

* ``net.init_state(n, device=..., dtype=...)`` returns the per-coordinate state for ``n``
  coordinates as a ``dict[str, Tensor]``. **The coordinate is always the last dimension** of
  every state tensor, so states of several parameter tensors concatenate and split along
  ``dim=-1`` without knowing what they hold. (For SimpleOptimizer this is also the layout the
  fused kernels want: hidden unit k of all coordinates is contiguous.) The keys in
  ``net.per_tensor_state`` are the exception: they hold one value for all the coordinates
  of one parameter tensor (shape ``(1,)``), which broadcasts against the others.
* ``net(grad, state)`` maps a flat gradient of shape ``(n,)`` and a state to
  ``(update, new_state)``; the optimizee then does ``theta <- theta + lr * update``.
  Everything is differentiable with respect to the net's parameters, which is what
  meta-training needs; the nets never modify their inputs in place.
* ``net.config`` is the JSON-able dict of constructor arguments, and
  :func:`l2l_optim.registry.build_net` rebuilds a net from it (used by the weight files).
* :func:`l2l_optim.meta.init_rules.init_net` sets a net's starting point for meta-training;
  :mod:`l2l_optim.registry` says which one each architecture uses.

SimpleOptimizerNet's update (defined once in :mod:`l2l_optim.rule`), per coordinate i:

    h_i' = tanh(W_ih g_i + W_hh h_i)            (+ b_h with bias=True)
    m    = mean_j h_j'                          (over all n coordinates given)
    u_i  = w_out . [alpha h_i', beta m]         (+ b_out with bias=True)

Because the output is linear, u_i = w_a . h_i' + w_b . m with w_a = alpha w_out[:10] and
w_b = beta w_out[10:]; :meth:`SimpleOptimizerNet.fused_weights` returns exactly these
folded values for the kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rule import INPUT_NORMS, SimpleWeights, averaged_step, output, recur, rms_normalise, shared_term
from .state import int8_blocks

__all__ = [
    "CoordinatewiseNet",
    "SimpleOptimizerNet",
    "DMOptimizerNet",
    "RNNPropNet",
    "SimpleWeights",
    "averaged_step",
    "INPUT_NORMS",
    "rms_normalise",
]

State = dict[str, Tensor]

class CoordinatewiseNet(nn.Module):
    """Base class: a network applied to every coordinate of the optimizee with shared weights."""

    #: the registry name of the architecture, stored in weight files
    arch: str = ""
    #: each coordinate's update depends only on its own gradient and state, so the net may
    #: run on any split of the coordinates (no aggregation across them)
    independent_coordinates: bool = False
    #: state keys with one value per parameter tensor (shape ``(1,)``) rather than one per
    #: coordinate: every coordinate of a tensor takes the same steps, so one value serves them
    per_tensor_state: tuple[str, ...] = ()

    @property
    def config(self) -> dict:
        raise NotImplementedError

    def init_state(self, n: int, *, device=None, dtype=torch.float32) -> State:
        raise NotImplementedError

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SimpleOptimizerNet(CoordinatewiseNet):
    """The paper's SimpleOptimizer: a bias-free vanilla RNN with mean-aggregated hidden state.

    Args:
        hidden_size: hidden units per coordinate (the paper: 10).
        bias: put the RNN and output biases back (the "bias" ablation).
        aggregate: use the mean hidden state across coordinates in the output
            (False is the "no aggregation" ablation: ``u = w_out . (alpha h')``).
        input_norm: ``None`` (the paper: the raw gradient is the input) or ``"rms"`` (the
            input is :func:`rms_normalise` of the gradient, with its running means in the
            state: ``v`` per coordinate, the bias correction ``c`` one value per tensor).
            Beyond the paper; same 132 parameters.
        averaging: Schedule-Free iterate averaging around the net's step, with this
            interpolation weight (0, the default, is off; Schedule-Free AdamW uses 0.9).
            The net's update moves a base sequence ``z``; the uniform average ``x`` of the
            ``z``s (Schedule-Free's weights at a constant lr) anneals by itself, and the
            gradient is taken at ``y = (1 - averaging) z + averaging x``, which the
            parameters hold (:func:`averaged_step`). Beyond the paper; no extra parameters,
            one extra state tensor ``z``.

    With the defaults the net has exactly 132 parameters:
    ``w_ih`` 10, ``w_hh`` 100, ``alpha`` 1, ``beta`` 1, ``w_out`` 20.

    Example:
        >>> net = SimpleOptimizerNet()
        >>> net.num_parameters()
        132
        >>> state = net.init_state(5)
        >>> update, state = net(torch.randn(5), state)
        >>> update.shape, state["h"].shape
        (torch.Size([5]), torch.Size([10, 5]))
        >>> SimpleOptimizerNet(bias=True).num_parameters(), SimpleOptimizerNet(aggregate=False).num_parameters()
        (143, 121)
    """

    arch = "simple"

    def __init__(self, hidden_size: int = 10, bias: bool = False, aggregate: bool = True,
                 input_norm: str | None = None, averaging: float = 0.0):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"Invalid input_norm: {input_norm!r}; expected one of {INPUT_NORMS}")
        if not 0.0 <= averaging < 1.0:
            raise ValueError(f"Invalid averaging: {averaging!r}; expected 0 <= averaging < 1")
        self.input_norm = input_norm
        self.averaging = float(averaging)
        self.hidden_size = hidden_size
        self.bias = bias
        self.aggregate = aggregate
        H = hidden_size
        self.w_ih = nn.Parameter(torch.empty(H, 1))
        self.w_hh = nn.Parameter(torch.empty(H, H))
        self.alpha = nn.Parameter(torch.ones(()))
        if aggregate:
            self.beta = nn.Parameter(torch.ones(()))
        self.w_out = nn.Parameter(torch.empty(2 * H if aggregate else H))
        if bias:
            self.b_h = nn.Parameter(torch.zeros(H))
            self.b_out = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.RNN's default: uniform(-1/sqrt(H), 1/sqrt(H)); init_net offers better-conditioned
        # starting points for meta-training on top of this
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 0:
                    p.uniform_(-bound, bound)
            self.alpha.fill_(1.0)
            if self.aggregate:
                self.beta.fill_(1.0)
            if self.bias:
                self.b_h.zero_()
                self.b_out.zero_()

    @property
    def config(self) -> dict:
        config = {"hidden_size": self.hidden_size, "bias": self.bias, "aggregate": self.aggregate}
        # only when set, so the paper's nets keep their config and fingerprint
        if self.input_norm is not None:
            config["input_norm"] = self.input_norm
        if self.averaging:
            config["averaging"] = self.averaging
        return config

    @property
    def per_tensor_state(self) -> tuple[str, ...]:
        # the bias correction c = 1 - beta^t is the same for every coordinate of a tensor
        return ("c",) if self.input_norm == "rms" else ()

    def init_state(self, n: int, *, device=None, dtype=torch.float32) -> State:
        """The state of ``n`` coordinates: ``h`` ``(H, n)`` in ``dtype``; with the rms input
        norm ``v`` ``(n,)`` and ``c`` ``(1,)`` (one bias correction for all ``n``) in float32
        (float64 for a float64 ``dtype``); with averaging ``z`` ``(n,)``. ``dtype=torch.int8``
        keeps ``h`` as 8-bit codes with their block scales ``h_scale`` and ``v`` in bfloat16
        (:mod:`l2l_optim.state`), whose codecs the CPU kernel runs in its pass."""
        state = {"h": torch.zeros(self.hidden_size, n, device=device, dtype=dtype)}
        if dtype == torch.int8:
            state["h_scale"] = torch.zeros(self.hidden_size, int8_blocks(n), device=device)
        if self.input_norm == "rms":
            # running means need more than bfloat16's 8 bits rounded to nearest (their 0.1%
            # steps would vanish); the 8-bit state keeps v in bfloat16 rounded stochastically
            v_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            state["v"] = torch.zeros(n, device=device, dtype=torch.bfloat16 if dtype == torch.int8 else v_dtype)
            state["c"] = torch.zeros(1, device=device, dtype=v_dtype)
        if self.averaging:
            # the base sequence; the optimizer starts it at the parameter's value
            state["z"] = torch.zeros(n, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        return state

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        h = state["h"]
        new_state = {}
        if self.input_norm == "rms":
            x, new_state["v"], new_state["c"] = rms_normalise(grad, state["v"], state["c"])
            grad = x.to(grad.dtype)
        H = self.hidden_size
        h_new = recur(self.w_ih.reshape(H), self.w_hh, self.b_h if self.bias else None, grad, h)
        shared = shared_term(self.beta * self.w_out[H:], h_new.mean(dim=1)) if self.aggregate else None
        update = output(self.alpha * self.w_out[:H], h_new, shared, self.b_out if self.bias else None)
        return update, {"h": h_new, **new_state}

    def fused_weights(self, dtype=torch.float32, device=None) -> SimpleWeights:
        """The folded weights the kernels use (detached copies in ``dtype`` on ``device``)."""
        H = self.hidden_size

        def cast(t: Tensor) -> Tensor:
            # cast before folding, so float64 kernels fold in float64 too
            return t.detach().to(device=device, dtype=dtype).clone().contiguous()

        with torch.no_grad():
            zeros = torch.zeros(H, dtype=dtype, device=device)
            w_out = cast(self.w_out)
            return SimpleWeights(
                w_ih=cast(self.w_ih.reshape(H)),
                w_hh=cast(self.w_hh),
                b_h=cast(self.b_h) if self.bias else zeros,
                w_a=cast(self.alpha) * w_out[:H],
                w_b=cast(self.beta) * w_out[H:] if self.aggregate else zeros.clone(),
                b_out=cast(self.b_out) if self.bias else torch.zeros((), dtype=dtype, device=device),
            )


def _linear_cl(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer`` applied to coordinate-last input ``x`` of shape ``(in, n)``; returns ``(out, n)``."""
    y = layer.weight @ x
    return y if layer.bias is None else y.add_(layer.bias[:, None])


def _lstm_step(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``cell``'s update on coordinate-last tensors: ``x`` ``(in, n)``, ``h``/``c`` ``(hidden, n)``.

    The same function as ``nn.LSTMCell`` (gate order i, f, g, o), written out because in this
    layout each gate is a contiguous block of rows: ``nn.LSTMCell`` on ``(n, hidden)`` inputs
    applies sigmoid and tanh to strided column slices, 44% of a base-MLP step on CPU. The
    cell's parameters are used as they are, so saved weights are unchanged.
    """
    H = cell.hidden_size
    # in place on a fresh product: out-of-place addmm would copy the broadcast bias or the
    # (4 hidden, n) gates once more, which cost a third of the step
    gates = (cell.weight_ih @ x).addmm_(cell.weight_hh, h)
    if cell.bias_ih is not None:
        gates.add_((cell.bias_ih + cell.bias_hh)[:, None])
    in_forget = torch.sigmoid(gates[: 2 * H])
    cand = torch.tanh(gates[2 * H : 3 * H])
    out_gate = torch.sigmoid(gates[3 * H :])
    c_new = torch.addcmul(in_forget[H:] * c, in_forget[:H], cand)
    return out_gate * torch.tanh(c_new), c_new


class DMOptimizerNet(CoordinatewiseNet):
    """Andrychowicz et al. (2016): a 2-layer coordinate-wise LSTM with log/sign preprocessing.

    Input preprocessing with ``p = 10``: ``(log|g| / p, sign g)`` if ``|g| >= e^-p`` else
    ``(-1, e^p g)``. Output: ``0.1 * Linear(20 -> 1)``. 5301 parameters with the defaults.

    Args:
        hidden_size: units of each LSTM layer (the paper's baseline: 20).
        preproc_p: the preprocessing constant ``p``.
        output_scale: the factor on the output layer.

    Example:
        >>> net = DMOptimizerNet()
        >>> net.num_parameters()
        5301
        >>> update, state = net(torch.randn(4), net.init_state(4))
        >>> update.shape, sorted(state)
        (torch.Size([4]), ['c1', 'c2', 'h1', 'h2'])
    """

    arch = "dm"
    independent_coordinates = True

    def __init__(self, hidden_size: int = 20, preproc_p: float = 10.0, output_scale: float = 0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.preproc_p = preproc_p
        self.output_scale = output_scale
        self.cell1 = nn.LSTMCell(2, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    @property
    def config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "preproc_p": self.preproc_p,
            "output_scale": self.output_scale,
        }

    def init_state(self, n: int, *, device=None, dtype=torch.float32) -> State:
        z = lambda: torch.zeros(self.hidden_size, n, device=device, dtype=dtype)  # noqa: E731
        return {"h1": z(), "c1": z(), "h2": z(), "c2": z()}

    def preprocess(self, grad: Tensor) -> Tensor:
        p = self.preproc_p
        big = grad.abs() >= math.exp(-p)
        # clamp keeps log finite on the branch torch.where discards (its grad would be NaN)
        log_part = torch.log(grad.abs().clamp_min(math.exp(-p))) / p
        x1 = torch.where(big, log_part, torch.full_like(grad, -1.0))
        x2 = torch.where(big, torch.sign(grad), grad * math.exp(p))
        return torch.stack([x1, x2])  # (2, n): coordinate-last like the state

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        x = self.preprocess(grad).to(state["h1"].dtype)
        h1, c1 = _lstm_step(self.cell1, x, state["h1"], state["c1"])
        h2, c2 = _lstm_step(self.cell2, h1, state["h2"], state["c2"])
        update = self.output_scale * _linear_cl(self.out, h2).squeeze(0)
        return update, {"h1": h1, "c1": c1, "h2": h2, "c2": c2}


class RNNPropNet(CoordinatewiseNet):
    """Lv et al. (2017): Adam-like inputs, ELU embedding, 2-layer LSTM, tanh output.

    Inputs ``g / (sqrt(v_hat) + eps)`` and ``m_hat / (sqrt(v_hat) + eps)`` with
    ``beta1 = beta2 = 0.95``; ``Linear(2 -> 20)`` + ELU, two ``LSTMCell(20, 20)``,
    ``Linear(20 -> 1)``, ``0.1 * tanh``. 6801 parameters with the defaults. The moment
    estimates and the per-coordinate step count live in the state.

    Args:
        hidden_size: width of the embedding and of each LSTM layer (the paper's baseline: 20).
        beta1, beta2: decay rates of the first and second moment estimates.
        eps: added to the root of the second moment before dividing.
        output_scale: the factor on the ``tanh`` output.

    Example:
        >>> net = RNNPropNet()
        >>> net.num_parameters()
        6801
        >>> update, state = net(torch.randn(4), net.init_state(4))
        >>> update.shape, bool(update.abs().max() <= 0.1)
        (torch.Size([4]), True)
    """

    arch = "rnnprop"
    independent_coordinates = True

    def __init__(
        self,
        hidden_size: int = 20,
        beta1: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-8,
        output_scale: float = 0.1,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.output_scale = output_scale
        self.embed = nn.Linear(2, hidden_size)
        self.cell1 = nn.LSTMCell(hidden_size, hidden_size)
        self.cell2 = nn.LSTMCell(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    @property
    def config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "output_scale": self.output_scale,
        }

    def init_state(self, n: int, *, device=None, dtype=torch.float32) -> State:
        z = lambda *s: torch.zeros(*s, n, device=device, dtype=dtype)  # noqa: E731
        H = self.hidden_size
        return {"h1": z(H), "c1": z(H), "h2": z(H), "c2": z(H), "m": z(), "v": z(), "t": z()}

    def forward(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        g = grad.to(state["m"].dtype)
        t = state["t"] + 1
        m = self.beta1 * state["m"] + (1 - self.beta1) * g
        v = self.beta2 * state["v"] + (1 - self.beta2) * g * g
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        denom = v_hat.sqrt() + self.eps
        x = torch.stack([g / denom, m_hat / denom])  # (2, n)
        x = F.elu(_linear_cl(self.embed, x))
        h1, c1 = _lstm_step(self.cell1, x, state["h1"], state["c1"])
        h2, c2 = _lstm_step(self.cell2, h1, state["h2"], state["c2"])
        update = self.output_scale * torch.tanh(_linear_cl(self.out, h2).squeeze(0))
        return update, {"h1": h1, "c1": c1, "h2": h2, "c2": c2, "m": m, "v": v, "t": t}
