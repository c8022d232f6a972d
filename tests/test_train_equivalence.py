"""`train.loop.train` gives the weights of the loop that trained the shipped classifiers.

Every shipped classifier (zoo/weights/*-mnist, *-fashion_mnist) was trained by `train_minimal`, a
small loop of its own in train/recipes.py, which `train.loop.train` replaced. Its update is kept
below, frozen, as the reference: for the same TrainConfig (float32, one device, accumulate 1) the
loop must give the same weights after the same steps from the same seed. The runs cross an epoch
boundary (a second data permutation), stop before the end of the schedule (max_steps does not
shorten it), and cover dropout, BatchNorm statistics, augmentation, label smoothing and EMA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train import augment, data, loop, recipes
from train.config import TrainConfig
from zoo.pretrained import preprocess

pytestmark = pytest.mark.skipif(not data.is_prepared("mnist"),
                                reason="mnist is not prepared (`zoo data prepare mnist`)")

# 64 examples in batches of 16: 4 steps per epoch, so 6 steps use two permutations.
SMALL = dict(train_examples=64, test_examples=32, batch_size=16, epochs=3, max_steps=6, eval_batch_size=32,
             progress=False, fast_compile=True)


# ---------------------------------------------------------------------------------------------
# The reference: `train_minimal`'s update as it trained the shipped weights (train/recipes.py until
# the loops were merged), frozen. Left out: its data loading (the arrays come in as arguments), its
# evaluation and logging. Changed: nothing but the compiler options of its jit (the same as the
# loop's fast_compile, so both programs are compiled alike). Model construction is zoo.create_model
# with the seed, as train.loop.build_model did; schedule and optimizer are the loop's (config -> optax).


def train_minimal_reference(config: TrainConfig, train_x: np.ndarray, train_y: np.ndarray):
    """(model with the raw weights, model with the EMA weights) after train_minimal's updates."""
    import zoo

    source = data.get_source(config.dataset)
    preprocessing = data.preprocessing_record(config.dataset)
    batch = config.batch_size
    steps_per_epoch = len(train_x) // batch
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    model = zoo.create_model(config.model, num_classes=source.num_classes, input_size=source.image_shape[:2],
                             in_channels=source.image_shape[2], rngs=config.seed, **config.model_kwargs)
    schedule = loop.make_schedule(config, config.epochs * steps_per_epoch, steps_per_epoch)
    optimizer = nnx.Optimizer(model, loop.make_optimizer(config, schedule), wrt=nnx.Param)
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    weights_filter = (nnx.Param, nnx.BatchStat)
    ema = jax.tree.map(jnp.copy, nnx.state(model, weights_filter))
    use_ema = config.ema_decay is not None
    augments = augment.requested(config)
    images, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    base_key = jax.random.key(config.seed)

    def one_step(state, ema, images, labels, idx, step):
        model, optimizer = nnx.merge(graphdef, state)
        x = images[idx]
        if augments:
            keys = jax.random.split(jax.random.fold_in(base_key, step), batch)
            x = augment.from_config(keys, x.astype(jnp.float32), config)
        x, y = preprocess(x, preprocessing), labels[idx]
        targets = optax.smooth_labels(jax.nn.one_hot(y, source.num_classes), config.label_smoothing)

        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy(logits, targets).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        if use_ema:  # the usual warmup of the decay, so the average forgets the random init
            decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree.map(lambda e, w: decay * e + (1 - decay) * w, ema, nnx.state(model, weights_filter))
        return nnx.state((model, optimizer)), ema, jnp.stack([loss, (logits.argmax(-1) == y).mean()])

    run_step = jax.jit(one_step, donate_argnums=(0, 1), compiler_options=loop.FAST_COMPILE)

    rng = np.random.default_rng(config.seed)
    step = 0
    while step < total_steps:
        order = rng.permutation(len(train_x))[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        for i in range(min(steps_per_epoch, total_steps - step)):
            state, ema, _ = run_step(state, ema, images, labels, jnp.asarray(order[i]), jnp.int32(step))
            step += 1
    model = nnx.merge(graphdef, state)[0]
    model.eval()
    ema_model = nnx.clone(model)  # a copy: merging `state` twice would share its Variables
    nnx.update(ema_model, ema)
    return model, ema_model


# ---------------------------------------------------------------------------------------------


def assert_same(got: dict, want: dict, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)


def raw_weights(model) -> dict:
    """The model's weights keyed as `TrainResult.final_weights` keys them."""
    return loop._flat({"params": nnx.state(model, nnx.Param), "other": nnx.state(model, nnx.BatchStat)})


def compare(config: TrainConfig) -> dict:
    """Train with the loop and with the reference; returns the reference's raw weights."""
    from zoo.saving import flat_state

    train_x, train_y = data.load_arrays(config.dataset, f"train[:{config.train_examples}]")
    raw, ema = train_minimal_reference(config, train_x, train_y)
    result = loop.train(config)
    assert result.steps == config.max_steps
    assert_same(result.final_weights, raw_weights(raw))
    assert_same(flat_state(result.model), flat_state(ema if config.ema_decay is not None else raw))
    return raw_weights(raw)


def test_mnistnet_with_dropout_batchnorm_augmentation_and_ema_and_its_resumed_run(tmp_path):
    # mnistnet_mnist's settings (BatchNorm, augmentation, label smoothing, EMA) with dropout 0.25.
    config = dataclasses.replace(recipes.mnistnet_mnist(seed=3), model_kwargs={"dropout": 0.25}, **SMALL)
    assert config.label_smoothing and config.ema_decay and augment.requested(config)
    reference = compare(config)
    # Interrupted after step 3 (mid-epoch) and resumed from its checkpoint: the dropout streams'
    # counts, BatchNorm statistics and EMA come back with it, the data order and keys are recomputed.
    part = dataclasses.replace(config, out_dir=str(tmp_path), max_steps=3)
    assert loop.train(part).steps == 3
    resumed = loop.train(dataclasses.replace(part, max_steps=config.max_steps, resume=True))
    assert resumed.steps == config.max_steps
    assert_same(resumed.final_weights, reference)


def test_lenet5_with_its_recipe():
    compare(dataclasses.replace(recipes.lenet5_mnist(seed=1), **SMALL))

