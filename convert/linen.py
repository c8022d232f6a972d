"""Flax Linen classifiers into fully convolutional networks.

    fcn = convert.to_fcn(linen_module, variables, input_shape=(28, 28, 1))

A Linen module holds no weights: `LinenModel` keeps the module (static) and its
variables as NNX variables (`params` as `nnx.Param`, `batch_stats` as `nnx.BatchStat`,
other collections as `nnx.Variable`), so the FCN built around it is an ordinary NNX
module whose backbone weights can be trained and saved. Its forward pass is read from
its trace (`convert.trace.read_traced`), with every `nn.Dense` call hooked through
`flax.linen.intercept_methods`.

Inference and training calls: Linen modules take their mode as an argument. The
keyword arguments of an inference call are found from the signature of `__call__`
(`train=False`, `training=False`, `is_training=False`, `deterministic=True`,
`use_running_average=True`), or given as `apply_kwargs`; in train mode (`fcn.train()`)
the opposite values are passed, `batch_stats` is updated and dropout draws from the
model's own `nnx.Rngs`.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import unfreeze

from convert.trace import Forward, read_traced, register_forward

# Mode arguments of `__call__` -> their inference value.
EVAL_ARGUMENTS = {"train": False, "training": False, "is_training": False, "deterministic": True,
                  "use_running_average": True}
VARIABLE_TYPES = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def mode_arguments(module: nn.Module, apply_kwargs: dict | None) -> tuple[dict, dict]:
    """(inference kwargs, training kwargs) of `module.apply`.

    Raises a ValueError naming a required argument of `__call__` that neither the signature
    rules nor `apply_kwargs` cover.
    """
    if apply_kwargs is not None:
        flip = {k: (not v) if k in EVAL_ARGUMENTS and isinstance(v, bool) else v for k, v in apply_kwargs.items()}
        return dict(apply_kwargs), flip
    try:
        parameters = list(inspect.signature(type(module).__call__).parameters.values())[2:]
    except (TypeError, ValueError):
        parameters = []
    inference, training = {}, {}
    for p in parameters:
        if p.name in EVAL_ARGUMENTS:
            inference[p.name], training[p.name] = EVAL_ARGUMENTS[p.name], not EVAL_ARGUMENTS[p.name]
        elif p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"{type(module).__name__}.__call__ needs the argument {p.name!r}; pass "
                             f"apply_kwargs={{{p.name!r}: ...}} with its value for inference")
    return inference, training


class LinenModel(nnx.Module):
    """A Linen module and its variables as one NNX module.

    Args:
        module: the `flax.linen.Module`.
        variables: its variables, {collection: tree of arrays}; "params" is required.
        inference, training: keyword arguments of `module.apply` in eval and train mode.
    x: (N, H, W, C) -> whatever `module.apply(variables, x)` returns
    """

    def __init__(self, module: nn.Module, variables: dict, *, inference: dict, training: dict, seed: int = 0):
        self.module = module
        self.collections = tuple(variables)
        for collection, tree in variables.items():
            kind = VARIABLE_TYPES.get(collection, nnx.Variable)
            setattr(self, collection, nnx.data(jax.tree.map(lambda a, kind=kind: kind(jnp.asarray(a)), tree)))
        self.inference = tuple(sorted(inference.items()))
        self.training = tuple(sorted(training.items()))
        self.use_running_average = True  # nnx's .train() / .eval() switch it
        self.rngs = nnx.Rngs(dropout=seed)

    def variables(self) -> dict:
        def value(v):
            return v.get_value() if isinstance(v, nnx.Variable) else v

        return {c: jax.tree.map(value, getattr(self, c), is_leaf=lambda v: isinstance(v, nnx.Variable))
                for c in self.collections}

    def __call__(self, x):
        if self.use_running_average:
            return self.module.apply(self.variables(), x, **dict(self.inference))
        mutable = [c for c in self.collections if c != "params"]
        out, updates = self.module.apply(self.variables(), x, **dict(self.training), mutable=mutable,
                                         rngs={"dropout": self.rngs.dropout()})
        for collection, tree in unfreeze(updates).items():
            if collection in self.collections:
                jax.tree.map(lambda var, new: var.set_value(new), getattr(self, collection), tree,
                             is_leaf=lambda v: isinstance(v, nnx.Variable))
        return out


@register_forward
class LinenForward(Forward):
    """Linen modules: every `nn.Dense` call is a Dense, named by its module path ("Dense_0", "head.Dense_1")."""

    kind = "linen"

    @staticmethod
    def run(model: LinenModel, x, hook):
        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__" \
                    and len(args) == 1 and not kwargs:
                return hook(".".join(context.module.path), lambda inputs: next_fun(inputs), args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return model(x)

    @staticmethod
    def linear(model: LinenModel, path: str) -> nnx.Linear:
        tree = model.params
        for part in path.split("."):
            tree = tree[part]
        kernel = tree["kernel"].get_value()
        bias = tree["bias"].get_value() if "bias" in tree else None
        dense = nnx.Linear(kernel.shape[0], kernel.shape[1], use_bias=bias is not None, rngs=nnx.Rngs(0))
        dense.kernel.set_value(jnp.asarray(kernel, jnp.float32))
        if bias is not None:
            dense.bias.set_value(jnp.asarray(bias, jnp.float32))
        return dense


def read_linen(module: nn.Module, variables, input_shape, *, apply_kwargs: dict | None = None):
    """(backbone, pool, head layers) of a Linen classifier, for `convert.fcn.to_fcn`.

    Raises a ValueError when the variables are missing or are not the module's.
    """
    label = type(module).__name__
    if variables is None:
        raise ValueError(f"{label} is a Flax Linen module, which holds no weights: pass its variables, "
                         f"convert.to_fcn(module, variables, input_shape=(H, W, C))")
    try:
        variables = unfreeze(variables)
    except Exception:
        variables = None
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError(f"the variables of {label} must be a dict with a 'params' collection (what "
                         f"module.init returns, or a checkpoint of it); got {type(variables).__name__}")
    inference, training = mode_arguments(module, apply_kwargs)
    model = LinenModel(module, variables, inference=inference, training=training)
    return read_traced(model, input_shape, LinenForward, name=label)
