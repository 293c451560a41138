"""TEMPORARY minimal kernels (being replaced)."""
from zo2tier.zo.rng import normal


def perturb_into(theta, out, *, step_seed, param_id, scale, kind="gaussian"):
    z = normal(step_seed, param_id, theta.numel(), device=theta.device, kind=kind)
    out.copy_(theta.float() + scale * z)
    return out


def apply_update_(theta, *, step_seed, param_id, lr, projected_grad, weight_decay, kind="gaussian"):
    z = normal(step_seed, param_id, theta.numel(), device=theta.device, kind=kind)
    theta.sub_(lr * (projected_grad * z + weight_decay * theta))
    return theta
