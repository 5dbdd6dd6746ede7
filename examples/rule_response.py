"""What step a SimpleOptimizer rule takes for a given gradient: its response curve.

    python examples/rule_response.py simple simple-v0
    python examples/rule_response.py runs/simple-es5/weights.safetensors --json out.json

For each weight file, three things that explain how the rule behaves late in training, when
the gradients are small and mostly noise (the per-coordinate part of the update only; the
aggregate adds one scalar shared by every coordinate):

* ``u/g`` for a constant gradient g: the step per unit of gradient after 200 steps of the same
  g (the rule's effective learning rate, momentum included). Large |g| saturates the hidden
  units and the step tends to a fixed size (``u/g`` falls like 1/g); small |g| keeps them linear.
  A positive value means the rule steps uphill.
* the root-mean-square step for zero-mean Gaussian gradient noise of a given std, after 300
  steps: what the rule does once the gradient is noise. A rule whose noise step does not shrink
  with the noise sets a floor under the loss.
* the spectral norm and spectral radius of ``W_hh``: at or above 1 the hidden state need not
  decay when the gradients do, so the rule can keep stepping on its own.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from l2l_optim.weights import load_weights

GRADIENTS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
NOISE_STDS = (1e-5, 1e-4, 1e-3, 1e-2)


@torch.no_grad()
def response(net, gradients=GRADIENTS, noise_stds=NOISE_STDS, coords: int = 4000, seed: int = 0) -> dict:
    """The response curve of a :class:`~l2l_optim.nets.SimpleOptimizerNet` (see the module docstring)."""
    net = copy.deepcopy(net).double()
    H = net.hidden_size
    w_a = net.alpha * net.w_out[:H]  # the per-coordinate part of the output

    def run(grads, n: int, steps: int) -> torch.Tensor:
        # the net's own recurrence (its forward); its update also holds the aggregate, left out
        state = net.init_state(n, dtype=torch.float64)
        for t in range(steps):
            _, state = net(grads(t), state)
        return w_a @ state["h"]

    g = torch.tensor(gradients, dtype=torch.float64)
    gain = run(lambda t: g, len(g), 200) / g
    stds = torch.tensor(noise_stds, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    noise = lambda t: (stds[:, None] * torch.randn(len(stds), coords, generator=gen, dtype=torch.float64)).reshape(-1)
    rms = run(noise, len(stds) * coords, 300).view(len(stds), coords).pow(2).mean(1).sqrt()
    w_hh = net.w_hh
    return {
        "gradient": list(gradients), "u_over_g": gain.tolist(),
        "noise_std": list(noise_stds), "noise_rms_step": rms.tolist(),
        "w_hh_spectral_norm": torch.linalg.matrix_norm(w_hh, 2).item(),
        "w_hh_spectral_radius": torch.linalg.eigvals(w_hh).abs().max().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="+", help="shipped names or .safetensors paths")
    p.add_argument("--json", default=None, help="also write the curves here")
    args = p.parse_args()
    out = {}
    for name in args.weights:
        loaded = load_weights(name)
        r = response(loaded.net)
        out[name] = r | {"fingerprint": loaded.fingerprint}
        print(f"{name} ({loaded.fingerprint}): W_hh spectral norm {r['w_hh_spectral_norm']:.4f}, "
              f"radius {r['w_hh_spectral_radius']:.4f}")
        print("  constant g: " + ", ".join(f"{g:g} -> u/g {u:.3g}" for g, u in zip(r["gradient"], r["u_over_g"])))
        print("  noise std:  " + ", ".join(f"{s:g} -> rms step {v:.3g}" for s, v in zip(r["noise_std"], r["noise_rms_step"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
